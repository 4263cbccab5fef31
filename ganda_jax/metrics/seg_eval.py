"""Segmentation scores (mIoU, pixel accuracy, per-class IoU) on an in-memory labelled split.

A method exposes ``logits_fn(params, images) -> {name: logits [B, H, W, C]}``
(float images in ``[-1, 1]``; one entry per segmenter to score, e.g. the
adapted one and a source-only baseline). :func:`make_segment_fn` wraps it once
into the per-example function that :func:`ganda_jax.metrics.evaluation.batched_apply`
runs sharded over the mesh: it returns one ``[C, C]`` confusion matrix per
image (rows = ground truth, columns = prediction; pixels labelled
``ignore_index`` are not counted). :func:`miou` sums them on the host in int64
over the whole split, then computes the benchmark scores once from the total
(the standard way: not a mean of per-image IoUs):

    IoU_c = TP_c / (TP_c + FP_c + FN_c),   mIoU = mean of IoU_c over the classes
    present in the labels or the predictions,   pixel accuracy = trace / total.

Every segmenter is scored on the same batches in one pass, and each image
counts exactly once (batched_apply drops the padding).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ganda_jax.metrics import evaluation, image_metrics

LogitsFn = Callable[[Any, Any], Mapping[str, Any]]


def make_segment_fn(
    logits_fn: LogitsFn, *, num_classes: int, ignore_index: int = 255
) -> Callable[[Any, dict], dict]:
    """``fn(params, {'image': uint8, 'label': int [B, H, W]}) -> {name: int32 [B, C, C]}``.

    Logits at another resolution than the labels are resized (bilinear) to it
    first. Create the function once per method and keep it (e.g. in a
    ``functools.cached_property``): batched_apply caches its compilation per
    function object.
    """

    def per_image(preds, labels):
        return image_metrics.confusion_matrix(
            preds=preds, labels=labels, num_classes=num_classes, mask=labels != ignore_index
        )

    def fn(params, batch):
        images = image_metrics.from_uint8(batch["image"], jnp.float32)
        labels = batch["label"].astype(jnp.int32)
        out = {}
        for name, logits in logits_fn(params, images).items():
            if logits.shape[-1] != num_classes:
                raise ValueError(
                    f"{name}: logits have {logits.shape[-1]} classes, expected {num_classes}"
                )
            if logits.shape[1:3] != labels.shape[1:3]:
                logits = jax.image.resize(
                    logits.astype(jnp.float32),
                    (*labels.shape, num_classes),
                    method="bilinear",
                )
            out[name] = jax.vmap(per_image)(jnp.argmax(logits, axis=-1), labels)
        return out

    return fn


def confusion_matrices(
    segment_fn: Callable[[Any, dict], dict],
    params: Any,
    split: Mapping[str, np.ndarray],
    *,
    mesh,
    batch_size: int,
) -> dict[str, np.ndarray]:
    """Total int64 ``[C, C]`` confusion matrix of each segmenter over ``split``."""
    per_image = evaluation.batched_apply(
        segment_fn,
        params,
        {"image": split["image"], "label": split["label"]},
        mesh=mesh,
        batch_size=batch_size,
    )
    return {k: v.astype(np.int64).sum(axis=0) for k, v in per_image.items()}


def scores_from_confusion(cm: np.ndarray) -> dict[str, Any]:
    """``{'miou': float, 'pixel_accuracy': float, 'iou': float64 [C] (nan: absent class)}``."""
    cm = np.asarray(cm, np.int64)
    return {
        "miou": float(image_metrics.miou_from_confusion(cm)),
        "pixel_accuracy": float(image_metrics.pixel_accuracy_from_confusion(cm)),
        "iou": np.asarray(image_metrics.iou_per_class_from_confusion(cm), np.float64),
    }


def miou(
    segment_fn: Callable[[Any, dict], dict],
    params: Any,
    split: Mapping[str, np.ndarray],
    *,
    mesh,
    batch_size: int,
) -> dict[str, dict[str, Any]]:
    """Scores of each segmenter of ``segment_fn`` on ``split`` ({'image', 'label'}).

    Returns ``{name: {'miou', 'pixel_accuracy', 'iou' [C], 'confusion' [C, C]}}``.
    """
    out = {}
    for name, cm in confusion_matrices(
        segment_fn, params, split, mesh=mesh, batch_size=batch_size
    ).items():
        out[name] = {**scores_from_confusion(cm), "confusion": cm}
    return out


def metric_dict(
    scores: Mapping[str, Any], *, prefix: str, class_names: Sequence[str]
) -> dict[str, float]:
    """Flat eval scalars of one segmenter's scores.

    ``{prefix}miou``, ``{prefix}pixel_accuracy`` and ``{prefix}iou/<class>``
    (absent classes, whose IoU is undefined, are left out), e.g. with
    ``prefix='eval/source_only_'``.
    """
    out = {f"{prefix}miou": scores["miou"], f"{prefix}pixel_accuracy": scores["pixel_accuracy"]}
    for name, iou in zip(class_names, scores["iou"]):
        if np.isfinite(iou):
            out[f"{prefix}iou/{name}"] = float(iou)
    return out


# Distinct colours for class maps (the first 19 are the Cityscapes palette).
_PALETTE = np.array(
    [
        (128, 64, 128),
        (244, 35, 232),
        (70, 70, 70),
        (102, 102, 156),
        (190, 153, 153),
        (153, 153, 153),
        (250, 170, 30),
        (220, 220, 0),
        (107, 142, 35),
        (152, 251, 152),
        (70, 130, 180),
        (220, 20, 60),
        (255, 0, 0),
        (0, 0, 142),
        (0, 0, 70),
        (0, 60, 100),
        (0, 80, 100),
        (0, 0, 230),
        (119, 11, 32),
    ],
    np.uint8,
)


def colorize(labels, num_classes: int) -> np.ndarray:
    """Class maps ``[..., H, W]`` -> uint8 RGB ``[..., H, W, 3]``; ids outside the classes black."""
    labels = np.asarray(labels).astype(np.int64)
    extra = max(num_classes - len(_PALETTE), 0)
    # Classes beyond the palette get fixed pseudo-random colours.
    more = np.random.default_rng(0).integers(40, 256, (extra, 3)).astype(np.uint8)
    palette = np.concatenate([_PALETTE[:num_classes], more, np.zeros((1, 3), np.uint8)])
    valid = (labels >= 0) & (labels < num_classes)
    return palette[np.where(valid, labels, len(palette) - 1)]
