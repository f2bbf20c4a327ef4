r"""The options of one curvature call, checked once and typed: :class:`GGNOptions`.

The public entries (:class:`lowrank_ggn.GGN`, the one-call functions that build it,
:func:`lowrank_ggn.ggn_spectrum_dataset`) take the user's strings and numbers and
build one frozen :class:`GGNOptions` with :meth:`GGNOptions.of`, before any model
call. Every inner function (the linearisation, the engine, the budget checks, the
solvers) takes that object and trusts it: no inner function re-checks an option.

``engine`` folds into :class:`~lowrank_ggn.core.modes.Strategy`: ``engine="generic"``
is ``Strategy.GENERIC`` (explicit ``Vᵀ``), ``engine="layerwise"`` leaves the strategy
to the cost model or to ``strategy=``.

Example:
    >>> opts = GGNOptions.of(engine="generic", accumulate="native", chunk=16)
    >>> assert opts.strategy is Strategy.GENERIC and opts.generic
    >>> assert opts.accumulate is Accumulate.NATIVE and opts.engine == "generic"
    >>> GGNOptions.of(strategy="diagonal")
    Traceback (most recent call last):
    ...
    ValueError: strategy must be None (automatic) or one of ('per_sample', 'bn_split', 'columns', 'streamed', 'generic'); got 'diagonal'.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from lowrank_ggn.core.budget import resolve_memory_budget
from lowrank_ggn.core.loss_sampling import check_mc_samples
from lowrank_ggn.core.modes import Accumulate, PathName, Strategy
from lowrank_ggn.core.outputs import OutputSpec, check_output
from lowrank_ggn.core.validation import check_chunk

#: Columns processed together in one vmapped backward pass, unless overridden.
DEFAULT_CHUNK = 64

#: The values of ``engine=``.
ENGINES = ("layerwise", "generic")

#: The values of ``strategy=`` (``"generic"`` is ``engine="generic"``).
STRATEGIES = tuple(s.value for s in Strategy)


def _choice(name: str, value: str | None, mode: type, hint: str) -> object:
    """``mode(value)`` for a member's string, ``None`` for ``None``; else a clear error."""
    if value is None:
        return None
    try:
        return mode(value)
    except ValueError:
        names = tuple(m.value for m in mode)
        raise ValueError(
            f"{name} must be {hint}one of {names}; got {value!r}."
        ) from None


