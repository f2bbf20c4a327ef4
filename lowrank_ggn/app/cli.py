r"""``lowrank-ggn``: exact GGN spectra of small networks on real digits, with a report.

The default run takes two small CNNs from :mod:`lowrank_ggn.app.models`, one without
normalisation (``cnn``) and one with BatchNorm in **train mode** (``cnn-bn``), trains
each briefly with SGD on scikit-learn's 8×8 digits (:mod:`lowrank_ggn.app.data`), and for
one batch computes the full nonzero GGN spectrum and the top eigenvectors
(:func:`lowrank_ggn.ggn_spectrum`). It checks the sum of the eigenvalues against the
trace of the brute-force GGN (:func:`lowrank_ggn.reference.dense_ggn`, an independent
``torch.func`` computation) and the eigenvectors against ``G e = λ e``, prints a
concise report and writes into the output folder

* ``spectrum.json``: settings and, per model, ``"eigenvalues"`` (all nonzero ones,
  descending) and the checks;
* ``spectrum.png`` / ``spectrum.pdf``: log-scale histogram and eigenvalue against
  index, the models side by side in each panel;
* ``top_eigenvectors.pt``: ``{model: [k, D]}`` top eigenvectors (``torch.load``).

Each of these is a link into the run's own folder under ``.lowrank-ggn/``, switched
with one atomic step (:mod:`lowrank_ggn.app.results_folder`): whenever a run stops,
the folder shows the earlier run's results or the new run's, never a mix.

The code is split by concept: :mod:`lowrank_ggn.app.training` (the SGD training loop),
:mod:`lowrank_ggn.app.problems` (zoo or ``--setup`` problems, sub-sampling positions,
layer groups), :mod:`lowrank_ggn.app.analysis` (spectrum, checks, structure and
moments of one problem) and :mod:`lowrank_ggn.app.report` (text and files); this
module holds the parser, the argument checks and :func:`main`.

Run ``lowrank-ggn --help`` for the options.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import torch

from lowrank_ggn import __version__
from lowrank_ggn.app.analysis import analyse
from lowrank_ggn.app.data import DIGITS
from lowrank_ggn.app.models import ZOO
from lowrank_ggn.app.problems import setup_problem, subsampling_indices, zoo_problem
from lowrank_ggn.app.report import format_report, output_problem, write_outputs
from lowrank_ggn.app.training import (
    DEFAULT_TRAIN_STEPS,
    LEARNING_RATE,
    MOMENTUM,
    TRAIN_BATCH,
)

#: Models of the default run: without normalisation, and with BatchNorm (train mode).
DEFAULT_MODELS = ("cnn", "cnn-bn")
#: Lower bounds of the integer options, checked after parsing (``--seed`` has none).
MINIMUM = {"batch_size": 1, "top_k": 1, "mc_samples": 1, "train_steps": 0}

EPILOG = r"""
examples:
  lowrank-ggn                                  # default: cnn and cnn-bn, N=64, float64
  lowrank-ggn --out results                    # output folder (created, must be empty)
  lowrank-ggn --out results --overwrite        # replace an earlier run's results
  lowrank-ggn --model resnet-bn mlp --batch-size 32 --top-k 10
  lowrank-ggn --loss mse --train-steps 0       # MSE on one-hot labels, at initialisation
  lowrank-ggn --mc-samples 2 --seed 3          # Monte-Carlo GGN (2 sampled columns per sample)
  lowrank-ggn --subsampling 16                 # curvature from 16 random samples of the batch
  lowrank-ggn --subsampling 0,1,2,3            # ... or from these batch positions
  lowrank-ggn --per-layer                      # block-diagonal (per-layer) spectra as well
  lowrank-ggn --dtype float32 --device cuda    # precision and device
  lowrank-ggn --setup mysetup:make             # your own problem, see below

