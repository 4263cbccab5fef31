"""Segmentation labels: label maps, checks, and transforms of an image and its class map.

A label is a per-pixel class map: values ``0 .. num_classes - 1``, and ``ignore_index``
(255, the GTA5 / Cityscapes "void") for pixels that no loss or metric may count.
``label_map='cityscapes19'`` maps the Cityscapes label ids (also used by GTA5's label
PNGs) to the 19 evaluation classes of the benchmark, every other id to ``ignore_index``.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

LABEL_MAPS = ("", "cityscapes19")

#: Cityscapes label id -> train id (the 19 evaluation classes of the benchmark;
#: GTA5's label pngs use the same ids). Every other id becomes ``ignore_index``.
CITYSCAPES_19 = {
    7: 0,  # road
    8: 1,  # sidewalk
    11: 2,  # building
    12: 3,  # wall
    13: 4,  # fence
    17: 5,  # pole
    19: 6,  # traffic light
    20: 7,  # traffic sign
    21: 8,  # vegetation
    22: 9,  # terrain
    23: 10,  # sky
    24: 11,  # person
    25: 12,  # rider
    26: 13,  # car
    27: 14,  # truck
    28: 15,  # bus
    31: 16,  # train
    32: 17,  # motorcycle
    33: 18,  # bicycle
}
CITYSCAPES_19_NAMES = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic_light",
    "traffic_sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)


# ---------------------------------------------------------------------------
# Labels and joint (image, label) transforms.
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _label_lut(label_map: str, ignore_index: int) -> np.ndarray | None:
    if not label_map:
        return None
    lut = np.full(256, ignore_index, np.uint8)
    for label_id, train_id in CITYSCAPES_19.items():
        lut[label_id] = train_id
    return lut


def to_class_map(label: np.ndarray, *, num_classes: int, ignore_index: int, label_map: str = ""):
    """A raw label image (``[H, W]`` or ``[H, W, 1]``) -> uint8 ``[H, W]`` class ids.

    Applies ``label_map``; without one, values must already be class ids or
    ``ignore_index`` (anything else outside ``[0, num_classes)`` is a data error).
    """
    label = np.asarray(label)
    if label.ndim == 3 and label.shape[-1] == 1:
        label = label[..., 0]
    if label.ndim != 2:
        raise ValueError(f"label has shape {label.shape}; expected a class map [H, W] or [H, W, 1]")
    if label_map not in LABEL_MAPS:
        raise ValueError(f"unknown label_map {label_map!r}; expected one of {LABEL_MAPS}")
    lut = _label_lut(label_map, ignore_index)
    if lut is not None:
        if label.min() < 0 or label.max() > 255:
            raise ValueError(f"label ids outside [0, 255] for label_map {label_map!r}")
        return lut[label.astype(np.intp)]
    bad = (label != ignore_index) & ((label < 0) | (label >= num_classes))
    if bad.any():
        raise ValueError(
            f"label values {np.unique(label[bad])[:8].tolist()} outside [0, {num_classes}) "
            f"that are not ignore_index={ignore_index} (num_classes={num_classes}; "
            "set the domain's label_map if they are Cityscapes label ids)"
        )
    return label.astype(np.uint8)


def _resize_pair(image, label, size: int):
    """Shorter side to ``size``: image bicubic, label nearest (classes never blend)."""
    h, w = image.shape[:2]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    if (new_h, new_w) != (h, w):
        image = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC))
        if label is not None:
            label = np.asarray(Image.fromarray(label).resize((new_w, new_h), Image.NEAREST))
    return image, label


def _crop(x, top: int, left: int, size: int):
    return None if x is None else np.ascontiguousarray(x[top : top + size, left : left + size])


def joint_transform(
    example: dict,
    rng: np.random.Generator | None,
    *,
    image_size: int,
    load_size: int = 0,
    flip: bool = False,
    label_fn=None,
    train: bool = True,
) -> dict:
    """Resize, crop (random when ``train``, else central) and flip image and label together.

    ``label`` is optional (target training examples have none); ``label_fn`` maps a raw
    label to class ids first (:func:`to_class_map`). Draws from ``rng``, in order: top,
    left, flip coin (only what applies).
    """
    out = dict(example)
    image = np.asarray(example["image"])
    label = example.get("label")
    if label is not None and label_fn is not None:
        label = label_fn(label)
    image, label = _resize_pair(image, label, max(load_size, image_size) if train else image_size)
    h, w = image.shape[:2]
    if train:
        top = int(rng.integers(0, h - image_size + 1))
        left = int(rng.integers(0, w - image_size + 1))
    else:
        top, left = (h - image_size) // 2, (w - image_size) // 2
    image, label = _crop(image, top, left, image_size), _crop(label, top, left, image_size)
    if train and flip and rng.random() < 0.5:
        image = np.ascontiguousarray(image[:, ::-1])
        label = None if label is None else np.ascontiguousarray(label[:, ::-1])
    out["image"] = image
    if label is not None:
        out["label"] = label
    return out
