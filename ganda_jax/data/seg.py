"""Data for segmentation domain adaptation (GTA-seg, CyCADA-seg): labelled source, unlabelled target.

Training streams (for :class:`ganda_jax.data.pipeline.Loader`)::

    {'source': {'image': uint8 [H, W, 3], 'label': uint8 [H, W]},
     'target': {'image': uint8 [H, W, 3]}}

``label`` is a per-pixel class map: values ``0 .. num_classes - 1``, and
``data.ignore_index`` (255, the GTA5 / Cityscapes "void") for pixels that no
loss or metric may count. The target stream has no ``label`` field at all, so
target labels cannot leak into training. Evaluation uses the held-out *test*
split of each domain, with labels, as in-memory arrays (:func:`test_split`:
``label`` int32 ``[N, H, W]``) scored by :mod:`ganda_jax.seg_eval`.

``data.source`` (the config's ``data`` block, built by :func:`data_block`):

- ``embedded``: :func:`ganda_jax.data.synthetic.segmentation_pair` at
  ``image_size`` (>= 16; 64 by default): source = flat-coloured "synthetic"
  scenes, target = re-coloured, textured, lit, blurred and noisy "real" ones,
  5 classes (``synthetic.SEG_CLASS_NAMES``). ``num_train`` / ``num_test``
  images per domain; no files, no network.
- ``tfds``: prepared TensorFlow Datasets (never downloaded): source
  ``data.name`` (e.g. a GTA5 or SYNTHIA builder you prepared yourself; neither
  is in the tfds catalogue), target ``data.target_name`` (e.g.
  ``cityscapes/semantic_segmentation``, prepared from the manually downloaded
  archives). Feature names: ``data.image_key`` / ``data.label_key`` for the
  source and ``data.target_image_key`` / ``data.target_label_key`` for the
  target (tfds Cityscapes: ``image_left`` / ``segmentation_label``). Test
  split ``data.test_split`` (Cityscapes' public labelled split is
  ``validation``, as in the DA literature). ``data.label_map='cityscapes19'``
  maps the Cityscapes label ids (also used by GTA5) to the 19 evaluation
  classes, everything else to ``ignore_index``. Training images are resized
  (shorter side to ``load_size`` or ``image_size``; image bicubic, label
  nearest) and randomly cropped to ``image_size`` squares; test images are
  resized and centre-cropped the same way.

``data.flip``: a random horizontal flip applied to image *and* label together
(the target stream's images are flipped alone). Off by default.
"""

from __future__ import annotations

import functools
import json

import ml_collections
import numpy as np
from PIL import Image

from ganda_jax import config_lib
from ganda_jax.data import sources, synthetic

SOURCES = ("embedded", "tfds")
DOMAINS = ("source", "target")
LABEL_MAPS = ("", "cityscapes19")

#: The fields a segmentation-DA ``data`` block adds to :func:`config_lib.data_block`.
SEG_FIELDS = {
    "target_name": "",  # tfds: the target dataset (the source is ``name``)
    "image_key": "image",  # tfds feature of the source image
    "label_key": "segmentation_label",  # tfds feature of the source class map
    "target_image_key": "image_left",  # tfds Cityscapes
    "target_label_key": "segmentation_label",  # test split only
    "label_map": "",  # '' (labels are class ids already) | 'cityscapes19'
    "train_split": "train",
    "test_split": "test",
    "num_classes": synthetic.NUM_SEG_CLASSES,
    "ignore_index": 255,
    "flip": False,
}

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


def data_block(**kw):
    """``config_lib.data_block`` plus :data:`SEG_FIELDS` (keywords override both)."""
    return config_lib.data_block(**{**SEG_FIELDS, **kw})


def class_names(data) -> tuple[str, ...]:
    """Names of the ``data.num_classes`` classes (for per-class metric keys)."""
    if data.source == "embedded":
        names = synthetic.SEG_CLASS_NAMES
    elif data.get("label_map", "") == "cityscapes19":
        names = CITYSCAPES_19_NAMES
    else:
        names = ()
    if len(names) != data.num_classes:
        names = tuple(f"class{c}" for c in range(data.num_classes))
    return tuple(names)