--setup MODULE:FUNCTION imports MODULE (from the current directory or PYTHONPATH)
and calls FUNCTION() with no arguments. It must return (model, loss_func, batch)
with batch = (inputs, targets), e.g. in mysetup.py:

    import torch
    def make():
        model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8),
                                    torch.nn.ReLU(), torch.nn.Linear(8, 3))
        X, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
        return model, torch.nn.CrossEntropyLoss(), (X, y)

The model is used as returned (train/eval mode included); --dtype/--device convert
model and batch only when given. Outputs: spectrum.json (each model's nonzero
eigenvalues under "eigenvalues"), spectrum.png/.pdf, top_eigenvectors.pt.
"""


# ----------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lowrank-ggn`` (every option documented)."""
    parser = argparse.ArgumentParser(
        prog="lowrank-ggn",
        description=(
            "Exact nonzero GGN spectrum and top eigenvectors of small networks on "
            "scikit-learn's 8x8 digits (or your own setup), with and without "
            "BatchNorm in train mode; prints a report and writes a JSON file and "
            "figures."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        nargs="+",
        choices=sorted(ZOO),
        default=None,
        metavar="NAME",
        help=f"built-in model(s) from the zoo {{{', '.join(sorted(ZOO))}}}; "
        f"default: {' '.join(DEFAULT_MODELS)} (e.g. --model cnn-bn resnet-bn)",
    )
    _add_int(
        parser,
        "--batch-size",
        64,
        "N",
        "samples in the batch whose GGN is computed (default 64; e.g. --batch-size 32)",
    )
    parser.add_argument(
        "--loss",
        choices=("ce", "mse"),
        default="ce",
        help="ce: CrossEntropyLoss on labels; mse: MSELoss on one-hot labels; "
        "both with reduction 'mean' (default ce; e.g. --loss mse)",
    )
    _add_int(
        parser,
        "--mc-samples",
        None,
        "M",
        "Monte-Carlo GGN with M sampled loss-Hessian columns per sample "
        "(seeded by --seed); default: exact (e.g. --mc-samples 1)",
    )
    parser.add_argument(
        "--subsampling",
        action="append",
        default=None,
        metavar="K|I,J,...",
        help="curvature from a subset of the batch (the forward pass, BN statistics "
        "included, still uses all N): an integer K draws K positions at random "
        "(--seed); a comma-separated list gives the positions, e.g. --subsampling 8 "
        "or --subsampling 0,2,4 (a single position: --subsampling 3,)",
    )
    parser.add_argument(
        "--per-layer",
        action="store_true",
        help="also compute the spectrum of each layer's diagonal GGN block "
        "(one group per module that owns parameters; e.g. --per-layer)",
    )
    _add_int(
        parser,
        "--top-k",
        5,
        "K",
        "top eigenvalues to print and eigenvectors to compute (default 5; e.g. --top-k 10)",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        default=None,
        help="parameter and data dtype (default float64 for the zoo, as returned "
        "for --setup; e.g. --dtype float32)",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="torch device (default cpu for the zoo, as returned for --setup; "
        "e.g. --device cuda:0)",
    )
    _add_int(
        parser,
        "--seed",
        0,
        None,
        "seed of model initialisation, batch draw, training order, MC samples "
        "and random sub-sampling (default 0; e.g. --seed 1)",
    )
    _add_int(
        parser,
        "--train-steps",
        None,
        "T",
        f"SGD steps (lr {LEARNING_RATE}, momentum {MOMENTUM}, batch "
        f"{TRAIN_BATCH}) before the spectrum; 0 = at initialisation (default "
        f"{DEFAULT_TRAIN_STEPS}; zoo models only; e.g. --train-steps 0)",
    )
    parser.add_argument(
        "--setup",
        default=None,
        metavar="MODULE:FUNCTION",
        help="your own problem: FUNCTION() in MODULE returns (model, loss_func, "
        "(inputs, targets)); replaces --model (e.g. --setup mysetup:make)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("results"),
        metavar="DIR",
        help="output folder for spectrum.json, figures and eigenvectors, created if "
        "missing; must be empty unless --overwrite (default results; e.g. --out "
        "/tmp/run1)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the results of an earlier run in --out in one atomic switch "
        "(an interrupted run leaves the earlier results; files other than results "
        "are kept; e.g. --out results --overwrite)",
    )
    return parser


def _add_int(
    parser: argparse.ArgumentParser,
    flag: str,
    default: int | None,
    metavar: str | None,
    help_text: str,
) -> None:
    """Add the integer option ``flag`` (its lower bound, if any, is in ``MINIMUM``)."""
    parser.add_argument(
        flag, type=int, default=default, metavar=metavar, help=help_text
    )


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit with status 2 and the usage line (``parser.error``) on invalid options."""
    for name, low in MINIMUM.items():
        value = getattr(args, name)
        if value is not None and value < low:
            parser.error(f"--{name.replace('_', '-')} must be >= {low}; got {value}.")
    if args.setup is not None:
        if args.model is not None:
            parser.error("--setup replaces --model; pass one of them.")
        if args.train_steps:
            parser.error(
                "--train-steps trains zoo models on the digits; with --setup, "
                "train your model in the setup function.",
            )
        if ":" not in args.setup:
            parser.error(f"--setup must be MODULE:FUNCTION; got {args.setup!r}.")
    if args.subsampling is not None:
        if len(args.subsampling) > 1:
            parser.error("--subsampling was given more than once; pass it once.")
        args.subsampling = args.subsampling[0]
        try:  # the syntax now; positions against the batch size of --setup later
            subsampling_indices(args.subsampling, args.batch_size, args.seed)
        except SystemExit as err:
            if args.setup is None:
                parser.error(str(err).removeprefix("lowrank-ggn: "))
    if args.setup is None and args.batch_size > DIGITS:
        parser.error(
            f"--batch-size must be <= {DIGITS} (the digits data set); "
            f"got {args.batch_size}."
        )
    if args.device is not None:
        try:
            device = torch.device(args.device)
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            parser.error(f"--device {args.device!r} is not usable here: {reason}")
    problem = output_problem(args.out, args.overwrite)
    if problem:
        parser.error(problem)


def main(argv: list[str] | None = None) -> int:
    """Run ``lowrank-ggn`` with ``argv`` (default: ``sys.argv[1:]``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    threads = torch.get_num_threads()
    if args.setup is None and "OMP_NUM_THREADS" not in os.environ:
        # the zoo's tensors are tiny: intra-op threads cost more than they gain
        # (3-4x slower with 2 threads on a busy 2-core machine)
        torch.set_num_threads(1)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    if args.setup is not None:
        problems = [setup_problem(args.setup, args)]
        data = "your data"
    else:
        names = args.model or list(DEFAULT_MODELS)
        problems = [zoo_problem(n, args) for n in dict.fromkeys(names)]
        data = "8x8 digits (scikit-learn)"
    first = problems[0]
    param = next(first.model.parameters())
    report: dict[str, Any] = {
        "settings": {
            "version": __version__,
            "torch": torch.__version__,
            "models": [p.name for p in problems],
            "data": data,
            "batch_size": first.inputs.shape[0],
            "loss": args.loss if args.setup is None else repr(first.loss_func),
            "dtype": str(param.dtype).removeprefix("torch."),
            "device": str(param.device),
            "seed": args.seed,
            "top_k": args.top_k,
            "mc_samples": args.mc_samples,
            "subsampling": args.subsampling,
            "per_layer": args.per_layer,
            "setup": args.setup,
            "threads": torch.get_num_threads(),
        },
        "models": {p.name: analyse(p, args) for p in problems},
    }
    report["seconds_total"] = time.perf_counter() - t_start
    written = write_outputs(report, args.out)
    print(format_report(report))
    print("wrote         " + ", ".join(str(p) for p in written))
    return 0


__all__ = ["build_parser", "main"]
