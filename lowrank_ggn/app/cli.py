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

Run ``lowrank-ggn --help`` for the options.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lowrank_ggn import (
    __version__,
    audit_structure,
    directional_derivatives,
    ggn_spectrum,
    gradient_moments,
)
from lowrank_ggn.app.models import NUM_CLASSES, ZOO, build_model, num_params
from lowrank_ggn.app.report import format_report, write_outputs

#: Models of the default run: without normalisation, and with BatchNorm (train mode).
DEFAULT_MODELS = ("cnn", "cnn-bn")
#: SGD steps of the default run before the spectrum is computed.
DEFAULT_TRAIN_STEPS = 150
#: Learning rate and momentum of that SGD, and its mini-batch size.
LEARNING_RATE, MOMENTUM, TRAIN_BATCH = 0.05, 0.9, 64
#: The brute-force check is skipped beyond this many entries of the dense Jacobian.
DENSE_BUDGET = 4_000_000

EPILOG = r"""
examples:
  lowrank-ggn                                  # default: cnn and cnn-bn, N=64, float64
  lowrank-ggn --out results                    # output folder (created)
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
    parser.add_argument(
        "--batch-size",
        type=int,
        default=64,
        metavar="N",
        help="samples in the batch whose GGN is computed (default 64; e.g. --batch-size 32)",
    )
    parser.add_argument(
        "--loss",
        choices=("ce", "mse"),
        default="ce",
        help="ce: CrossEntropyLoss on labels; mse: MSELoss on one-hot labels; "
        "both with reduction 'mean' (default ce; e.g. --loss mse)",
    )
    parser.add_argument(
        "--mc-samples",
        type=int,
        default=None,
        metavar="M",
        help="Monte-Carlo GGN with M sampled loss-Hessian columns per sample "
        "(seeded by --seed); default: exact (e.g. --mc-samples 1)",
    )
    parser.add_argument(
        "--subsampling",
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
    parser.add_argument(
        "--top-k",
        type=int,
        default=5,
        metavar="K",
        help="top eigenvalues to print and eigenvectors to compute (default 5; e.g. --top-k 10)",
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
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of model initialisation, batch draw, training order, MC samples "
        "and random sub-sampling (default 0; e.g. --seed 1)",
    )
    parser.add_argument(
        "--train-steps",
        type=int,
        default=None,
        metavar="T",
        help=f"SGD steps (lr {LEARNING_RATE}, momentum {MOMENTUM}, batch "
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
        help="output folder for spectrum.json, figures and eigenvectors "
        "(default results; e.g. --out /tmp/run1)",
    )
    return parser


def _error(parser: argparse.ArgumentParser, message: str) -> None:
    parser.error(message)  # exits with status 2 and the usage line


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("batch_size", "top_k", "mc_samples"):
        value = getattr(args, name)
        if value is not None and value < 1:
            _error(parser, f"--{name.replace('_', '-')} must be >= 1; got {value}.")
    if args.train_steps is not None and args.train_steps < 0:
        _error(parser, f"--train-steps must be >= 0; got {args.train_steps}.")
    if args.setup is not None:
        if args.model is not None:
            _error(parser, "--setup replaces --model; pass one of them.")
        if args.train_steps:
            _error(
                parser,
                "--train-steps trains zoo models on the digits; with --setup, "
                "train your model in the setup function.",
            )
        if ":" not in args.setup:
            _error(parser, f"--setup must be MODULE:FUNCTION; got {args.setup!r}.")


# ----------------------------------------------------------------------------------
# problems: zoo models on digits, or the user's setup
# ----------------------------------------------------------------------------------
@dataclass
class Problem:
    """One model, loss and batch to analyse."""

    name: str
    model: nn.Module
    loss_func: nn.Module
    inputs: Tensor
    targets: Tensor
    origin: str
    training: dict[str, Any] = field(default_factory=dict)


def make_loss(loss: str) -> nn.Module:
    """``CrossEntropyLoss()`` for ``"ce"``, ``MSELoss()`` for ``"mse"`` (mean)."""
    return nn.CrossEntropyLoss() if loss == "ce" else nn.MSELoss()


def digits_targets(labels: Tensor, loss: str, dtype: torch.dtype) -> Tensor:
    """Labels for CE, one-hot ``[N, 10]`` in ``dtype`` for MSE."""
    if loss == "ce":
        return labels
    return nn.functional.one_hot(labels, NUM_CLASSES).to(dtype)


def train(
    model: nn.Module,
    loss: str,
    steps: int,
    seed: int,
    dtype: torch.dtype,
    device: str | torch.device,
    desc: str = "training",
) -> dict[str, Any]:
    """``steps`` SGD steps on the digits (reshuffled epochs, seeded), in place.

    Returns:
        Settings and the loss of the last mini-batch, for the report.

    """
    from tqdm import tqdm

    from lowrank_ggn.app.data import digits_batches

    loss_func = make_loss(loss)
    opt = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
    last = math.nan
    batches = digits_batches(TRAIN_BATCH, steps, seed, dtype, device)
    for X, y in tqdm(
        batches, total=steps, desc=desc, file=sys.stderr, leave=False, disable=None
    ):
        opt.zero_grad(set_to_none=True)
        value = loss_func(model(X), digits_targets(y, loss, dtype))
        value.backward()
        opt.step()
        last = value.item()
    model.zero_grad(set_to_none=True)
    return {
        "steps": steps,
        "optimizer": "SGD",
        "lr": LEARNING_RATE,
        "momentum": MOMENTUM,
        "batch_size": TRAIN_BATCH,
        "final_minibatch_loss": last,
    }


def zoo_problem(name: str, args: argparse.Namespace) -> Problem:
    """Zoo model ``name`` (seeded), trained ``--train-steps``, and a digits batch."""
    from lowrank_ggn.app.data import digits_batch

    dtype = getattr(torch, args.dtype or "float64")
    device = args.device or "cpu"
    steps = DEFAULT_TRAIN_STEPS if args.train_steps is None else args.train_steps
    model = build_model(name, args.seed, dtype, device)
    training = (
        train(model, args.loss, steps, args.seed, dtype, device, f"training {name}")
        if steps
        else {"steps": 0}
    )
    X, labels = digits_batch(args.batch_size, args.seed, dtype, device)
    origin = (
        f"trained for {steps} SGD steps (lr {LEARNING_RATE}, momentum {MOMENTUM}, "
        f"batch {TRAIN_BATCH}), last mini-batch loss {training['final_minibatch_loss']:.3g}"
        if steps
        else "at initialisation (no training)"
    )
    return Problem(
        name,
        model,
        make_loss(args.loss),
        X,
        digits_targets(labels, args.loss, dtype),
        origin,
        training,
    )


def setup_problem(spec: str, args: argparse.Namespace) -> Problem:
    """Call the user's ``MODULE:FUNCTION`` and check what it returns."""
    module_name, _, func_name = spec.partition(":")
    sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise SystemExit(
            f"lowrank-ggn: --setup: cannot import module {module_name!r} ({err}); "
            "run from its folder or add that folder to PYTHONPATH."
        ) from err
    finally:
        sys.path.pop(0)
    func = getattr(module, func_name, None)
    if not callable(func):
        raise SystemExit(
            f"lowrank-ggn: --setup: module {module_name!r} has no function {func_name!r}."
        )
    returned = func()
    ok = (
        isinstance(returned, tuple | list)
        and len(returned) == 3
        and isinstance(returned[0], nn.Module)
        and isinstance(returned[2], tuple | list)
        and len(returned[2]) == 2
    )
    if not ok:
        raise SystemExit(
            f"lowrank-ggn: --setup: {spec}() must return (model, loss_func, "
            f"(inputs, targets)); got {type(returned).__name__}."
        )
    model, loss_func, (X, y) = returned
    if args.dtype is not None:
        dtype = getattr(torch, args.dtype)
        model = model.to(dtype=dtype)
        X = X.to(dtype) if X.is_floating_point() else X
        y = y.to(dtype) if y.is_floating_point() else y
    if args.device is not None:
        model, X, y = model.to(args.device), X.to(args.device), y.to(args.device)
    return Problem(spec, model, loss_func, X, y, f"from --setup {spec}")


