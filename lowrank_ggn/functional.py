r"""One-call functions: thin wrappers over :class:`lowrank_ggn.GGN`, one return type each.

Each builds a :class:`~lowrank_ggn.curvature.GGN` from its arguments and calls one
method; results equal the object's. Use the object when you want several
quantities of the same batch: it linearises once.

The options shared by every function (keyword-only, passed to
:class:`~lowrank_ggn.curvature.GGN`): ``params``, ``mc_samples``, ``generator``,
``subsampling``, ``memory_budget``, ``progress``, ``path``, ``engine``,
``strategy``, ``chunk``, ``accumulate``, ``output`` and ``batch_size``. Their
meaning is documented there and in
:meth:`~lowrank_ggn.core.options.GGNOptions.of`, as are the accepted ``inputs`` (a
tensor, tuple or dict) and losses (any per-sample loss with a mean or sum
reduction).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from scipy.sparse.linalg import LinearOperator
from torch import Tensor, nn

from lowrank_ggn.core.diagonal import GGNDiagonal
from lowrank_ggn.core.spectrum import GGNSpectrum
from lowrank_ggn.curvature import GGN
from lowrank_ggn.diagnostics.directional import DirectionalDerivatives
from lowrank_ggn.diagnostics.moments import GradientMoments


def gram_matrix(
    model: nn.Module, loss_func: nn.Module, inputs: Tensor, targets: Tensor, **options
) -> Tensor:
    r"""The ``[N·C, N·C]`` Gram matrix ``Vᵀ V`` of the mini-batch GGN (:meth:`GGN.gram`).

    Rows are sample-major (``n·C + c``); in the accumulation dtype (float64 for a
    float32 model by default) on the parameters' device. Its nonzero eigenvalues are
    the GGN's, its trace ``tr G``. Works for any model, BatchNorm in train mode
    included.

    Example:
        >>> import torch
        >>> from lowrank_ggn.reference import dense_ggn
        >>> model = torch.nn.Linear(3, 2).double()
        >>> X, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
        >>> K = gram_matrix(model, torch.nn.CrossEntropyLoss(), X, y)
        >>> G = dense_ggn(model, torch.nn.CrossEntropyLoss(), X, y)
        >>> assert K.shape == (8, 8) and torch.allclose(K.trace(), G.trace())

    """
    return GGN(model, loss_func, inputs, targets, **options).gram()


def block_gram_matrices(
    model: nn.Module,
    loss_func: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    param_groups: Sequence[Mapping],
    **options,
) -> list[Tensor]:
    """One Gram ``V_gᵀ V_g`` per parameter group (:meth:`GGN.block_grams`).

    ``param_groups``: ``[{"params": [...]}, …]``, disjoint; the GGN's diagonal
    blocks, all from the same backward passes (:mod:`lowrank_ggn.approx.param_groups`).
    """
    return GGN(model, loss_func, inputs, targets, **options).block_grams(param_groups)


def ggn_spectrum(
    model: nn.Module,
    loss_func: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    top_k: int | None = None,
    eigenvectors: bool | int = False,
    solver: str = "dense",
    rtol: float | None = None,
    **options,
) -> GGNSpectrum:
    r"""Exact nonzero eigenvalues (and eigenvectors) of the mini-batch GGN.

    ``G = Σ_n J_θF_nᵀ (∇²_{F_n} L) J_θF_n`` for the batch loss ``L`` (reduction
    included), through its ``N·C × N·C`` Gram matrix; correct for any model,
    BatchNorm in train mode included. ``top_k``, ``eigenvectors``, ``solver`` and
    ``rtol`` as in :meth:`GGN.spectrum`; the other options as in :class:`GGN`.

    Returns:
        A :class:`~lowrank_ggn.core.spectrum.GGNSpectrum` with
        ``eigenvalue_errors`` and the count of unresolved eigenvalues.

    Example:
        >>> import torch
        >>> from lowrank_ggn.reference import dense_ggn
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4),
        ...                             torch.nn.ReLU(), torch.nn.Linear(4, 2)).double()
        >>> X, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
        >>> res = ggn_spectrum(model, torch.nn.CrossEntropyLoss(), X, y, eigenvectors=True)
        >>> res.path.name
        'full_batch'
        >>> G = dense_ggn(model, torch.nn.CrossEntropyLoss(), X, y)
        >>> assert torch.allclose(res.eigenvalues.sum(), G.trace())
        >>> e = res.eigenvectors
        >>> assert torch.allclose(G @ e.T, e.T * res.eigenvalues)

    """
    ggn = GGN(model, loss_func, inputs, targets, **options)
    return ggn.spectrum(top_k, eigenvectors, solver, rtol)


def ggn_block_spectra(
    model: nn.Module,
    loss_func: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    param_groups: Sequence[Mapping],
    *,
    top_k: int | None = None,
    eigenvectors: bool | int = False,
    rtol: float | None = None,
    **options,
) -> list[GGNSpectrum]:
    """The spectrum of each parameter group's diagonal GGN block (:meth:`GGN.block_spectra`).

    One forward pass and one set of backward passes for all groups; eigenvectors of
    group ``g`` are ``[K, D_g]`` in the group's parameter order.
    """
    ggn = GGN(model, loss_func, inputs, targets, **options)
    return ggn.block_spectra(param_groups, top_k, eigenvectors, rtol)


def ggn_diagonal(
    model: nn.Module, loss_func: nn.Module, inputs: Tensor, targets: Tensor, **options
) -> GGNDiagonal:
    r"""The GGN diagonal ``Σ_{n,c} (J_θF_nᵀ s_nc)²`` per parameter (:meth:`GGN.diagonal`).

    Exact by default, any model, BatchNorm in train mode included; with
    ``mc_samples=M`` (and ``generator``) an unbiased Monte-Carlo estimate.
    ``.per_param`` is shaped like the parameters, ``.flat`` is ``[D]``, ``.trace``
    is ``tr G`` (:mod:`lowrank_ggn.core.diagonal`).

    Example:
        >>> import torch
        >>> from lowrank_ggn.reference import dense_ggn
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4),
        ...                             torch.nn.ReLU(), torch.nn.Linear(4, 2)).double()
        >>> X, y = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1, 0])
        >>> res = ggn_diagonal(model, torch.nn.CrossEntropyLoss(), X, y)
        >>> G = dense_ggn(model, torch.nn.CrossEntropyLoss(), X, y)
        >>> assert torch.allclose(res.flat, G.diagonal())
        >>> res.per_param[0].shape
        torch.Size([4, 3])

    """
    return GGN(model, loss_func, inputs, targets, **options).diagonal()


def ggn_trace(
    model: nn.Module, loss_func: nn.Module, inputs: Tensor, targets: Tensor, **options
) -> Tensor:
    r"""``tr G``, the sum of the GGN's eigenvalues, a 0-dim tensor (:meth:`GGN.trace`).

    The sum of :func:`ggn_diagonal`, without a Gram matrix or its eigenvalues.

    Example:
        >>> import torch
        >>> from lowrank_ggn.reference import dense_ggn
        >>> model = torch.nn.Linear(3, 2).double()
        >>> X, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
        >>> t = ggn_trace(model, torch.nn.CrossEntropyLoss(), X, y)
        >>> assert torch.allclose(t, dense_ggn(model, torch.nn.CrossEntropyLoss(), X, y).trace())

    """
    return GGN(model, loss_func, inputs, targets, **options).trace()


def gradient_moments(
    model: nn.Module,
    loss_func: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    per_component: bool = False,
    **options,
) -> GradientMoments:
    r"""Per-sample (per-component) gradients and their moments (:meth:`GGN.moments`).

    ``u_n`` with ``L = ρ Σ_n ℓ_n``, ``ρ = 1/N`` for ``'mean'``: the mean of the
    ``u_n`` is the batch gradient (:mod:`lowrank_ggn.diagnostics.moments`). Issues a
    :class:`~lowrank_ggn.SampleMixingWarning` if the forward pass mixes samples.

    Example:
        >>> import torch
        >>> from lowrank_ggn.reference import dense_gradient
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
        ...                             torch.nn.Linear(4, 2)).double()
        >>> X, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
        >>> loss = torch.nn.CrossEntropyLoss()
        >>> res = gradient_moments(model, loss, X, y, per_component=True)
        >>> res.per_component.shape, res.sample_mixing
        (torch.Size([5, 26]), False)
        >>> g = dense_gradient(model, loss, X, y)
        >>> assert torch.allclose(res.per_component.sum(0), g)
        >>> assert torch.allclose(res.mean, g)  # reduction='mean': mean of u_n

    """
    ggn = GGN(model, loss_func, inputs, targets, **options)
    return ggn.moments(per_component)


def directional_derivatives(
    model: nn.Module,
    loss_func: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    directions: Tensor | GGNSpectrum,
    **options,
) -> DirectionalDerivatives:
    r"""Per-sample slopes ``γ_nk`` and curvatures ``λ_nk`` (:meth:`GGN.directional_derivatives`).

    ``directions``: ``[K, D]`` (or ``[D]``) in ``params`` order, or a
    :class:`~lowrank_ggn.core.spectrum.GGNSpectrum` with eigenvectors. Issues a
    :class:`~lowrank_ggn.SampleMixingWarning` if the forward pass mixes samples.

    Example:
        >>> import torch, warnings
        >>> from lowrank_ggn import SampleMixingWarning
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4),
        ...                             torch.nn.ReLU(), torch.nn.Linear(4, 2)).double()
        >>> X, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
        >>> loss = torch.nn.CrossEntropyLoss()
        >>> spec = ggn_spectrum(model, loss, X, y, top_k=2, eigenvectors=True)
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always", SampleMixingWarning)
        ...     res = directional_derivatives(model, loss, X, y, spec)
        >>> [w.category.__name__ for w in caught]  # BatchNorm in train mode
        ['SampleMixingWarning']
        >>> res.gammas.shape, res.mixing_modules
        (torch.Size([5, 2]), ('1',))
        >>> assert torch.allclose(res.curvatures, spec.eigenvalues)

    """
    ggn = GGN(model, loss_func, inputs, targets, **options)
    return ggn.directional_derivatives(directions)


def ggn_linear_operator(
    model: nn.Module, loss_func: nn.Module, inputs: Tensor, targets: Tensor, **options
) -> LinearOperator:
    r"""The GGN ``G`` (``D × D``) as a scipy ``LinearOperator`` (:meth:`GGN.linear_operator`).

    Frozen at creation (:mod:`lowrank_ggn.operators`); any model, BatchNorm in train
    mode included.

    Example:
        >>> import numpy as np, torch
        >>> from scipy.sparse.linalg import eigsh
        >>> from lowrank_ggn.reference import dense_ggn
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4),
        ...                             torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
        >>> X, y = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1, 0])
        >>> G = ggn_linear_operator(model, torch.nn.CrossEntropyLoss(), X, y)
        >>> dense = dense_ggn(model, torch.nn.CrossEntropyLoss(), X, y).numpy()
        >>> v = np.random.default_rng(0).standard_normal(G.shape[0])
        >>> assert np.allclose(G @ v, dense @ v)
        >>> assert np.isclose(eigsh(G, k=1)[0][0], np.linalg.eigvalsh(dense)[-1])

    """
    return GGN(model, loss_func, inputs, targets, **options).linear_operator()


def gram_linear_operator(
    model: nn.Module, loss_func: nn.Module, inputs: Tensor, targets: Tensor, **options
) -> LinearOperator:
    r"""The Gram ``Vᵀ V`` as a scipy ``LinearOperator`` (:meth:`GGN.gram_operator`).

    Shape ``(N_S·C, N_S·C)``, rows as in :func:`gram_matrix`; frozen at creation.
    """
    return GGN(model, loss_func, inputs, targets, **options).gram_operator()


__all__ = [  # in the order of the module
    "gram_matrix",
    "block_gram_matrices",
    "ggn_spectrum",
    "ggn_block_spectra",
    "ggn_diagonal",
    "ggn_trace",
    "gradient_moments",
    "directional_derivatives",
    "ggn_linear_operator",
    "gram_linear_operator",
]
