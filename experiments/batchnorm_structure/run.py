"""What train-mode BatchNorm does to the GGN: shortcut error, moments, outliers, classes.

On the zoo's digits ``cnn-bn`` with BatchNorm in train mode (and ``cnn`` without
BatchNorm for comparison), trained with seeded SGD, float64, cross-entropy, ``C = 10``:

(a) **Per-sample shortcut.** The exact train-mode GGN (:func:`lowrank_ggn.ggn_spectrum`,
    Jacobians through the batch statistics) against the GGN of the same network with
    its statistics frozen at the batch's values (an eval-mode copy whose running
    statistics are the batch mean and biased variance: the same forward pass, but
    ``∂(μ, σ²)/∂θ`` and the coupling between samples dropped), as ``N`` grows: top-k
    eigenvalue errors, trace error and top-C eigenspace overlap. Where vivit is
    installed, its spectrum of the train-mode network is compared with both at a
    small ``N`` (is the shortcut what it computes?).
(b) **Gradient moments.** :func:`lowrank_ggn.gradient_moments` of the train-mode
    network (per-component gradients ``r_n = J_θF_nᵀ ∂L/∂F_n``) against those of the
    frozen copy (per-sample gradients), with :func:`lowrank_ggn.audit_structure`'s
    explanation of what the per-component rows are.
(c) **Outliers.** Exact train-mode GGN spectra with and without BatchNorm, over
    several seeds, at initialisation and after training: the top eigenvalues against
    the bulk (``λ_1 / λ_median``, ``λ_C / λ_{C+1}``, the top-C share of the trace).
    Ghorbani, Krishnan & Xiao (ICML 2019, https://arxiv.org/abs/1901.10159) report that
    BatchNorm removes the *Hessian's* outliers; this measures the GGN.
(d) **Class structure** (Papyan, 2020, https://arxiv.org/abs/2008.11865). The overlap
    ``‖P_A P_B‖_F² / C`` of the top-C GGN eigenspace with the span of the C class-mean
    gradients ``m_c = mean_{n: y_n = c} u_n`` (per-component with train-mode
    BatchNorm); ``C / D`` for a random subspace.

    python experiments/batchnorm_structure/run.py [--quick] [--out PATH]
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # experiments/_common.py

from _common import (  # noqa: E402
    frozen_statistics_copy,
    installed,
    run_main,
    subspace_overlap,
    train_steps,
)

from lowrank_ggn import (  # noqa: E402
    GradientMoments,
    SampleMixingWarning,
    audit_structure,
    ggn_spectrum,
    gradient_moments,
)
from lowrank_ggn.app.data import digits_batch, digits_batches  # noqa: E402
from lowrank_ggn.app.models import build_model, num_params  # noqa: E402

SEED = 0
FULL = {
    "train_steps": 150,
    "lr": 0.05,
    "momentum": 0.9,
    "train_batch": 64,
    "shortcut_batch_sizes": [4, 8, 16, 32, 64, 128, 256],
    "vivit_batch_size": 8,
    "vivit_max_batch_size": 256,
    "moments_batch_size": 128,
    "outlier_batch_size": 128,
    "outlier_seeds": [0, 1, 2],
    "class_batch_size": 256,
    "top_k": 10,
}
QUICK = {
    "train_steps": 2,
    "lr": 0.05,
    "momentum": 0.9,
    "train_batch": 16,
    "shortcut_batch_sizes": [4, 8],
    "vivit_batch_size": 4,
    "vivit_max_batch_size": 8,
    "moments_batch_size": 8,
    "outlier_batch_size": 8,
    "outlier_seeds": [0],
    "class_batch_size": 20,
    "top_k": 3,
}
C = 10
LOSS = nn.CrossEntropyLoss()


def trained(name: str, seed: int, s: dict, steps: int | None = None) -> nn.Module:
    model = build_model(name, seed, torch.float64)
    steps = s["train_steps"] if steps is None else steps
    if steps:
        batches = digits_batches(s["train_batch"], steps, seed, torch.float64)
        train_steps(model, batches, steps, s["lr"], s["momentum"])
    return model.train()


def rel_errors(approx: torch.Tensor, exact: torch.Tensor, k: int) -> list[float]:
    k = min(k, approx.numel(), exact.numel())
    return ((approx[:k] - exact[:k]).abs() / exact[:k]).tolist()


# ------------------------------------------------------------------------- (a)
def shortcut_error(model: nn.Module, s: dict) -> dict:
    rows = []
    k = s["top_k"]
    for N in s["shortcut_batch_sizes"]:
        X, y = digits_batch(N, SEED, torch.float64)
        exact = ggn_spectrum(model, LOSS, X, y, eigenvectors=k, progress=False)
        frozen = frozen_statistics_copy(model, X)
        with torch.no_grad():
            same_forward = float((frozen(X) - model(X)).abs().max())
        short = ggn_spectrum(frozen, LOSS, X, y, eigenvectors=k, progress=False)
        kk = min(k, exact.rank, short.rank)
        viv = None
        if installed("vivit", "backpack") and N <= s["vivit_max_batch_size"]:
            viv = vivit_nonzero(model, X, y)
        rows.append(
            {
                "N": N,
                "num_columns": exact.num_columns,
                "exact_path": exact.path.name,
                "shortcut_path": short.path.name,
                "forward_max_abs_diff": same_forward,
                "exact_top": exact.eigenvalues[:k].tolist(),
                "shortcut_top": short.eigenvalues[:k].tolist(),
                "exact_rank": exact.rank,
                "shortcut_rank": short.rank,
                "topk_rel_error": rel_errors(short.eigenvalues, exact.eigenvalues, k),
                "trace_rel_error": float(
                    (short.eigenvalues.sum() - exact.eigenvalues.sum()).abs()
                    / exact.eigenvalues.sum()
                ),
                "topk_overlap": subspace_overlap(
                    exact.eigenvectors[:kk], short.eigenvectors[:kk]
                ),
            }
            | (
                {}
                if viv is None
                else {
                    "vivit_top": viv[:k].tolist(),
                    "vivit_topk_rel_error": rel_errors(viv, exact.eigenvalues, k),
                    "vivit_trace_rel_error": float(
                        (viv.sum() - exact.eigenvalues.sum()).abs()
                        / exact.eigenvalues.sum()
                    ),
                }
            )
        )
        print(
            "shortcut",
            N,
            rows[-1]["topk_rel_error"][0],
            rows[-1]["trace_rel_error"],
            flush=True,
        )
    return {"rows": rows, "vivit": vivit_check(model, s)}


def vivit_nonzero(model: nn.Module, X, y) -> torch.Tensor:
    """vivit's spectrum of the train-mode network (above the same zero threshold)."""
    import copy

    from _peers_vivit import vivit_eigenvalues

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # BackPACK's backward-hook notice
        viv = vivit_eigenvalues(copy.deepcopy(model), nn.CrossEntropyLoss(), X, y)
    return viv[viv > viv[0] * X.shape[0] * C * torch.finfo(viv.dtype).eps]


