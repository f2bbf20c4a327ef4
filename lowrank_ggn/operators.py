r"""The GGN and its Gram matrix as ``scipy.sparse.linalg.LinearOperator``\ s.

Matrix-free products, for scipy's ``eigsh``, ``cg``, ``lsqr`` and friends:

.. math::
    G v = J^⊤ H J v = V (V^⊤ v), \qquad 𝒢 u = V^⊤ (V u),

with ``H = ∇²_F L = Σ_{n,c} (e_n ⊗ s_nc)(e_n ⊗ s_nc)ᵀ`` from the loss-Hessian factors
``S`` (exact, Monte-Carlo or sub-sampled, as in :func:`lowrank_ggn.ggn_spectrum`):

* ``Vᵀ v``: one Jacobian-vector product ``J v`` (``[N, *out]``, forward mode through
  the whole batch, BatchNorm statistics included), then ``(Vᵀ v)_{nc} = ⟨s_nc, (J v)_n⟩``;
* ``V u``: the cotangent ``w_n = Σ_c u_nc s_nc``, then one vector-Jacobian product
  ``Jᵀ w`` (:meth:`lowrank_ggn.core.linearization.Linearization.apply_factors`).

Cost per product with ``K`` vectors: ``K`` full-batch JVPs and ``K`` full-batch VJPs
(vmapped in chunks of ``chunk``), memory ``O(chunk · D + N·C·O)`` plus the saved
activations of one forward pass; ``G`` (``D × D``) and ``V`` (``D × N·C``) are never
formed. Reference: https://arxiv.org/abs/2106.02624.

**Frozen at creation.** The operator is the GGN at the parameter values, buffers
(BatchNorm running statistics), train/eval modes, inputs, targets and (Monte-Carlo)
factors of the moment it was created: it evaluates the model functionally on detached
*copies* of the parameters and buffers, and re-applies the recorded train/eval modes
for every product, so later changes to the model (an optimizer step, ``model.eval()``)
do not change it. Each product runs inside
:func:`lowrank_ggn.core.state.model_preserved`, so the model is never changed either. It
keeps a reference to the module (its code is re-run) and a copy of ``D`` parameters.

**Dtypes.** Products are computed in the parameters' dtype and device. The operator's
``dtype`` is the NumPy dtype of the parameters; inputs of any real dtype (``float64``
NumPy arrays included) are converted, and results are NumPy arrays of the operator's
dtype on the CPU.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import Tensor, nn

from lowrank_ggn.core.autodiff import batch_jvps
from lowrank_ggn.core.inputs import detached_clone
from lowrank_ggn.core.linearization import Linearization
from lowrank_ggn.core.state import model_preserved


def project_on_factors(lin: Linearization, outputs: Tensor) -> Tensor:
    """``⟨s_jc, w_{n_j}⟩`` for ``w`` ``[K, N, *out]``: ``[K, N_S·C]``, sample-major."""
    NS, C = lin.num_samples, lin.num_columns_per_sample
    picked = outputs[:, lin.sample_index].reshape(outputs.shape[0], NS, -1)
    S = lin.factors.reshape(C, NS, -1)
    return torch.einsum("kno,cno->knc", picked, S).reshape(-1, NS * C)


def factors_transpose_apply(lin: Linearization, vectors: Tensor, chunk: int) -> Tensor:
    """``(Vᵀ v_k)ᵀ`` for rows ``v_k``: ``[K, D] -> [K, N_S·C]``: one JVP each."""
    return project_on_factors(lin, batch_jvps(lin.fmodel, lin.inputs, vectors, chunk))


def frozen_linearization(lin: Linearization) -> Linearization:
    """A copy of ``lin`` over detached copies of parameters, buffers and inputs.

    Its forward and backward passes no longer read the module's tensors, so later
    in-place changes to the model do not affect it.
    """
    return dataclasses.replace(
        lin,
        fmodel=lin.fmodel.detached_copy(),
        inputs=lin.inputs.detached_clone(),
        targets=detached_clone(lin.targets),
        graph=None,
        capture=None,
    )


class TorchLinearOperator(LinearOperator):
    """A symmetric ``LinearOperator`` whose products run in torch on a frozen model.

    Args:
        model: The module (its recorded train/eval modes are re-applied per product).
        size: The operator is ``size × size``.
        apply: ``[K, size] -> [K, size]`` in torch, rows are vectors.
        dtype: Torch dtype of the computation.
        device: Torch device of the computation.

    """

    def __init__(
        self,
        model: nn.Module,
        size: int,
        apply: Callable[[Tensor], Tensor],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
        super().__init__(dtype=np_dtype, shape=(size, size))
        self._model = model
        self._modes = [(m, m.training) for m in model.modules()]
        self._apply = apply
        self._torch_dtype, self._device = dtype, device

    def _matmat(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X)
        if np.iscomplexobj(X):
            raise TypeError("the GGN operators act on real vectors; got complex input.")
        rows = torch.as_tensor(X.T).to(device=self._device, dtype=self._torch_dtype)
        with model_preserved(self._model):
            for module, training in self._modes:
                module.training = training
            out = self._apply(rows.contiguous()).detach()
        return out.T.cpu().numpy().astype(self.dtype, copy=False)

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        return self._matmat(np.asarray(x).reshape(-1, 1)).reshape(-1)

    def _adjoint(self) -> TorchLinearOperator:
        return self  # symmetric


def ggn_operator(model: nn.Module, lin: Linearization, chunk: int) -> LinearOperator:
    r"""The GGN ``G = Jᵀ H J`` of a linearisation as a ``LinearOperator`` ``(D, D)``.

    ``G v = Jᵀ (H (J v))``: one JVP, the loss-Hessian factors and one VJP per vector
    (see module docstring); ``G`` is never formed. Frozen now: it works on copies.
    """
    frozen = frozen_linearization(lin)

    def apply(vectors: Tensor) -> Tensor:
        # J v: [K, N, *out] -> coefficients [K, N_S·C] -> H J v -> Jᵀ H J v: [K, D]
        coefficients = factors_transpose_apply(frozen, vectors, chunk)
        return frozen.apply_factors(coefficients, chunk)

    fm = frozen.fmodel
    return TorchLinearOperator(model, fm.num_params, apply, fm.dtype, fm.device)


def gram_operator(model: nn.Module, lin: Linearization, chunk: int) -> LinearOperator:
    r"""The Gram ``𝒢 = Vᵀ V`` of a linearisation as a ``LinearOperator``.

    ``𝒢 u = Vᵀ (V u)``: one VJP (``V u = Jᵀ(S u)``) and one JVP per vector, without
    forming ``V``; shape ``(N_S·C, N_S·C)`` (``C`` replaced by ``M`` with
    Monte-Carlo factors, ``N_S = |subsampling|``). Frozen now: it works on copies.
    """
    frozen = frozen_linearization(lin)

    def apply(coefficients: Tensor) -> Tensor:
        # V u: [K, D] (one VJP each), then Vᵀ (V u): [K, N_S·C] (one JVP each)
        return factors_transpose_apply(
            frozen, frozen.apply_factors(coefficients, chunk), chunk
        )

    fm = frozen.fmodel
    return TorchLinearOperator(model, frozen.num_columns, apply, fm.dtype, fm.device)


__all__ = ["TorchLinearOperator", "ggn_operator", "gram_operator"]
