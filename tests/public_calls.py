"""Every public function as a uniform call, for the state and validation matrices.

Each entry of :data:`PUBLIC_CALLS` is ``(name, call)`` with
``call(model, loss_func, inputs, targets, params)``; ``params`` may be ``None``. To cover
a new public function, append one line here: ``tests/test_state.py`` then asserts for
it that the model survives every scenario bitwise, also when the call fails, and
``tests/test_validation.py`` runs the shared bad inputs through it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn.parameter import is_lazy

from lowrank_ggn import (
    audit_structure,
    directional_derivatives,
    ggn_block_spectra,
    ggn_diagonal,
    ggn_diagonal_dataset,
    ggn_linear_operator,
    ggn_spectrum,
    ggn_spectrum_dataset,
    ggn_trace,
    gradient_moments,
    gram_linear_operator,
    gram_matrix,
    loss_hessian_factors,
    per_layer_groups,
)
from lowrank_ggn.reference import (
    dense_ggn,
    dense_gradient,
    dense_jacobian,
    dense_outputs,
)


def _directions(model, params):
    """Two fixed directions ``[2, D]`` in the parameters' dtype (float64 if none)."""
    chosen = (
        params
        if params is not None
        else [p for p in model.parameters() if p.requires_grad]
    )
    if not isinstance(chosen, (list, tuple)) or any(is_lazy(p) for p in chosen):
        return torch.zeros(2, 1)  # the function must refuse the model or params first
    D = sum(p.numel() for p in chosen if isinstance(p, torch.Tensor))
    ref = next(
        (p for p in chosen if isinstance(p, torch.Tensor) and p.is_floating_point()),
        None,
    )
    dtype = ref.dtype if ref is not None else torch.float64
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, max(D, 1), generator=gen, dtype=dtype)


def _operator_apply(make_operator, m, f, X, y, p):
    op = make_operator(m, f, X, y, params=p)
    return op @ np.ones(op.shape[1])


def _groups(m, p):
    """One group per layer (or per given parameter; bad ``p`` fails as params)."""
    if p is None or not isinstance(p, (list, tuple)):
        return per_layer_groups(m)
    return [{"params": [q]} for q in p if isinstance(q, torch.Tensor)] or [{}]


def _mc_subsampled() -> dict:
    """Two Monte-Carlo samples (a fresh seeded generator each call) and the curvature
    of sample 0 only."""
    gen = torch.Generator().manual_seed(0)
    return {"mc_samples": 2, "generator": gen, "subsampling": [0]}


PUBLIC_CALLS = [
    ("gram_matrix", lambda m, f, X, y, p: gram_matrix(m, f, X, y, params=p)),
    ("ggn_spectrum", lambda m, f, X, y, p: ggn_spectrum(m, f, X, y, params=p)),
    (
        "ggn_spectrum-top_k-eigenvectors",
        lambda m, f, X, y, p: ggn_spectrum(
            m, f, X, y, params=p, top_k=2, eigenvectors=True
        ),
    ),
    (
        "loss_hessian_factors",
        lambda m, f, X, y, p: loss_hessian_factors(f, dense_outputs(m, X, params=p), y),
    ),
    (
        "ggn_spectrum-mc-subsampling",
        lambda m, f, X, y, p: ggn_spectrum(m, f, X, y, params=p, **_mc_subsampled()),
    ),
    (
        "ggn_block_spectra",
        lambda m, f, X, y, p: ggn_block_spectra(
            m, f, X, y, _groups(m, p), params=p, eigenvectors=True
        ),
    ),
    (
        "ggn_spectrum_dataset",
        lambda m, f, X, y, p: ggn_spectrum_dataset(m, f, [(X, y)], params=p),
    ),
    (
        "ggn_linear_operator",
        lambda m, f, X, y, p: _operator_apply(ggn_linear_operator, m, f, X, y, p),
    ),
    (
        "gram_linear_operator",
        lambda m, f, X, y, p: _operator_apply(gram_linear_operator, m, f, X, y, p),
    ),
    (
        "gradient_moments",
        lambda m, f, X, y, p: gradient_moments(
            m, f, X, y, params=p, per_component=True
        ),
    ),
    (
        "directional_derivatives",
        lambda m, f, X, y, p: directional_derivatives(
            m, f, X, y, _directions(m, p), params=p
        ),
    ),
    ("ggn_diagonal", lambda m, f, X, y, p: ggn_diagonal(m, f, X, y, params=p)),
    (
        "ggn_diagonal-mc-subsampling",
        lambda m, f, X, y, p: ggn_diagonal(m, f, X, y, params=p, **_mc_subsampled()),
    ),
    ("ggn_trace", lambda m, f, X, y, p: ggn_trace(m, f, X, y, params=p)),
    (
        "ggn_diagonal_dataset",
        lambda m, f, X, y, p: ggn_diagonal_dataset(m, f, [(X, y)], params=p),
    ),
    ("audit_structure", lambda m, f, X, y, p: audit_structure(m, f, X, y, params=p)),
    ("reference.dense_ggn", lambda m, f, X, y, p: dense_ggn(m, f, X, y, params=p)),
    (
        "reference.dense_gradient",
        lambda m, f, X, y, p: dense_gradient(m, f, X, y, params=p),
    ),
    ("reference.dense_jacobian", lambda m, f, X, y, p: dense_jacobian(m, X, params=p)),
    ("reference.dense_outputs", lambda m, f, X, y, p: dense_outputs(m, X, params=p)),
]

#: Entries that take their parameters as ``param_groups`` (whose errors name
#: ``param_groups``): the bad ``params`` inputs do not apply to them.
GROUPED = {"ggn_spectrum-param_groups"}

#: Entries that report (rather than refuse) an active dropout module.
REPORTS_DROPOUT = {"audit_structure"}

#: Names of entries that do not read the targets (no target errors expected).
TARGETLESS = {"reference.dense_jacobian", "reference.dense_outputs"}

#: Names of entries that accept only the supported losses (the reference accepts
#: any scalar loss, it is brute force).
ENGINE_CALLS = [c for c in PUBLIC_CALLS if not c[0].startswith("reference.")]

CALL_IDS = [name for name, _ in PUBLIC_CALLS]
ENGINE_IDS = [name for name, _ in ENGINE_CALLS]


def _bits(t):
    from lowrank_ggn.core.state import tensor_bits as bits

    return bits(t)


def assert_state_bitwise(before: dict, model) -> None:
    """:func:`utils.assert_state_equal`, but bit for bit (NaN, ``-0.0`` included).

    ``torch.equal`` calls NaN unequal to itself, so models with NaN entries (the
    bad-input tests) need this bitwise comparison of the same recorded state.
    """
    import torch
    from utils import state_of

    after = state_of(model)
    assert before["state"].keys() == after["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(_bits(v), _bits(after["state"][k])), f"entry {k} changed"
    for key in ("modes", "requires_grad", "param_ids", "grad_ids"):
        assert before[key] == after[key], f"{key} changed"
    for g0, g1 in zip(before["grads"], after["grads"]):
        assert (g0 is None) == (g1 is None), ".grad set or removed"
        assert g0 is None or torch.equal(_bits(g0), _bits(g1)), ".grad changed"
