r"""What every benchmark shares: measurement, machine, workers, peers, models, results.

Modules (import the one you need; none imports ``lowrank_ggn`` at import time, so a
worker can put a previous release first on ``sys.path`` after importing them):

* :mod:`harness.memory`: peak resident memory (``VmHWM``) and :func:`~harness.memory.measure`,
  the timed call with its peak;
* :mod:`harness.machine`: the machine description every result records;
* :mod:`harness.workers`: one case per fresh subprocess, failures as rows, previous
  releases exported with ``git archive``;
* :mod:`harness.peers`: ViViT's eigh (``torch.symeig`` shimmed), curvlinops + ``eigsh``,
  deflated power iteration, which peers are installed;
* :mod:`harness.models`: 3c3d with and without BatchNorm, the tiny smoke nets, the MLP;
  :mod:`harness.resnet` (torchvision's ResNet-18) and :mod:`harness.models_zoo` (a token
  transformer and a MobileNet);
* :mod:`harness.floor`: the floor of a spectrum call's work on this machine;
* :mod:`harness.passes`: forward passes counted by a hook, in full-batch equivalents;
* :mod:`harness.results`: records as plain data, derived numbers, JSON + markdown;
* :mod:`harness.cli`: the command-line options the drivers share.

Benchmark scripts run as ``python benchmarks/bench_X.py``: their folder is first on
``sys.path``, so ``import harness`` needs no path edit there.
"""
