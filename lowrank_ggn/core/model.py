r"""A model seen as a pure function of the selected parameters.

:class:`FunctionalModel` wraps an ``nn.Module`` and a list of its parameters
``θ = (θ_1, …, θ_P)`` into the function ``F(θ, X)`` that ``torch.func`` can
differentiate. Each call runs :func:`torch.func.functional_call` (attention on its
composite backend, gradient checkpointing plain: :func:`plain_checkpoints`) on fresh
clones of the module's buffers, so BatchNorm in train mode updates its running statistics on
throw-away copies and the module itself is never written to. Parameters outside the
selection enter as detached constants.

Flattening convention: a flat parameter vector (length ``D = Σ_p numel(θ_p)``)
concatenates ``θ_p.flatten()`` in the order of ``params``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lowrank_ggn.core.inputs import ModelInputs, as_inputs
from lowrank_ggn.core.outputs import OutputSpec, select_output

#: The model's own name where its modules are named by qualified name.
ROOT = "<root>"


def module_label(name: str) -> str:
    """A module's qualified name as reported: :data:`ROOT` for the model itself."""
    return name or ROOT


def labelled_module(model: nn.Module, label: str) -> nn.Module:
    """The module that :func:`module_label` named ``label``."""
    return model.get_submodule("" if label == ROOT else label)