def vivit_check(model: nn.Module, s: dict) -> dict:
    """Is vivit's spectrum of the train-mode network the frozen-statistics one?"""
    if not installed("vivit", "backpack"):
        return {"skipped": "vivit-for-pytorch not installed"}
    N = s["vivit_batch_size"]
    X, y = digits_batch(N, SEED, torch.float64)
    exact = ggn_spectrum(model, LOSS, X, y, progress=False).eigenvalues
    short = ggn_spectrum(frozen_statistics_copy(model, X), LOSS, X, y, progress=False)
    short = short.eigenvalues
    viv = vivit_nonzero(model, X, y)

    def dev(a, b):
        n = min(a.numel(), b.numel())
        return float((a[:n] - b[:n]).abs().max() / b[0])

    return {
        "N": N,
        "vivit_top": viv[: s["top_k"]].tolist(),
        "max_rel_dev_vivit_vs_shortcut": dev(viv, short),
        "max_rel_dev_vivit_vs_exact": dev(viv, exact),
        "vivit_rank": int(viv.numel()),
        "shortcut_rank": int(short.numel()),
        "exact_rank": int(exact.numel()),
    }


# ------------------------------------------------------------------------- (b)
def _moments_summary(mom: GradientMoments) -> dict:
    """What the figure and the README read of one :func:`gradient_moments` result."""
    return {
        "total_snr": float(mom.total_snr),
        "norms": mom.norms.tolist(),
        "variance_sum": float(mom.variance.sum()),
        "mean_norm": float(mom.mean.norm()),
        "sample_mixing": mom.sample_mixing,
        "path": mom.path.name,
    }