def strategy_of(
    engine: str = "layerwise", strategy: str | None = None
) -> Strategy | None:
    """The strategy that ``engine`` and ``strategy`` select together (one rule).

    Raises:
        ValueError: For an unknown engine or strategy, and for ``engine="generic"``
            with a layer-wise strategy.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}; got {engine!r}.")
    chosen = _choice("strategy", strategy, Strategy, "None (automatic) or ")
    if engine == "layerwise":
        return chosen
    if chosen not in (None, Strategy.GENERIC):
        raise ValueError(
            f"strategy applies to engine='layerwise' only; got strategy={strategy!r} "
            "with engine='generic'. Drop strategy or the engine."
        )
    return Strategy.GENERIC


@dataclass(frozen=True)
class GGNOptions:
    """How one batch's curvature is computed; built by :meth:`of`, never re-checked.

    Attributes:
        strategy: The engine's strategy: ``None`` (the cost model chooses),
            a layer-wise one, or ``GENERIC`` (explicit ``Vᵀ``, ``engine="generic"``).
        path: ``None`` (automatic) or the forced path.
        chunk: Columns (rows, directions) per batched pass.
        accumulate: Where the Gram is summed (``None``: float64 for low precision).
        mc_samples: Monte-Carlo factor columns per sample (``None``: exact).
        generator: The Monte-Carlo draws' generator.
        memory_budget: Bytes (resolved: the argument, the environment or 4 GiB).
        progress: Progress bars (``None``: for long computations).
        output: Which tensor of the model's return value the loss takes.
    """

    strategy: Strategy | None = None
    path: PathName | None = None
    chunk: int = DEFAULT_CHUNK
    accumulate: Accumulate | None = None
    mc_samples: int | None = None
    generator: torch.Generator | None = None
    memory_budget: float = float(4 * 2**30)
    progress: bool | None = None
    output: OutputSpec = None

    @classmethod
    def of(
        cls,
        *,
        engine: str = "layerwise",
        strategy: str | None = None,
        path: str | None = None,
        chunk: int = DEFAULT_CHUNK,
        accumulate: str | None = None,
        mc_samples: int | None = None,
        generator: torch.Generator | None = None,
        memory_budget: float | None = None,
        progress: bool | None = None,
        output: OutputSpec = None,
    ) -> GGNOptions:
        """Check the user's options (no model call) and type them.

        Args:
            engine: ``"layerwise"`` (default) or ``"generic"`` (explicit ``Vᵀ``,
                the same as ``strategy="generic"``).
            strategy: Force the engine's strategy: ``None`` (the cost model
                chooses) or a :class:`~lowrank_ggn.core.modes.Strategy` value.
            path: ``None`` (automatic), ``"per_sample"`` or ``"full_batch"``.
            chunk: Columns (rows, directions) per batched pass.
            accumulate: Where the Gram is summed: ``None`` (float64 for float32 and
                lower precision models), ``"float64"`` or ``"native"``
                (:mod:`lowrank_ggn.core.precision`).
            mc_samples: ``M`` Monte-Carlo factor columns per sample instead of the
                ``C`` exact ones: an unbiased estimate of the GGN
                (:func:`lowrank_ggn.core.loss_sampling.sampled_loss_hessian_factors`).
            generator: ``torch.Generator`` for the Monte-Carlo draws.
            memory_budget: Bytes for the Gram matrices, ``S`` and the engine's
                blocks; ``None``: ``LOWRANK_GGN_MEMORY_BUDGET`` or 4 GiB.
            progress: Progress bars on stderr (``None``: for long computations).
            output: Which tensor of the model's return value the loss takes:
                ``None`` (a tensor as returned, or the ``"logits"`` / only tensor
                of a ``ModelOutput``, dict or tuple), a key, an index or a callable
                (:mod:`lowrank_ggn.core.outputs`).

        Raises:
            ValueError, TypeError: Naming the option and what it accepts.
        """
        check_chunk(chunk)
        check_mc_samples(mc_samples, generator)
        check_output(output)
        return cls(
            strategy=strategy_of(engine, strategy),
            path=_choice("path", path, PathName, "None or "),
            chunk=chunk,
            accumulate=_choice(
                "accumulate",
                accumulate,
                Accumulate,
                "None (float64 for float32 models) or ",
            ),
            mc_samples=mc_samples,
            generator=generator,
            memory_budget=resolve_memory_budget(memory_budget),
            progress=progress,
            output=output,
        )

    @classmethod
    def given(
        cls,
        options: GGNOptions | None,
        defaults: dict[str, object] | None = None,
        **keywords: object,
    ) -> GGNOptions:
        """``options`` as passed, else the ``keywords`` through :meth:`of`; not both.

        A public entry that takes ``options=`` next to its option keywords calls
        this: a :class:`GGNOptions` built once (``GGNOptions.of(...)``) can be shared
        by several calls, and a keyword given beside it is an error rather than
        silently ignored.

        Args:
            options: ``None`` or a :class:`GGNOptions`.
            defaults: The entry's own defaults of ``keywords`` where they differ
                from :meth:`of`'s (e.g. ``{"progress": False}``).
            keywords: The entry's option keywords, as the caller gave them.

        Raises:
            TypeError: ``options`` is not a :class:`GGNOptions`.
            ValueError: ``options`` and a keyword other than its default were both
                given.

        Example:
            >>> opts = GGNOptions.of(accumulate="native")
            >>> GGNOptions.given(opts, chunk=DEFAULT_CHUNK) is opts
            True
            >>> GGNOptions.given(opts, chunk=8)
            Traceback (most recent call last):
            ...
            ValueError: pass the options either as options= or as keywords, not both; got options= and chunk=8. Put them into GGNOptions.of(...).
        """
        if options is None:
            return cls.of(**keywords)
        if not isinstance(options, GGNOptions):
            raise TypeError(
                "options must be None or a GGNOptions (lowrank_ggn.GGNOptions.of(...)); "
                f"got {type(options).__name__}."
            )
        signature = inspect.signature(cls.of).parameters
        own = {name: p.default for name, p in signature.items()} | (defaults or {})
        clash = [
            f"{name}={value!r}"
            for name, value in keywords.items()
            if value is not own[name] and value != own[name]
        ]
        if clash:
            raise ValueError(
                "pass the options either as options= or as keywords, not both; got "
                f"options= and {', '.join(clash)}. Put them into GGNOptions.of(...)."
            )
        return options

    @property
    def generic(self) -> bool:
        """Whether the Gram comes from explicit ``Vᵀ`` (``engine="generic"``)."""
        return self.strategy is Strategy.GENERIC

    @property
    def engine(self) -> str:
        """``"generic"`` or ``"layerwise"``, as the user names the engine."""
        return "generic" if self.generic else "layerwise"


__all__ = ["DEFAULT_CHUNK", "ENGINES", "STRATEGIES", "GGNOptions", "strategy_of"]