# ----------------------------------------------------------------------------------
# analysis of one problem
# ----------------------------------------------------------------------------------
def subsampling_indices(
    spec: str | None, batch_size: int, seed: int
) -> list[int] | None:
    """``None``, ``K`` random positions (seeded) or the listed positions."""
    if spec is None:
        return None
    text = spec.strip()
    try:
        if "," in text:
            idx = [int(s) for s in text.split(",") if s.strip()]
        else:
            k = int(text)
            if not 1 <= k <= batch_size:
                raise SystemExit(
                    f"lowrank-ggn: --subsampling {k} must lie in [1, {batch_size}] "
                    "(the batch size)."
                )
            gen = torch.Generator().manual_seed(seed)
            idx = sorted(torch.randperm(batch_size, generator=gen)[:k].tolist())
    except ValueError as err:
        raise SystemExit(
            f"lowrank-ggn: --subsampling must be an integer or a comma-separated "
            f"list of batch positions; got {spec!r}."
        ) from err
    bad = [i for i in idx if not 0 <= i < batch_size]
    if bad or not idx:
        raise SystemExit(
            f"lowrank-ggn: --subsampling positions must lie in [0, {batch_size}); got {spec!r}."
        )
    return idx


def layer_groups(model: nn.Module) -> list[dict[str, Any]]:
    """One group per module owning trainable parameters: ``{"name", "params"}``."""
    groups = []
    for name, module in model.named_modules():
        params = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if params:
            groups.append({"name": name or "<root>", "params": params})
    return groups