@contextmanager
def composite_attention() -> Iterator[None]:
    """Scaled-dot-product attention as composite operations (the math backend).

    The fused CPU kernels have neither forward-mode AD, nor double backward, nor
    ``vmap`` batching rules; the math backend computes the same function from
    differentiable, batchable primitives. Every evaluation of
    :class:`FunctionalModel` runs under it.
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # older torch: nothing to switch
        yield
        return
    with sdpa_kernel(SDPBackend.MATH):
        yield


@contextmanager
def plain_checkpoints() -> Iterator[None]:
    """Gradient checkpointing runs its function plainly (activations kept).

    ``torch.utils.checkpoint`` (timm's ``set_grad_checkpointing``, Hugging Face's
    ``gradient_checkpointing_enable``) recomputes a segment's forward pass during the
    backward pass and requires the recomputation to reproduce the saved tensors; the
    engine's backward passes run outside the forward's settings (the capture's
    function mode, the math attention backend), so the recomputation would differ.
    Inside this block both variants (``use_reentrant`` true or false) call the
    function directly, which computes the same function; lowrank_ggn keeps the
    activations for its ``C`` backward passes anyway. The switch is process-wide for
    the duration of the block.
    """
    import torch.utils.checkpoint as ckpt

    def direct(fn, preserve, *args, **kwargs):  # the generator's protocol
        yield

    class Direct:
        @staticmethod
        def apply(fn, preserve, *args):
            return fn(*args)

    saved = ckpt._checkpoint_without_reentrant_generator, ckpt.CheckpointFunction
    ckpt._checkpoint_without_reentrant_generator = direct
    ckpt.CheckpointFunction = Direct
    try:
        yield
    finally:
        ckpt._checkpoint_without_reentrant_generator, ckpt.CheckpointFunction = saved


@contextmanager
def fresh_caches(model: nn.Module) -> Iterator[None]:
    """Every dict attribute named ``*cache*`` of a module is empty inside the block.

    Models cache tensors derived from their parameters (timm's LeViT family:
    ``attention_bias_cache`` in eval mode). A cache filled by the user's own pass
    holds a tensor without the parameter's graph (its curvature would read as zero),
    and one filled by lowrank_ggn's pass would leave a graph-attached tensor in the
    model. Inside the block each such dict is replaced by an empty one, so the
    forward pass computes from the parameters; the user's dict (the same object,
    unchanged) is put back on exit.
    """
    saved = []
    for m in model.modules():
        for name, value in list(vars(m).items()):
            if isinstance(value, dict) and "cache" in name.lower() and not (
                name.startswith("_")
            ):
                if all(isinstance(v, Tensor) for v in value.values()):
                    saved.append((m, name, value))
                    setattr(m, name, {})
    try:
        yield
    finally:
        for m, name, value in saved:
            setattr(m, name, value)


def has_inference_fast_path(model: nn.Module) -> bool:
    """Whether ``model`` holds a module with a fused inference path (attention)."""
    fast = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerEncoder)
    return any(isinstance(m, fast) for m in model.modules())


def samples_in(inputs: Tensor | ModelInputs) -> int:
    """How many samples a call on ``inputs`` processes, vmapped batches included.

    Under :func:`torch.func.vmap` a module sees one sample at a time; the unwrapped
    tensor carries the mapped dimension. For tuple/dict inputs the first split entry
    counts.
    """
    if isinstance(inputs, ModelInputs):
        inputs = inputs.tensors[0]
    n = inputs.shape[0] if inputs.dim() else 1
    try:
        from torch._C._functorch import (
            get_unwrapped,
            is_batchedtensor,
            is_functorch_wrapped_tensor,
            maybe_get_bdim,
        )

        # vmap's batched tensors carry the mapped dimension; vjp/jvp/grad wrap
        # without one
        while is_functorch_wrapped_tensor(inputs):
            bdim = maybe_get_bdim(inputs) if is_batchedtensor(inputs) else None
            inputs = get_unwrapped(inputs)
            if bdim is not None:
                n *= inputs.shape[bdim]
    except (ImportError, AttributeError, RuntimeError):  # private API moved: count 1
        pass
    return n


class FunctionalModel:
    """``F(θ, X)`` for a module and a selection of its parameters.

    Args:
        model: The module. It is called, never modified.
        params: The parameters to differentiate, in the order that defines the
            flattening. Each must be a parameter of ``model``.
        output: Which tensor of the model's return value is ``F``
            (:mod:`lowrank_ggn.core.outputs`).

    """

    def __init__(
        self, model: nn.Module, params: Sequence[Tensor], output: OutputSpec = None
    ) -> None:
        self.model = model
        self.output = output
        self.params = list(params)
        name_of = {}
        for name, p in model.named_parameters(remove_duplicate=True):
            name_of.setdefault(id(p), name)
        self.names = [name_of[id(p)] for p in self.params]
        selected = {id(p) for p in self.params}
        self._frozen = {
            name: p.detach()
            for name, p in model.named_parameters(remove_duplicate=True)
            if id(p) not in selected
        }
        self._buffers = dict(model.named_buffers(remove_duplicate=True))
        self.shapes = [p.shape for p in self.params]
        self.numels = [p.numel() for p in self.params]
        self.num_params = sum(self.numels)
        ref = self.params[0] if self.params else next(iter(model.parameters()))
        self.dtype, self.device = ref.dtype, ref.device
        #: Samples processed by all calls so far (a full-batch pass adds ``N``).
        self.samples_processed = 0

    def restricted(self, params: Sequence[Tensor]) -> FunctionalModel:
        """The same model and output selection as a function of other ``params``."""
        return FunctionalModel(self.model, params, self.output)

    def detached_copy(self) -> FunctionalModel:
        """The same function of frozen copies of every tensor it reads.

        Parameters become new leaf tensors (``requires_grad=True``), frozen parameters
        and buffers are cloned, so later in-place changes to the module do not reach
        the copy, and differentiating the copy never touches the module.
        """
        twin = copy.copy(self)
        twin.params = [p.detach().clone().requires_grad_(True) for p in self.params]
        twin._frozen = {n: t.detach().clone() for n, t in self._frozen.items()}
        twin._buffers = {
            n: None if b is None else b.detach().clone()
            for n, b in self._buffers.items()
        }
        return twin

    def primals(self) -> tuple[Tensor, ...]:
        """The selected parameters, detached (shared storage, no grad tracking)."""
        return tuple(p.detach() for p in self.params)

    def __call__(
        self, theta: Sequence[Tensor], inputs: Tensor | ModelInputs
    ) -> Tensor:
        """Evaluate ``F(θ, X)`` on the whole batch ``inputs``.

        ``inputs``: a tensor ``[N, *in]``, or tuple/dict entries as
        :class:`~lowrank_ggn.core.inputs.ModelInputs`.
        """
        inputs = as_inputs(inputs)
        self.samples_processed += samples_in(inputs)
        state = dict(self._frozen)
        state.update({n: b.clone() for n, b in self._buffers.items() if b is not None})
        state.update(zip(self.names, theta))
        args, kwargs = inputs.call_args()
        with composite_attention(), plain_checkpoints(), fresh_caches(self.model):
            result = functional_call(self.model, state, args, kwargs, tie_weights=True)
        return select_output(result, self.output)

    def evaluate(self, inputs: Tensor | ModelInputs) -> Tensor:
        """``F(θ, X)`` without a graph, through the kernels the recorded pass takes.

        ``nn.MultiheadAttention`` and ``nn.TransformerEncoder(Layer)`` in eval mode
        switch to fused inference kernels (nested tensors for padding masks, whose
        padded positions come out as zeros) when no gradient is required: for models
        with them the pass runs on the live parameters with grad enabled, as the
        recorded pass does, and its graph is dropped; otherwise under ``no_grad``.
        """
        if has_inference_fast_path(self.model):
            with torch.enable_grad():
                return self(tuple(self.params), inputs).detach()
        with torch.no_grad():
            return self(self.primals(), inputs)

    def single(self, theta: Sequence[Tensor], x: ModelInputs) -> Tensor:
        """Evaluate the model on one sample (split entries ``[*in]``): ``[*out]``."""
        return self(theta, x.unsqueezed()).squeeze(0)

    def flatten(self, tensors: Sequence[Tensor], batch_dims: int = 0) -> Tensor:
        """Concatenate per-parameter tensors into ``[*batch, D]`` in ``params`` order."""
        # reshape, not flatten: a 0-dim parameter has no dimension to start from
        return torch.cat(
            [t.reshape(*t.shape[:batch_dims], -1) for t in tensors], dim=-1
        )

    def unflatten(self, flat: Tensor) -> tuple[Tensor, ...]:
        """Split ``[*batch, D]`` back into per-parameter tensors ``[*batch, *θ_p.shape]``."""
        batch = flat.shape[:-1]
        chunks = torch.split(flat, self.numels, dim=-1)
        return tuple(c.reshape((*batch, *s)) for c, s in zip(chunks, self.shapes))
