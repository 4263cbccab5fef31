"""Data for digit domain adaptation (PixelDA; later CyCADA, GTA): labelled source, unlabelled target.

Training streams (for :class:`ganda_jax.data.pipeline.Loader`)::

    {'source': {'image': uint8 [H, W, 3], 'label': int32},
     'target': {'image': uint8 [H, W, 3]}}

The target stream has no ``label`` field at all, so target labels cannot leak
into training. Evaluation uses the held-out *test* split of each domain, with
labels, as in-memory arrays (:func:`test_split`).

``data.source`` (the config's ``data`` block, built by :func:`data_block`):

- ``embedded``: :func:`ganda_jax.data.synthetic.digits` at 32x32: source = clean
  grey strokes on black, target = slanted, bent strokes of any width composited
  MNIST-M style over colour textures. ``num_train`` / ``num_test`` images per
  domain; no files, no network.
- ``tfds``: prepared TensorFlow Datasets (never downloaded): source
  ``data.name`` (e.g. ``mnist``), target ``data.target_name`` (a dataset with the
  same classes that you have prepared yourself, e.g. an ``mnist_m`` builder).
  Grayscale becomes RGB; images are resized (bicubic) to ``image_size``.
  ``num_train`` / ``num_test`` > 0 take the first that many examples of the
  split, 0 the whole split. The target's test split needs labels
  (``data.label_key``), for evaluation only.
"""

from __future__ import annotations

import functools

import numpy as np

from ganda_jax import config_lib
from ganda_jax.data import pipeline, sources, synthetic

SOURCES = ("embedded", "tfds")
DOMAINS = ("source", "target")

#: Size of the embedded digits (``synthetic.digits`` renders 32x32 only).
EMBEDDED_SIZE = 32

#: The fields a domain-adaptation ``data`` block adds to :func:`config_lib.data_block`.
DA_FIELDS = dict(
    target_name="",  # tfds: the target dataset (the source is ``name``)
    label_key="label",  # tfds feature holding the class
    train_split="train",
    test_split="test",
    num_classes=10,
)


def data_block(**kw):
    """``config_lib.data_block`` plus :data:`DA_FIELDS` (keywords override both)."""
    return config_lib.data_block(**{**DA_FIELDS, **kw})


def _check(data, image_size: int) -> str:
    if data.source not in SOURCES:
        raise ValueError(
            f"unknown data.source {data.source!r} for digit domain adaptation; "
            f"expected one of {SOURCES}"
        )
    if data.source == "embedded" and image_size != EMBEDDED_SIZE:
        raise ValueError(
            f"the embedded digits are {EMBEDDED_SIZE}x{EMBEDDED_SIZE}; "
            f"set image_size={EMBEDDED_SIZE} (got {image_size})"
        )
    if data.source == "tfds" and not (data.name and data.target_name):
        raise ValueError(
            "data.source='tfds' needs data.name (the source, e.g. 'mnist') and "
            "data.target_name (a prepared target dataset with the same classes, "
            f"e.g. 'mnist_m'); got name={data.name!r}, target_name={data.target_name!r}"
        )
    return data.source


@functools.lru_cache(maxsize=8)
def embedded_digits(domain: str, split: str, num: int, seed: int) -> dict[str, np.ndarray]:
    return synthetic.digits(domain=domain, split=split, num=num, seed=seed)


def _tfds_source(data, domain: str, split: str, num: int, labels: bool):
    return sources.TfdsSource(
        data.name if domain == "source" else data.target_name,
        split=sources.first_n(split, num),
        data_dir=data.data_dir or None,
        label_key=data.label_key if labels else None,
    )


def train_streams(data, image_size: int) -> dict:
    """``{'source': {image, label}, 'target': {image}}`` training sources."""
    if _check(data, image_size) == "embedded":
        src = embedded_digits("source", "train", data.num_train, data.seed)
        tgt = embedded_digits("target", "train", data.num_train, data.seed)
        return {
            "source": sources.ArraySource(
                {"image": src["image"], "label": src["label"]}, name="digits source train"
            ),
            "target": sources.ArraySource({"image": tgt["image"]}, name="digits target train"),
        }
    return {
        "source": _tfds_source(data, "source", data.train_split, data.num_train, labels=True),
        "target": _tfds_source(data, "target", data.train_split, data.num_train, labels=False),
    }


def train_transforms(data, image_size: int):
    """Resize (bicubic) to ``image_size`` for tfds data; the embedded digits need none."""
    if _check(data, image_size) == "embedded":
        return None
    return pipeline.image_transform(pipeline.center_resize, size=image_size)


@functools.lru_cache(maxsize=4)
def read_labeled(
    name: str, split: str, data_dir: str | None, label_key: str, image_size: int
) -> dict[str, np.ndarray]:
    """A whole prepared tfds classification split in memory, resized (bicubic) to ``image_size``."""
    src = sources.TfdsSource(name, split=split, data_dir=data_dir, label_key=label_key)
    examples = [src[i] for i in range(len(src))]
    return {
        "image": np.stack(
            [pipeline.center_resize(ex["image"], size=image_size) for ex in examples]
        ),
        "label": np.asarray([ex["label"] for ex in examples], np.int32),
    }


def test_split(data, image_size: int, domain: str) -> dict[str, np.ndarray]:
    """The labelled test split of ``domain`` ('source' | 'target'): ``{'image', 'label'}``.

    ``image`` is uint8 ``[N, image_size, image_size, 3]``, ``label`` int32 ``[N]``;
    cached, so do not modify them.
    Every process builds the same arrays (deterministic), as
    :func:`ganda_jax.evaluation.batched_apply` expects.
    """
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    if _check(data, image_size) == "embedded":
        return embedded_digits(domain, "test", data.num_test, data.seed)
    return read_labeled(
        data.name if domain == "source" else data.target_name,
        sources.first_n(data.test_split, data.num_test),
        data.data_dir or None,
        data.label_key,
        image_size,
    )


def example_batch(batch_size: int, image_size: int) -> dict:
    """A zero batch in the loader's format (shapes only)."""
    image = np.zeros((batch_size, image_size, image_size, 3), np.uint8)
    return {
        "source": {"image": image, "label": np.zeros((batch_size,), np.int32)},
        "target": {"image": image},
    }
