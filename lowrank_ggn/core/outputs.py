r"""Which tensor of a model's return value the loss sees: the ``output=`` argument.

Models from Hugging Face transformers return a ``ModelOutput`` (a dict with attribute
access), others a dict or a tuple. lowrank_ggn linearises the one tensor ``F(θ, X)``
``[N, *out]`` that the loss takes, chosen by ``output``:

==================  ==============================================================
``output``          the tensor
==================  ==============================================================
``None`` (default)  a tensor as returned; from a dict or ``ModelOutput`` its
                    ``"logits"``, else its only tensor value; from a tuple or list
                    its only tensor element; anything else is refused, naming the
                    choices
``"key"``           ``result["key"]`` (a dict or ``ModelOutput``)
``i`` (an int)      ``result[i]`` (a tuple, list or ``ModelOutput``)
a callable          ``output(result)``
==================  ==============================================================

The choice is checked once, at the public entry (:func:`check_output`); the selection
runs on every evaluation of the model (:class:`~lowrank_ggn.core.model.FunctionalModel`),
the dense reference's included.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import Tensor

#: What ``output=`` accepts.
OutputSpec = str | int | Callable[[object], Tensor] | None


def check_output(output: object) -> None:
    """Raise a ``TypeError`` unless ``output`` is ``None``, a str, an int or a callable."""
    if output is None or isinstance(output, (str, int)) or callable(output):
        if not isinstance(output, bool):
            return
    raise TypeError(
        "output must be None (a tensor, or the 'logits' / only tensor of a dict, "
        "ModelOutput or tuple), a key (str), an index (int) or a callable "
        f"result -> Tensor; got {type(output).__name__}."
    )


def _tensor_fields(result: object) -> list[str]:
    if isinstance(result, Mapping):
        return [repr(k) for k, v in result.items() if isinstance(v, Tensor)]
    return [str(i) for i, v in enumerate(result) if isinstance(v, Tensor)]


def _refuse(result: object, why: str) -> ValueError:
    name = type(result).__name__
    if isinstance(result, (Mapping, tuple, list)):
        fields = ", ".join(_tensor_fields(result)) or "none"
        return ValueError(
            f"the model returned a {name} ({why}); its tensor fields are {fields}. "
            "Pass output=<key or index> (or a callable result -> Tensor) to choose "
            "the tensor the loss takes."
        )
    return ValueError(
        f"the model returned a {name}, not a Tensor; pass output=<callable> that "
        "returns the tensor the loss takes."
    )


def select_output(result: object, output: OutputSpec = None) -> Tensor:
    """The tensor of ``result`` that ``output`` names (module docstring).

    Example:
        >>> import torch
        >>> out = {"logits": torch.ones(2, 3), "hidden": torch.zeros(2, 4)}
        >>> assert select_output(out) is out["logits"]
        >>> assert select_output(out, "hidden") is out["hidden"]
        >>> assert select_output((torch.ones(1), None)).shape == (1,)
    """
    if output is None:
        if isinstance(result, Tensor):
            return result
        if isinstance(result, Mapping):
            if isinstance(result.get("logits"), Tensor):
                return result["logits"]
            found = [v for v in result.values() if isinstance(v, Tensor)]
        elif isinstance(result, (tuple, list)):
            found = [v for v in result if isinstance(v, Tensor)]
        else:
            raise _refuse(result, "no tensor")
        if len(found) != 1:
            raise _refuse(result, f"{len(found)} tensors and no 'logits'")
        return found[0]
    if callable(output) and not isinstance(output, (str, int)):
        picked = output(result)
    else:
        try:
            picked = result[output]
        except (KeyError, IndexError, TypeError) as err:
            raise _refuse(
                result, f"output={output!r} is not one of its fields"
            ) from err
    if not isinstance(picked, Tensor):
        raise _refuse(result, f"output={output!r} selects a {type(picked).__name__}")
    return picked


__all__ = ["OutputSpec", "check_output", "select_output"]
