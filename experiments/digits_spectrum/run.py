"""GGN spectra of the zoo on 8x8 digits: BatchNorm in train mode vs eval mode vs none.

For each batch size and each zoo model (trained briefly with SGD, seeded), computes the
exact nonzero GGN spectrum of one digits batch with :func:`lowrank_ggn.ggn_spectrum`:

* no BatchNorm: ``mlp``, ``cnn``;
* BatchNorm in train mode (batch statistics; the full-batch path): ``cnn-bn``,
  ``resnet-bn``;
* the same trained BatchNorm models in eval mode (running statistics; per-sample).

Writes ``results.json`` next to this script (``results_quick.json`` with ``--quick``,
which uses tiny batches and two training steps; the test suite runs it). Plot with
``plot.py``.

    python experiments/digits_spectrum/run.py [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from lowrank_ggn import __version__, ggn_spectrum
from lowrank_ggn.app.data import digits_batch
from lowrank_ggn.app.models import build_model, num_params
from lowrank_ggn.app.training import train

HERE = Path(__file__).resolve().parent
SEED = 0
FULL = {"batch_sizes": [32, 64], "train_steps": 150}
QUICK = {"batch_sizes": [4], "train_steps": 2}
#: (label, zoo model, BN mode); "none" for models without BatchNorm.
VARIANTS = [
    ("mlp", "mlp", "none"),
    ("cnn", "cnn", "none"),
    ("cnn-bn train", "cnn-bn", "train"),
    ("cnn-bn eval", "cnn-bn", "eval"),
    ("resnet-bn train", "resnet-bn", "train"),
    ("resnet-bn eval", "resnet-bn", "eval"),
]


def trained_models(steps: int) -> dict[str, nn.Module]:
    """Each zoo model used by VARIANTS, trained ``steps`` SGD steps in float64."""
    models = {}
    for name in dict.fromkeys(v[1] for v in VARIANTS):
        model = build_model(name, SEED, torch.float64)
        if steps:
            train(model, "ce", steps, SEED, torch.float64, "cpu", f"training {name}")
        models[name] = model
    return models


def compute(settings: dict) -> dict:
    """All spectra as a JSON-ready dict."""
    models = trained_models(settings["train_steps"])
    runs = []
    for N in settings["batch_sizes"]:
        X, y = digits_batch(N, SEED, torch.float64)
        for label, name, mode in VARIANTS:
            model = models[name]
            model.train(mode != "eval")
            t0 = time.perf_counter()
            res = ggn_spectrum(model, nn.CrossEntropyLoss(), X, y)
            runs.append(
                {
                    "label": label,
                    "model": name,
                    "bn_mode": mode,
                    "batch_size": N,
                    "num_params": num_params(model),
                    "eigenvalues": res.eigenvalues.tolist(),
                    "num_nonzero": res.rank,
                    "num_columns": res.num_columns,
                    "path": res.path.name,
                    "path_reason": res.path.reason,
                    "seconds": time.perf_counter() - t0,
                }
            )
            model.train()
    return {
        "settings": {
            **settings,
            "seed": SEED,
            "loss": "CrossEntropyLoss(mean)",
            "dtype": "float64",
            "version": __version__,
        },  # fmt: skip
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run for the tests")
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny tensors: threads cost more than they gain
    out = args.out or HERE / ("results_quick.json" if args.quick else "results.json")
    t0 = time.perf_counter()
    result = compute(QUICK if args.quick else FULL)
    result["seconds_total"] = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out} ({result['seconds_total']:.1f} s)")


if __name__ == "__main__":
    main()