def _check(data, image_size: int) -> str:
    if data.source not in SOURCES:
        raise ValueError(
            f"unknown data.source {data.source!r} for segmentation domain adaptation; "
            f"expected one of {SOURCES}"
        )
    if data.get("label_map", "") not in LABEL_MAPS:
        raise ValueError(f"unknown data.label_map {data.label_map!r}; expected one of {LABEL_MAPS}")
    if not 0 < data.num_classes <= 255 or data.num_classes > data.ignore_index:
        raise ValueError(
            f"need 0 < num_classes <= ignore_index <= 255 (labels are stored as uint8); "
            f"got num_classes={data.num_classes}, ignore_index={data.ignore_index}"
        )
    if data.source == "embedded":
        if image_size < 16:
            raise ValueError(
                f"the embedded segmentation scenes need image_size >= 16, got {image_size}"
            )
        if data.num_classes != synthetic.NUM_SEG_CLASSES:
            raise ValueError(
                f"the embedded segmentation scenes have {synthetic.NUM_SEG_CLASSES} classes "
                f"{synthetic.SEG_CLASS_NAMES}; set data.num_classes={synthetic.NUM_SEG_CLASSES} "
                f"(got {data.num_classes})"
            )
    if data.source == "tfds" and not (data.name and data.target_name):
        raise ValueError(
            "data.source='tfds' needs data.name (the source, e.g. a prepared GTA5 builder) and "
            "data.target_name (e.g. 'cityscapes/semantic_segmentation'); "
            f"got name={data.name!r}, target_name={data.target_name!r}"
        )
    return data.source


class SegArraySource(sources.ArraySource):
    """An :class:`~ganda_jax.data.sources.ArraySource` whose ``label`` is a class map.

    ``ArraySource`` only accepts ``label`` arrays of per-example class ids
    ``[N]``; here ``label`` is uint8 ``[N, H, W]`` (one class id per pixel), so
    it is validated here and stored under that name after the base checks.
    """

    def __init__(self, image: np.ndarray, label: np.ndarray, *, name: str):
        label = np.asarray(label)
        image = np.asarray(image)
        if label.dtype != np.uint8 or label.ndim != 3 or label.shape != image.shape[:3]:
            raise ValueError(
                f"{name}: label has shape {label.shape} and dtype {label.dtype}; expected "
                f"uint8 [N, H, W] = {image.shape[:3]} (one class id per pixel)"
            )
        super().__init__({"image": image, "mask": label}, name=name)
        self._arrays = {"image": self._arrays["image"], "label": self._arrays["mask"]}


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


def to_class_map(label: np.ndarray, data) -> np.ndarray:
    """A raw label image (``[H, W]`` or ``[H, W, 1]``) -> uint8 ``[H, W]`` class ids.

    Applies ``data.label_map``; without one, values must already be class ids
    or ``ignore_index`` (anything else outside ``[0, num_classes)`` is a data error).
    """
    label = np.asarray(label)
    if label.ndim == 3 and label.shape[-1] == 1:
        label = label[..., 0]
    if label.ndim != 2:
        raise ValueError(f"label has shape {label.shape}; expected a class map [H, W] or [H, W, 1]")
    lut = _label_lut(data.get("label_map", ""), data.ignore_index)
    if lut is not None:
        if label.min() < 0 or label.max() > 255:
            raise ValueError(f"label ids outside [0, 255] for label_map {data.label_map!r}")
        return lut[label.astype(np.intp)]
    bad = (label != data.ignore_index) & ((label < 0) | (label >= data.num_classes))
    if bad.any():
        raise ValueError(
            f"label has values {np.unique(label[bad])[:8]} outside [0, {data.num_classes}) "
            f"that are not ignore_index={data.ignore_index}; set data.label_map"
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
    data=None,
    train: bool = True,
) -> dict:
    """Resize, crop (random when ``train``, else central) and flip image and label together.

    ``label`` is optional (target training examples have none). Draws from
    ``rng``, in order: top, left, flip coin (only what applies).
    """
    out = dict(example)
    image = np.asarray(example["image"])
    label = example.get("label")
    if label is not None and data is not None:
        label = to_class_map(label, data)
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