def moments(model: nn.Module, s: dict) -> dict:
    X, y = digits_batch(s["moments_batch_size"], SEED, torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SampleMixingWarning)
        comp = gradient_moments(model, LOSS, X, y)
        report = audit_structure(model, LOSS, X, y)
    frozen = frozen_statistics_copy(model, X)
    samp = gradient_moments(frozen, LOSS, X, y)
    cos = torch.nn.functional.cosine_similarity(comp.gradient, samp.gradient, dim=0)
    return {
        "N": s["moments_batch_size"],
        "per_component": _moments_summary(comp),
        "per_sample_frozen": _moments_summary(samp),
        "gradient_cosine": float(cos),
        "gradient_rel_diff": float(
            (comp.gradient - samp.gradient).norm() / comp.gradient.norm()
        ),
        "audit": {
            "sample_independent": report.sample_independent,
            "mixing_modules": list(report.mixing_modules),
            "explanation": report.explanation,
            "quantities": [list(q) for q in report.quantities],
        },
        "moments_explanation": comp.explanation,
    }


# ------------------------------------------------------------------------- (c)
def outliers(s: dict) -> list[dict]:
    rows = []
    X, y = digits_batch(s["outlier_batch_size"], SEED, torch.float64)
    for name in ("cnn", "cnn-bn"):
        for seed in s["outlier_seeds"]:
            for steps in (0, s["train_steps"]):
                model = trained(name, seed, s, steps)
                ev = ggn_spectrum(model, LOSS, X, y, progress=False).eigenvalues
                c = min(C, ev.numel() - 1)
                rows.append(
                    {
                        "model": name,
                        "seed": seed,
                        "train_steps": steps,
                        "eigenvalues": ev.tolist(),
                        "top1_over_median": float(ev[0] / ev.median()),
                        "gap_C_over_C1": float(ev[c - 1] / ev[c]),
                        "topC_trace_share": float(ev[:c].sum() / ev.sum()),
                        "largest_gap_top20": {
                            "index": int((ev[:20] / ev[1:21]).argmax()) + 1,
                            "ratio": float((ev[:20] / ev[1:21]).max()),
                        },
                    }
                )
    return rows


# ------------------------------------------------------------------------- (d)
def class_structure(models: dict[str, nn.Module], s: dict) -> list[dict]:
    X, y = digits_batch(s["class_batch_size"], SEED, torch.float64)
    rows = []
    for name, model in models.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SampleMixingWarning)
            mom = gradient_moments(model, LOSS, X, y, per_component=True)
            spec = ggn_spectrum(
                model, LOSS, X, y, top_k=C, eigenvectors=True, progress=False
            )
        U = mom.per_component / mom.rho
        means = torch.stack([U[y == c].mean(0) for c in range(C) if (y == c).any()])
        D = num_params(model)
        rows.append(
            {
                "model": name,
                "N": s["class_batch_size"],
                "top_c_eigenvalues": spec.eigenvalues.tolist(),
                "overlap_topC_classmeans": subspace_overlap(spec.eigenvectors, means),
                "overlap_top1_classmeans": subspace_overlap(
                    spec.eigenvectors[:1], means
                )
                * means.shape[0],
                "per_direction_in_classmeans": [
                    subspace_overlap(spec.eigenvectors[i : i + 1], means)
                    * means.shape[0]
                    for i in range(spec.eigenvectors.shape[0])
                ],
                "random_baseline": means.shape[0] / D,
                "num_classes_in_batch": int(means.shape[0]),
            }
        )
    return rows


def compute(s: dict) -> dict:
    bn = trained("cnn-bn", SEED, s)
    plain = trained("cnn", SEED, s)
    return {
        "loss": "CrossEntropyLoss(mean)",
        "dtype": "float64",
        "num_params": {"cnn": num_params(plain), "cnn-bn": num_params(bn)},
        "shortcut": shortcut_error(bn, s),
        "moments": moments(bn, s),
        "outliers": outliers(s),
        "class_structure": class_structure({"cnn": plain, "cnn-bn": bn}, s),
    }


if __name__ == "__main__":
    run_main(__doc__, HERE, compute, FULL, QUICK, SEED)
