r"""Damped Newton in the top-``K`` GGN eigenspace of each batch, as a ``torch.optim.Optimizer``.

For a batch with loss ``L = ρ Σ_n ℓ_n``, gradient ``g = ∇_θ L`` and top-``K`` GGN
eigenpairs ``(λ_k, e_k)`` (exact for any model, BatchNorm in train mode included):

.. math::
    Δθ = −\text{lr} \sum_{k=1}^K \frac{γ_k}{λ_k + δ_k} e_k
         − \text{complement\_lr} \; m
         − \text{lr} \cdot \text{weight\_decay} \; θ,
    \qquad γ_k = e_k^⊤ g, \qquad c = g − \sum_{k=1}^K γ_k e_k,

with the dampings ``δ_k`` of a policy (:mod:`lowrank_ggn.optim.damping`);
``δ_k = inf`` takes no step along ``e_k``. The first term is Newton's step of the
quadratic model restricted to the eigenspace, the second a gradient step along the
gradient's component ``c`` in the orthogonal complement (``m = c`` without momentum;
with ``momentum = μ > 0`` the heavy-ball buffer ``m ← μ m + c``, one per parameter,
``m = c`` at the first step), the third decoupled weight decay (as in AdamW, at the
parameters before the step). With several parameter groups each group's coordinates
of ``Δθ`` use that group's ``lr``, ``complement_lr``, ``momentum`` and
``weight_decay``.

**torch.optim conventions.** ``lr``, ``complement_lr``, ``momentum``,
``weight_decay`` and ``damping`` (the ``δ`` of :class:`ConstantDamping`, the same in
every group; ``None`` with another policy) are ``param_groups`` entries: learning-rate
schedulers drive ``lr`` (``OneCycleLR`` and ``CyclicLR`` also ``momentum``), and any
of them can be changed between steps by hand or by a scheduler of one's own;
:meth:`DampedNewton.state_dict` restores them, the step count, the momentum buffers
and the damping policy's state (the bootstrap's generator).
``step(inputs, targets)`` is the whole step; in a standard loop the batch goes with
the step, ``opt.step(X, y)`` or ``opt.step(closure, inputs=X, targets=y)`` (the
closure runs first, with gradients enabled, as in ``torch.optim``). **Gradient**: a
``.grad`` that the caller's own ``backward()`` left on the parameters is *used* as
``g`` (``None`` entries count as 0; :attr:`StepInfo.gradient_source` says
``'grad'``), so that regularisers, gradient clipping and accumulation of the caller
apply; without one, ``g`` is the batch loss's gradient from the step's own
linearisation (``'batch'``).

**One linearisation.** Each step builds one :class:`~lowrank_ggn.GGN` and reads
everything from it: the spectrum (Gram engine's backward passes, ``eigh``,
eigenvectors from one batched backward pass), the gradient (one backward pass of the
recorded graph), ``γ_nk`` and ``λ_nk`` from the Gram eigenvectors, no further pass
(:func:`~lowrank_ggn.optim.newton_step.factor_slopes`,
:func:`~lowrank_ggn.optim.newton_step.gram_curvatures`). The step therefore costs
the forward passes of the spectrum alone (:attr:`StepInfo.forward_passes`) and one
more reverse pass through the model. Only where the loss-Hessian factors do not span
the output gradient (Monte-Carlo or autodiff factors, e.g. Huber's linear zone) or
under curvature sub-sampling are ``γ_nk`` ``J e_k`` by double backward on the graph
(two reverse passes more; :attr:`StepInfo.gamma_route`).

**Nothing else changes.** The step writes the parameters in place under
``torch.no_grad()``; ``.grad``, modes and buffers stay as they were. With
``update_buffers=True`` the model runs once more on the batch, as the forward pass of
a training step would (in its current modes, at the parameters before the update,
without graph), so train-mode BatchNorm updates its running statistics.

Reference: Dangel, Tatzel & Hennig, TMLR 2022, https://arxiv.org/abs/2106.02624.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from lowrank_ggn.core.loss_factors import sample_weight
from lowrank_ggn.core.modes import Accumulate
from lowrank_ggn.core.options import GGNOptions
from lowrank_ggn.core.outputs import OutputSpec
from lowrank_ggn.core.validation import check_options
from lowrank_ggn.curvature import GGN
from lowrank_ggn.diagnostics.moments import output_gradient
from lowrank_ggn.diagnostics.warnings import SampleMixingWarning
from lowrank_ggn.optim._groups import (
    apply_step,
    batch_missing,
    check_groups,
    check_rate,
    gradient_left,
)
from lowrank_ggn.optim.damping import ConstantDamping, DampingPolicy, DirectionalData
from lowrank_ggn.optim.newton_step import (
    StepInfo,
    check_damping_output,
    factor_slopes,
    gram_curvatures,
    newton_coefficients,
)
from lowrank_ggn.optim.warnings import NoProgressWarning, warn_top_k

#: Defaults of the constructor, chosen by ``experiments/optimizers/defaults_study.py``
#: (README, "Damped Newton"): with them the final training loss is within 10 % of
#: tuned SGD's or below it on the study's problems.
DEFAULT_TOP_K = 10
DEFAULT_DAMPING = 1.0
DEFAULT_COMPLEMENT_LR = 0.1
DEFAULT_MOMENTUM = 0.9


class DampedNewton(torch.optim.Optimizer):
    r"""Damped Newton steps along the top-``K`` GGN eigenvectors of each batch.

    See the module docstring for the step, its conventions and its cost. The
    defaults train (top-10, ``δ = 1``, ``complement_lr = 0.1`` with ``momentum = 0.9``;
    ``experiments/optimizers/defaults_study.py``); ``complement_lr = 0`` steps in the
    eigenspace alone, which barely trains there.

    Args:
        params: Parameters of ``model`` to optimise (or parameter groups); they define
            ``D`` and the flattening order of the eigenvectors.
        model: The module; only ``params`` are changed by a step.
        loss_func: ``CrossEntropyLoss``, ``MSELoss`` or ``BCEWithLogitsLoss``
            (reduction ``'mean'`` or ``'sum'``).
        top_k: ``K``, the eigen-directions per step (fewer where fewer eigenvalues
            are resolved: a :class:`~lowrank_ggn.optim.TopKWarning`, once).
        damping: A :class:`~lowrank_ggn.optim.damping.DampingPolicy`, or a float for
            :class:`~lowrank_ggn.optim.damping.ConstantDamping`, whose ``δ`` is then
            the param-group entry ``'damping'``.
        lr: Learning rate of the Newton part (default 1: the damped Newton step).
        complement_lr: Learning rate of the gradient in the eigenspace's complement.
        momentum: Heavy-ball momentum ``μ`` of the complement's gradient step.
        weight_decay: Decoupled weight decay: ``θ ← θ − lr · weight_decay · θ``.
        mc_samples, generator: Monte-Carlo factor columns per sample and the
            ``torch.Generator`` of their draws (:class:`~lowrank_ggn.GGN`).
        subsampling: Batch positions whose curvature is kept.
        update_buffers: Run the model once more on the batch so that buffers
            (BatchNorm running statistics) update as in a training step.
        keep_eigenvectors: Keep ``e_k`` (``[K, D]``) in :class:`StepInfo`.
        progress: Progress bars of the Gram engine on stderr (``None``: for steps
            estimated to take more than 5 s; default: never).
        output: Which tensor of the model's return value the loss takes
            (:mod:`lowrank_ggn.core.outputs`).
        options: Instead of ``mc_samples``, ``generator``, ``progress`` and
            ``output``, a :class:`~lowrank_ggn.GGNOptions` for every step's
            :class:`~lowrank_ggn.GGN` (also its engine, strategy, accumulation and
            memory budget); giving both is an error. Kept as ``.options``.

    Example:
        >>> import torch
        >>> from lowrank_ggn.optim import DampedNewton
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
        ...                             torch.nn.Linear(4, 2)).double()
        >>> X, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
        >>> opt = DampedNewton(model.parameters(), model=model, top_k=2,
        ...                    loss_func=torch.nn.CrossEntropyLoss())
        >>> info = opt.step(X, y)
        >>> info.num_directions, info.gammas.shape, info.eigenvectors
        (2, torch.Size([8, 2]), None)
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        *,
        model: nn.Module,
        loss_func: nn.Module,
        top_k: int = DEFAULT_TOP_K,
        damping: DampingPolicy | float = DEFAULT_DAMPING,
        lr: float = 1.0,
        complement_lr: float = DEFAULT_COMPLEMENT_LR,
        momentum: float = DEFAULT_MOMENTUM,
        weight_decay: float = 0.0,
        mc_samples: int | None = None,
        generator: torch.Generator | None = None,
        subsampling: Sequence[int] | Tensor | None = None,
        update_buffers: bool = False,
        keep_eigenvectors: bool = False,
        progress: bool | None = False,
        output: OutputSpec = None,
        options: GGNOptions | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"model must be a torch.nn.Module; got {type(model).__name__}."
            )
        check_options(top_k=top_k)
        if top_k is None:
            raise ValueError("top_k must be a positive int (directions per step).")
        if isinstance(damping, (int, float)) and not isinstance(damping, bool):
            damping = ConstantDamping(float(damping))
        if not callable(damping):
            raise TypeError(
                "damping must be a DampingPolicy (e.g. ConstantDamping(1e-3) or "
                f"BootstrapDamping()) or a float; got {type(damping).__name__}."
            )
        self.options = GGNOptions.given(  # the GGN of every step
            options,
            {"progress": False},
            mc_samples=mc_samples,
            generator=generator,
            progress=progress,
            output=output,
        )
        defaults = {
            "lr": check_rate("lr", lr),
            "complement_lr": check_rate("complement_lr", complement_lr),
            "momentum": check_rate("momentum", momentum),
            "weight_decay": check_rate("weight_decay", weight_decay),
            "damping": (
                damping.damping if isinstance(damping, ConstantDamping) else None
            ),
        }
        super().__init__(params, defaults)
        own = {id(p) for p in model.parameters()}
        self.model, self.loss_func = model, loss_func
        self.top_k, self.damping = top_k, damping
        check_groups(self.param_groups, self.damping)
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) not in own:
                    raise ValueError(
                        f"params must be parameters of model; got a tensor of shape "
                        f"{tuple(p.shape)} that is not. Pass model.parameters() or a "
                        "subset of them."
                    )
        self.subsampling, self.update_buffers = subsampling, bool(update_buffers)
        self.keep_eigenvectors = bool(keep_eigenvectors)
        self._warned_top_k = False

    def _settle_sums(self, used: str, dtype: torch.dtype) -> None:
        """Sum every later step in float64 once a float32 step was summed there.

        Such a step's float32 try fell short (or was not made); summing later steps in
        float64 directly saves a second Gram per step. Under the default
        ``accumulate=None`` a float32 model's top-k spectrum tries float32 sums first
        (:func:`~lowrank_ggn.core.precision.tries_native_sums`); the batches of one
        training run resolve alike, so one fall-back predicts the next.
        """
        if self.options.accumulate is None and dtype == torch.float32:
            if used == Accumulate.FLOAT64.value:
                self.options = replace(self.options, accumulate=Accumulate.FLOAT64)

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _directions(
        self, ggn: GGN, gradient: Tensor | None
    ) -> tuple[Tensor, Tensor, DirectionalData, str]:
        """Gradient, eigenvectors, the policy's data and how ``γ_nk`` were computed."""
        with warnings.catch_warnings():  # the step says per-component once, itself
            warnings.simplefilter("ignore", SampleMixingWarning)
            spec = ggn.spectrum(top_k=self.top_k, eigenvectors=True)
            self._settle_sums(spec.accumulate, spec.eigenvalues.dtype)
            lin = ggn.linearization
            N, N_S = lin.batch_size, lin.num_samples
            rho = sample_weight(lin.loss_func, N)
            g_out = output_gradient(lin)  # [N, *out], reduction included
            if gradient is None:  # [D], one backward pass of the graph
                gradient = lin.vjp(g_out.unsqueeze(0))[0]
            gammas, route = None, "factors"
            if self.subsampling is None:  # γ_nk from the Gram eigenvectors, no pass
                gammas = factor_slopes(
                    lin.factors, g_out, spec.eigenvalues, spec.gram_eigenvectors, rho
                )
            if gammas is None and spec.rank:  # J e_k by double backward on the graph
                gammas, route = ggn.directional_derivatives(spec).gammas, "pushforward"
            elif gammas is None:  # no resolved eigenvalue (a zero GGN)
                gammas = gradient.new_zeros(N, 0)
        E = spec.eigenvectors  # [K, D]
        lambda_rho = sample_weight(lin.loss_func, N_S)
        data = DirectionalData(
            eigenvalues=spec.eigenvalues,
            eigenvectors=E,
            slopes=E @ gradient,
            gammas=gammas,
            lambdas=gram_curvatures(
                spec.eigenvalues, spec.gram_eigenvectors, N_S, lambda_rho
            ),
            rho=rho,
            lambda_rho=lambda_rho,
            paired=self.subsampling is None,
            sample_mixing=lin.path.sample_mixing,
            mixing_modules=lin.path.mixing_modules,
        )
        return gradient, E, data, route

    def step(  # type: ignore[override]
        self,
        *batch: Any,
        closure: Callable[[], Any] | None = None,
        inputs: object = None,
        targets: object = None,
        batch_size: int | None = None,
    ) -> StepInfo:
        r"""One damped Newton step on the batch ``(inputs, targets)``.

        Called as ``step(inputs, targets)``, ``step(closure, inputs, targets)`` or with
        keywords (``step(closure=c, inputs=X, targets=y)``, as Lightning passes them).

        Args:
            *batch: ``(inputs, targets)``, ``(inputs, targets, batch_size)``, or any
                of these after the closure.
            inputs: ``[N, *in]``, or a tuple/dict of entries
                (:mod:`lowrank_ggn.core.inputs`).
            targets: The targets of the batch.
            closure: Called once, with gradients enabled, before the step (as in
                ``torch.optim``); a ``.grad`` its ``backward()`` leaves is the
                step's gradient. Its return value is not used.
            batch_size: ``N`` when the first input entry is not the batched one.

        Returns:
            A :class:`StepInfo` of the quantities at the parameters before the step.

        Raises:
            TypeError: No batch was given.
            ValueError, TypeError: A param group's entry (set after construction, by
                hand or by a scheduler) is not a finite float ≥ 0, or the groups'
                dampings differ; checked before any work, nothing changes.

        Warns:
            TopKWarning: Fewer than ``top_k`` directions are resolved (once).
            NoProgressWarning: The step is zero.
        """
        if batch and callable(batch[0]) and closure is None:
            closure, batch = batch[0], batch[1:]
        if batch:
            if len(batch) not in (2, 3) or inputs is not None or targets is not None:
                raise batch_missing()
            inputs, targets = batch[:2]
            batch_size = batch[2] if len(batch) == 3 else batch_size
        if inputs is None or targets is None:
            raise batch_missing()
        policy = check_groups(self.param_groups, self.damping)
        if closure is not None:
            with torch.enable_grad():
                closure()
        params = self._params()
        caller_gradient = gradient_left(params)
        ggn = GGN(
            self.model,
            self.loss_func,
            inputs,
            targets,
            params=params,
            subsampling=self.subsampling,
            batch_size=batch_size,
            options=self.options,
        )
        gradient, E, data, gamma_route = self._directions(ggn, caller_gradient)
        lin = ggn.linearization
        K = data.eigenvalues.numel()
        if K < self.top_k and not self._warned_top_k:
            self._warned_top_k = True
            warn_top_k(self.top_k, K, lin.num_samples, lin.num_columns_per_sample)
        damping = check_damping_output(policy(data), K, data.eigenvalues)
        coefficients = newton_coefficients(data.slopes, data.eigenvalues, damping)
        newton = coefficients @ E  # [D], Σ_k γ_k/(λ_k + δ_k) e_k
        complement = gradient - data.slopes @ E  # [D], g − Σ_k γ_k e_k
        loss = float(lin.loss_func(lin.outputs, targets))
        forward_passes = ggn.forward_passes
        if self.update_buffers:  # the forward pass of a training step, no graph
            with torch.no_grad():
                args, kwargs = lin.inputs.call_args()
                self.model(*args, **kwargs)
            forward_passes += 1.0
        squared = apply_step(self.param_groups, self.state, newton, complement)
        state = self.state[params[0]]
        state["step"] = state.get("step", 0) + 1
        if squared == 0.0:
            warnings.warn(
                f"the step left the parameters unchanged: "
                f"{int(torch.isfinite(damping).sum())} of {K} directions had a finite "
                "damping (or lr = 0), and the complement's step "
                "and the weight decay were 0. Give complement_lr > 0 (the gradient "
                "outside the eigenspace) or a damping policy that steps.",
                NoProgressWarning,
                stacklevel=3,  # the caller of step (through torch.optim's wrapper)
            )
        return StepInfo(
            loss=loss,
            eigenvalues=data.eigenvalues,
            eigenvectors=E if self.keep_eigenvectors else None,
            slopes=data.slopes,
            gammas=data.gammas,
            lambdas=data.lambdas,
            damping=damping,
            coefficients=coefficients,
            num_directions=int(torch.isfinite(damping).sum()),
            step_norm=math.sqrt(squared),
            gradient_norm=float(gradient.norm()),
            path=lin.path,
            engine_report=ggn.engine_report,
            forward_passes=forward_passes,
            sample_mixing=data.sample_mixing,
            gradient_source="batch" if caller_gradient is None else "grad",
            gamma_route=gamma_route,
        )

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim`` state (groups, step count, buffers) and the policy's state."""
        state = super().state_dict()
        policy_state = getattr(self.damping, "state_dict", None)
        state["damping"] = policy_state() if callable(policy_state) else None
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (the policy's state too, where it has one)."""
        state_dict = dict(state_dict)
        policy_state = state_dict.pop("damping", None)
        super().load_state_dict(state_dict)
        load = getattr(self.damping, "load_state_dict", None)
        if policy_state is not None and callable(load):
            load(policy_state)
        check_groups(self.param_groups, self.damping)


__all__ = [
    "DampedNewton",
    "StepInfo",
    "gram_curvatures",
    "newton_coefficients",
]