# ---------------------------------------------------------------------------
# Streams and test splits.
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _embedded(domain: str, split: str, num: int, seed: int, size: int) -> dict[str, np.ndarray]:
    return synthetic.segmentation_pair(domain=domain, split=split, num=num, seed=seed, size=size)


def _tfds_keys(data, domain: str) -> tuple[str, str, str]:
    if domain == "source":
        return data.name, data.image_key, data.label_key
    return data.target_name, data.target_image_key, data.target_label_key


def _tfds_source(data, domain: str, split: str, num: int, labels: bool):
    name, image_key, label_key = _tfds_keys(data, domain)
    return sources.TfdsSource(
        name,
        split=sources.first_n(split, num),
        data_dir=data.data_dir or None,
        image_key=image_key,
        # extra_fields, not label_key: the label is a class-map image, not a class id.
        extra_fields={"label": label_key} if labels else None,
    )


def train_streams(data, image_size: int) -> dict:
    """``{'source': {image, label}, 'target': {image}}`` training sources."""
    if _check(data, image_size) == "embedded":
        src = _embedded("source", "train", data.num_train, data.seed, image_size)
        tgt = _embedded("target", "train", data.num_train, data.seed, image_size)
        return {
            "source": SegArraySource(src["image"], src["mask"], name="segmentation source train"),
            "target": sources.ArraySource(
                {"image": tgt["image"]}, name="segmentation target train"
            ),
        }
    return {
        "source": _tfds_source(data, "source", data.train_split, data.num_train, labels=True),
        "target": _tfds_source(data, "target", data.train_split, data.num_train, labels=False),
    }


def train_transforms(data, image_size: int):
    """Joint resize / random crop / flip for tfds data; embedded: only the optional flip."""
    if _check(data, image_size) == "embedded":
        if not data.flip:
            return None
        return functools.partial(joint_transform, image_size=image_size, flip=True)
    return functools.partial(
        joint_transform,
        image_size=image_size,
        load_size=data.get("load_size", 0),
        flip=data.flip,
        data=data,
    )


@functools.lru_cache(maxsize=4)
def _tfds_test(data_json: str, domain: str, image_size: int) -> dict[str, np.ndarray]:
    data = ml_collections.ConfigDict(json.loads(data_json))
    src = _tfds_source(data, domain, data.test_split, data.num_test, labels=True)
    examples = [
        joint_transform(src[i], None, image_size=image_size, data=data, train=False)
        for i in range(len(src))
    ]
    return {
        "image": np.stack([ex["image"] for ex in examples]),
        "label": np.stack([ex["label"] for ex in examples]).astype(np.int32),
    }


@functools.lru_cache(maxsize=8)
def _embedded_test(domain: str, num: int, seed: int, size: int) -> dict[str, np.ndarray]:
    d = _embedded(domain, "test", num, seed, size)
    return {"image": d["image"], "label": d["mask"].astype(np.int32)}


def test_split(data, image_size: int, domain: str) -> dict[str, np.ndarray]:
    """The labelled test split of ``domain`` ('source' | 'target'): ``{'image', 'label'}``.

    ``image`` is uint8 ``[N, image_size, image_size, 3]``, ``label`` int32
    ``[N, image_size, image_size]`` (class ids, ``ignore_index`` for void);
    cached, so do not modify them. Every process builds the same arrays
    (deterministic), as :func:`ganda_jax.evaluation.batched_apply` expects.
    """
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    if _check(data, image_size) == "embedded":
        return _embedded_test(domain, data.num_test, data.seed, image_size)
    return _tfds_test(data.to_json(sort_keys=True), domain, image_size)


def example_batch(batch_size: int, image_size: int) -> dict:
    """A zero batch in the loader's format (shapes only)."""
    image = np.zeros((batch_size, image_size, image_size, 3), np.uint8)
    return {
        "source": {"image": image, "label": np.zeros(image.shape[:3], np.uint8)},
        "target": {"image": image},
    }