def _approximation_kwargs(args: argparse.Namespace, problem: Problem) -> dict[str, Any]:
    """Keyword arguments of ``ggn_spectrum`` for ``--mc-samples``/``--subsampling``."""
    kwargs: dict[str, Any] = {}
    if args.mc_samples is not None:
        device = next(problem.model.parameters()).device
        kwargs["mc_samples"] = args.mc_samples
        kwargs["generator"] = torch.Generator(device=device).manual_seed(args.seed)
    idx = subsampling_indices(args.subsampling, problem.inputs.shape[0], args.seed)
    if idx is not None:
        kwargs["subsampling"] = idx
    return kwargs


def _layer_mass(model: nn.Module, vectors: Tensor) -> dict[str, list[float]]:
    """Fraction of ``‖e_k‖²`` in each parameter tensor, per eigenvector ``e_k``."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    sizes = [p.numel() for p in model.parameters() if p.requires_grad]
    blocks = vectors.split(sizes, dim=1)  # [k, D] -> [k, D_p] per parameter
    return {n: b.pow(2).sum(1).tolist() for n, b in zip(names, blocks)}


def _dense_check(
    problem: Problem, evals: Tensor, vectors: Tensor | None, exact: bool
) -> dict[str, Any]:
    """Trace and ``G e = λ e`` against the brute-force dense GGN, if affordable."""
    from lowrank_ggn.reference import dense_ggn, dense_outputs

    D = num_params(problem.model)
    entries = dense_outputs(problem.model, problem.inputs).numel() * D  # N·O·D
    total = evals.sum().item()
    check: dict[str, Any] = {"sum_eigenvalues": total, "method": "dense_ggn"}
    if entries > DENSE_BUDGET:
        check.update(
            dense_trace=None,
            note=f"skipped: the dense Jacobian would have N·O·D = {entries:,} entries "
            f"(> {DENSE_BUDGET:,})",
        )
        return check
    t0 = time.perf_counter()
    G = dense_ggn(problem.model, problem.loss_func, problem.inputs, problem.targets)
    trace = G.trace().item()
    check["dense_trace"] = trace
    check["relative_difference"] = abs(total - trace) / max(abs(trace), 1e-300)
    check["exact"] = exact
    if exact and vectors is not None and vectors.numel():
        lam = evals[: vectors.shape[0]]
        residual = (G @ vectors.T - vectors.T * lam).norm(dim=0).max().item()
        check["max_eigenvector_residual_rel"] = residual / lam[0].item()
    check["seconds"] = time.perf_counter() - t0
    return check


def structure_and_moments(
    problem: Problem, vectors: Tensor | None
) -> tuple[dict[str, Any], list[str]]:
    """Structure audit, gradient moments and directional derivatives of one problem.

    Directional derivatives are taken along ``vectors`` (the top GGN eigenvectors).
    Per-component quantities of a sample-mixing model raise a
    :class:`lowrank_ggn.SampleMixingWarning`, which the caller records.

    Returns:
        ``(JSON entries, report lines)``.
    """
    model, loss_func, X, y = (
        problem.model,
        problem.loss_func,
        problem.inputs,
        problem.targets,
    )
    t0 = time.perf_counter()
    audit = audit_structure(model, loss_func, X, y)
    moments = gradient_moments(model, loss_func, X, y)
    entries: dict[str, Any] = {
        "structure_audit": {
            "sample_independent": audit.sample_independent,
            "mixing_modules": list(audit.mixing_modules),
            "deterministic": audit.deterministic,
            "checks": {c.name: c.holds for c in audit.checks},
            "text": str(audit),
        },
        "gradient_moments": {
            "gradient_norm": moments.gradient.norm().item(),
            "mean_component_norm": moments.norms.mean().item(),
            "total_snr": moments.total_snr.item(),
            "sample_mixing": moments.sample_mixing,
        },
        "directional": None,
    }
    lines = ["  structure"]
    table = str(audit).split("\n\nhow checked:")[0].split("\n\n", 1)[-1]
    lines += ["    " + row for row in table.splitlines()]
    kind = "per-component" if moments.sample_mixing else "per-sample"
    lines.append(
        f"  gradient      ‖∇L‖ = {entries['gradient_moments']['gradient_norm']:.4g}; "
        f"{kind} SNR ‖mean‖²/Σvar = {moments.total_snr.item():.4g}"
    )
    if vectors is not None and vectors.shape[0] > 0:
        dd = directional_derivatives(model, loss_func, X, y, vectors)
        entries["directional"] = {
            "gamma_snr": dd.gamma_snr.tolist(),
            "lambda_snr": dd.lambda_snr.tolist(),
            "curvatures": dd.curvatures.tolist(),
        }
        lines.append(
            f"  along e_1..e_{vectors.shape[0]}  {kind} SNR of slopes γ: "
            f"{_fmt_list(dd.gamma_snr.tolist())}; of curvatures λ: "
            f"{_fmt_list(dd.lambda_snr.tolist())}"
        )
    entries["seconds_structure_moments"] = time.perf_counter() - t0
    return entries, lines


def _fmt_list(values: list[float]) -> str:
    return " ".join(f"{v:.3g}" for v in values)


def _warning_text(w: warnings.WarningMessage) -> str:
    return f"{w.category.__name__}: {w.message}"


def analyse(problem: Problem, args: argparse.Namespace) -> dict[str, Any]:
    """Spectrum, top eigenvectors, checks and (optionally) per-layer blocks.

    Returns:
        The model's JSON entry; ``"_vectors"`` holds the eigenvectors (not in JSON).

    """
    model, loss_func, X, y = (
        problem.model,
        problem.loss_func,
        problem.inputs,
        problem.targets,
    )
    approx = _approximation_kwargs(args, problem)
    entry: dict[str, Any] = {
        "origin": problem.origin,
        "training": problem.training,
        "num_params": num_params(model),
        "batch_size": X.shape[0],
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "loss": repr(loss_func),
        "zoo": problem.name in ZOO,
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # torch's own import-time deprecation (first jvp call), not about this run
        warnings.filterwarnings(
            "ignore", "`torch.jit.script` is deprecated", DeprecationWarning
        )
        t0 = time.perf_counter()
        res = ggn_spectrum(model, loss_func, X, y, eigenvectors=args.top_k, **approx)
        entry["seconds_spectrum"] = time.perf_counter() - t0
        top_values = res.eigenvalues[: args.top_k]
        exact_res = None
        if approx:
            exact_res = ggn_spectrum(model, loss_func, X, y)
        blocks = None
        if args.per_layer:
            groups = layer_groups(model)
            t0 = time.perf_counter()
            block_res = ggn_spectrum(
                model,
                loss_func,
                X,
                y,
                param_groups=[{"params": g["params"]} for g in groups],
                **_approximation_kwargs(args, problem),
            )
            entry["seconds_per_layer"] = time.perf_counter() - t0
            blocks = {
                g["name"]: {
                    "num_params": sum(p.numel() for p in g["params"]),
                    "eigenvalues": r.eigenvalues.tolist(),
                    "path": r.path.name,
                }
                for g, r in zip(groups, block_res)
            }
        check = _dense_check(problem, res.eigenvalues, res.eigenvectors, not approx)
        extra, extra_lines = structure_and_moments(problem, res.eigenvectors)
    entry.update(
        eigenvalues=res.eigenvalues.tolist(),
        eigenvalue_errors=res.eigenvalue_errors.tolist(),
        num_nonzero=res.rank,
        num_unresolved=res.num_unresolved,
        accumulate=res.accumulate,
        num_columns=res.num_columns,
        threshold=res.threshold,
        top_eigenvalues=top_values.tolist(),
        top_eigenvector_layer_mass=_layer_mass(model, res.eigenvectors),
        path={
            "name": res.path.name,
            "reason": res.path.reason,
            "mixing_modules": list(res.path.mixing_modules),
        },
        engine={
            "strategy": str(res.engine_report.strategy),
            "solver": str(res.engine_report.solver),
            "passes": dict(res.engine_report.passes),
        },
        trace_check=check,
        approximation={k: v for k, v in approx.items() if k != "generator"} or None,
        **extra,
    )
    if exact_res is not None:
        entry["exact_eigenvalues"] = exact_res.eigenvalues.tolist()
    if blocks is not None:
        entry["blocks"] = blocks
    entry["warnings"] = sorted({_warning_text(w) for w in caught})
    entry["_vectors"] = res.eigenvectors
    entry["_extra_lines"] = extra_lines
    return entry


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
