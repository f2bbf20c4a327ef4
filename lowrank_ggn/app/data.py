r"""scikit-learn's bundled 8×8 handwritten digits as tensors (offline, no download).

``sklearn.datasets.load_digits`` ships 1,797 grey-scale images ``8×8`` with pixel
values ``0…16`` and labels ``0…9`` inside the scikit-learn package. They are returned
as ``[N, 1, 8, 8]`` images, standardised with the mean and standard deviation over
all pixels of the whole set, ``x ↦ (x − μ) / σ``, and ``int64`` labels ``[N]``.

scikit-learn is imported lazily, so the core package does not need it
(``pip install lowrank_ggn[plot]`` or ``[test]`` brings it).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

#: Samples in scikit-learn's 8×8 digits: the largest ``--batch-size`` of the zoo.
DIGITS = 1797


def load_digits(
    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[Tensor, Tensor]:
    """All 1,797 digits: images ``[1797, 1, 8, 8]`` (standardised) and labels ``[1797]``.

    Args:
        dtype: Floating dtype of the images.
        device: Device of both tensors.

    Returns:
        ``(images, labels)``; labels are ``int64`` in ``[0, 10)``.

    Raises:
        ImportError: If scikit-learn is not installed, with the command to fix it.

    """
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the digits data come with scikit-learn; install it with "
            "`pip install scikit-learn` (or `pip install -e '.[plot]'`)."
        ) from err
    bunch = _sk_load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float64)  # [1797, 8, 8]
    images = (images - images.mean()) / images.std()
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    return (
        images.unsqueeze(1).to(dtype=dtype, device=device),
        labels.to(device=device),
    )


def digits_batch(
    batch_size: int,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[Tensor, Tensor]:
    """A batch of ``batch_size`` distinct digits drawn without replacement by ``seed``.

    Args:
        batch_size: ``N``, between 1 and 1797.
        seed: Seed of the draw (a private generator; global RNG untouched).
        dtype: Dtype of the images.
        device: Device of both tensors.

    Returns:
        ``(inputs [N, 1, 8, 8], targets [N])``.

    Example:
        >>> X, y = digits_batch(16, seed=3, dtype=torch.float64)
        >>> X.shape, y.shape, X.dtype
        (torch.Size([16, 1, 8, 8]), torch.Size([16]), torch.float64)
        >>> assert torch.equal(y, digits_batch(16, seed=3)[1])

    """
    images, labels = load_digits(dtype, device)
    if not 1 <= batch_size <= images.shape[0]:
        raise ValueError(
            f"batch_size must lie in [1, {images.shape[0]}] for the digits data; "
            f"got {batch_size}."
        )
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(images.shape[0], generator=gen)[:batch_size].to(device)
    return images[idx], labels[idx]


def digits_batches(
    batch_size: int,
    num_batches: int,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Iterator[tuple[Tensor, Tensor]]:
    """``num_batches`` mini-batches for SGD: reshuffled epochs, seeded.

    Yields:
        ``(inputs [B, 1, 8, 8], targets [B])`` with ``B = batch_size``; the data are
        reshuffled at the start of each epoch, the last incomplete batch is dropped.

    """
    images, labels = load_digits(dtype, device)
    total = images.shape[0]
    if not 1 <= batch_size <= total:
        raise ValueError(
            f"batch_size must lie in [1, {total}] for the digits data; got {batch_size}."
        )
    gen = torch.Generator().manual_seed(seed)
    produced = 0
    while produced < num_batches:
        perm = torch.randperm(total, generator=gen).to(device)
        for start in range(0, total - batch_size + 1, batch_size):
            if produced == num_batches:
                return
            idx = perm[start : start + batch_size]
            yield images[idx], labels[idx]
            produced += 1


__all__ = ["digits_batch", "digits_batches", "load_digits"]
