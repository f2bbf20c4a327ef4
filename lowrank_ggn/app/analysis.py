r"""The analysis of one problem by ``lowrank-ggn``: spectrum, checks, structure, moments.

:func:`analyse` computes the nonzero GGN spectrum and the top eigenvectors of a
:class:`~lowrank_ggn.app.problems.Problem` from one :class:`lowrank_ggn.GGN` (with
the ``--mc-samples``/``--subsampling`` approximations and the ``--per-layer`` blocks),
checks the sum of the eigenvalues and the eigenvectors against the brute-force dense
GGN where that is affordable (:data:`DENSE_BUDGET`), and adds the structure audit, the
gradient moments and the directional derivatives along the top eigenvectors
(:func:`structure_and_moments`). It returns the model's entry of ``spectrum.json``
(see :mod:`lowrank_ggn.app.report`).
"""

from __future__ import annotations

import argparse
import time
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from lowrank_ggn import GGN, per_layer_groups
from lowrank_ggn.app.models import ZOO, num_params
from lowrank_ggn.app.problems import Problem, subsampling_indices

#: The brute-force check is skipped beyond this many entries of the dense Jacobian.
DENSE_BUDGET = 4_000_000


def _approximation_kwargs(args: argparse.Namespace, problem: Problem) -> dict[str, Any]:
    """Keyword arguments of ``GGN`` for ``--mc-samples``/``--subsampling``."""
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
    ggn: GGN, vectors: Tensor | None
) -> tuple[dict[str, Any], list[str]]:
    """Structure audit, gradient moments and directional derivatives of one problem.

    Directional derivatives are taken along ``vectors`` (the top GGN eigenvectors).
    Per-component quantities of a sample-mixing model raise a
    :class:`lowrank_ggn.SampleMixingWarning`, which the caller records.

    Returns:
        ``(JSON entries, report lines)``.
    """
    t0 = time.perf_counter()
    audit = ggn.audit()
    moments = ggn.moments()
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
        dd = ggn.directional_derivatives(vectors)
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
        ggn = GGN(model, loss_func, X, y, **approx)  # one linearisation serves all
        res = ggn.spectrum(eigenvectors=args.top_k)
        entry["seconds_spectrum"] = time.perf_counter() - t0
        top_values = res.eigenvalues[: args.top_k]
        exact_res = None
        if approx:
            exact_res = GGN(model, loss_func, X, y).spectrum()
        blocks = None
        if args.per_layer:
            groups = per_layer_groups(model)
            t0 = time.perf_counter()
            block_res = ggn.block_spectra([{"params": g["params"]} for g in groups])
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
        extra, extra_lines = structure_and_moments(ggn, res.eigenvectors)
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
        forward_passes=ggn.forward_passes,
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


__all__ = ["DENSE_BUDGET", "analyse", "structure_and_moments"]
