"""Image and segmentation metrics: PSNR, uint8 conversion, confusion-matrix mIoU.

Every function accepts NumPy arrays or ``jax.Array``s and computes with the
matching library: NumPy in, NumPy out (host-side evaluation loops, no device
transfer); ``jax.Array`` in, ``jax.Array`` out (usable inside ``jax.jit``).

Image convention: float images live in ``[-1, 1]`` (the generators' ``tanh``
range); uint8 images in ``[0, 255]``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "MSE_FLOOR",
    "confusion_matrix",
    "from_uint8",
    "iou_per_class_from_confusion",
    "miou_from_confusion",
    "pixel_accuracy_from_confusion",
    "psnr",
    "psnr_per_image",
    "to_uint8",
]

#: Lower bound on the per-image MSE in :func:`psnr_per_image`, so identical
#: images give a large finite PSNR instead of ``inf`` (``10 * log10(4 / 1e-10)
#: ~= 106 dB`` for ``data_range=2``).
MSE_FLOOR = 1e-10


def _xp(*arrays) -> Any:
    """``jnp`` if any argument is a ``jax.Array`` (or tracer), else ``np``."""
    return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


# -----------------------------------------------------------------------------
# PSNR.
# -----------------------------------------------------------------------------


def psnr_per_image(*, x, y, data_range: float = 2.0, mse_floor: float = MSE_FLOOR):
    """Peak signal-to-noise ratio of each image in a batch, in dB.

    ``PSNR_b = 10 * log10(data_range^2 / max(MSE_b, mse_floor))`` where
    ``MSE_b`` is the mean squared difference over all non-batch axes of image
    ``b``. The floor (default :data:`MSE_FLOOR` = ``1e-10``) keeps identical
    images finite (about 106 dB for ``data_range=2``, 148 dB for ``255``).

    Args:
        x: ``[B, ...]`` batch of images (leading axis is the batch), e.g.
            float ``[B, H, W, C]`` in ``[-1, 1]`` (``data_range=2``) or uint8
            in ``[0, 255]`` (``data_range=255``). Integer inputs are cast to
            float32 before subtracting, so uint8 does not wrap around.
        y: Same shape as ``x``.
        data_range: ``max - min`` of the value range: ``2.0`` for ``[-1, 1]``,
            ``255`` for uint8, ``1.0`` for ``[0, 1]``.
        mse_floor: Lower bound on the MSE.

    Returns:
        float32 ``[B]`` array of PSNR values.
    """
    xp = _xp(x, y)
    x = xp.asarray(x).astype(xp.float32)
    y = xp.asarray(y).astype(xp.float32)
    if x.shape != y.shape:
        raise ValueError(f"psnr: shapes differ, {x.shape} vs {y.shape}.")
    if x.ndim < 2:
        raise ValueError(f"psnr expects a batch [B, ...], got shape {x.shape}.")
    mse = xp.mean(xp.square(x - y), axis=tuple(range(1, x.ndim)))
    mse = xp.maximum(mse, xp.float32(mse_floor))
    return (10.0 * xp.log10(xp.float32(data_range) ** 2 / mse)).astype(xp.float32)


def psnr(*, x, y, data_range: float = 2.0, mse_floor: float = MSE_FLOOR):
    """Mean over the batch of :func:`psnr_per_image` (float32 scalar).

    Note: this is the mean of per-image PSNRs (the usual convention), not the
    PSNR of the batch-wide MSE.
    """
    values = psnr_per_image(x=x, y=y, data_range=data_range, mse_floor=mse_floor)
    return _xp(values).mean(values)


# -----------------------------------------------------------------------------
# uint8 conversion.
# -----------------------------------------------------------------------------


def to_uint8(x):
    """Float image(s) in ``[-1, 1]`` to uint8 in ``[0, 255]``.

    ``round((x + 1) * 127.5)`` clipped to ``[0, 255]`` (so ``-1 -> 0``,
    ``0 -> 128`` (127.5 rounds half-to-even to 128), ``1 -> 255``); values
    outside ``[-1, 1]`` saturate and NaN maps to 0. Computed in float32 (bf16
    input allowed). A uint8 input is returned unchanged.
    """
    xp = _xp(x)
    x = xp.asarray(x)
    if x.dtype == xp.uint8:
        return x
    y = xp.round((x.astype(xp.float32) + 1.0) * 127.5)
    y = xp.clip(xp.nan_to_num(y, nan=0.0), 0.0, 255.0)
    return y.astype(xp.uint8)


def from_uint8(x, dtype=np.float32):
    """uint8 image(s) in ``[0, 255]`` to ``dtype`` in ``[-1, 1]``: ``x / 127.5 - 1``.

    The arithmetic is done in float32 and then cast to ``dtype`` (e.g.
    ``jnp.bfloat16``).
    """
    xp = _xp(x)
    x = xp.asarray(x).astype(xp.float32)
    return (x / 127.5 - 1.0).astype(dtype)


# -----------------------------------------------------------------------------
# Segmentation: confusion matrix, IoU, pixel accuracy.
# -----------------------------------------------------------------------------


def confusion_matrix(*, preds, labels, num_classes: int, mask=None):
    """Confusion matrix ``cm[i, j] = #{entries with label i predicted as j}``.

    Rows are ground truth, columns predictions. Entries whose label or
    prediction is outside ``[0, num_classes)`` (e.g. the ``255`` "void" label
    of Cityscapes / GTA5, or ``-1``) are not counted, nor are entries where
    ``mask`` is 0/False.

    Args:
        preds: Integer class predictions of any shape (e.g. ``argmax`` of
            ``[B, H, W, C]`` logits, i.e. ``[B, H, W]``).
        labels: Integer ground truth of the same shape.
        num_classes: Number of classes ``C``.
        mask: Optional boolean/0-1 array of the same shape; 0 = ignore.

    Returns:
        ``[C, C]`` integer counts: int64 for NumPy inputs, int32 for JAX (with
        x64 disabled; int32 overflows beyond ~2.1e9 entries, so accumulate
        large evaluations on the host in int64, e.g.
        ``total += np.asarray(cm, np.int64)``).
    """
    xp = _xp(preds, labels, mask)
    preds = xp.asarray(preds).reshape(-1).astype(xp.int32)
    labels = xp.asarray(labels).reshape(-1).astype(xp.int32)
    if preds.shape != labels.shape:
        raise ValueError(f"confusion_matrix: {preds.shape[0]} preds vs {labels.shape[0]} labels.")
    valid = (labels >= 0) & (labels < num_classes) & (preds >= 0) & (preds < num_classes)
    if mask is not None:
        valid = valid & (xp.asarray(mask).reshape(-1) != 0)
    # Invalid entries go to an extra bin C*C that is dropped afterwards (no
    # float weights, so the counts stay exact integers).
    n_bins = num_classes * num_classes
    index = xp.where(valid, labels * num_classes + preds, n_bins)
    if xp is np:
        counts = np.bincount(index, minlength=n_bins + 1).astype(np.int64)
    else:
        counts = jnp.bincount(index, length=n_bins + 1)
    return counts[:n_bins].reshape(num_classes, num_classes)


def iou_per_class_from_confusion(cm):
    """Per-class IoU ``cm[c, c] / (sum_j cm[c, j] + sum_i cm[i, c] - cm[c, c])``.

    Classes with an empty union (absent from both labels and predictions) get
    ``nan``. Returns a float64 (NumPy) / float32 (JAX) ``[C]`` array.
    """
    xp = _xp(cm)
    cm = xp.asarray(cm).astype(xp.float64 if xp is np else xp.float32)
    tp = xp.diagonal(cm)
    union = cm.sum(axis=0) + cm.sum(axis=1) - tp
    return xp.where(union > 0, tp / xp.maximum(union, 1.0), xp.nan)


def miou_from_confusion(cm):
    """Mean IoU over the classes **present in either the labels or the predictions**.

    A class is present if its union ``sum_j cm[c, j] + sum_i cm[i, c] - cm[c, c]``
    is positive; classes absent from both are skipped rather than counted as
    IoU 0 or 1. (A class predicted but never in the labels is present and has
    IoU 0.) For a standard benchmark accumulate ``cm`` over the whole
    evaluation set first, then call this once. Returns ``nan`` if no class is
    present (empty ``cm``).
    """
    xp = _xp(cm)
    iou = iou_per_class_from_confusion(cm)
    present = ~xp.isnan(iou)
    n_present = present.sum()
    total = xp.where(present, iou, 0.0).sum()
    return xp.where(n_present > 0, total / xp.maximum(n_present, 1), xp.nan)[()]


def pixel_accuracy_from_confusion(cm):
    """Overall pixel accuracy ``trace(cm) / sum(cm)``; ``nan`` if ``cm`` is empty."""
    xp = _xp(cm)
    cm = xp.asarray(cm).astype(xp.float64 if xp is np else xp.float32)
    total = cm.sum()
    return xp.where(total > 0, xp.trace(cm) / xp.maximum(total, 1.0), xp.nan)[()]
