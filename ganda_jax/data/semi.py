"""Data for semi-supervised classification (CC-GAN): a small labelled subset, unlabelled images.

Training streams (for :class:`ganda_jax.data.pipeline.Loader`)::

    {'labeled': {'image': uint8 [H, W, 3], 'label': int32},
     'unlabeled': {'image': uint8 [H, W, 3]}}

The labelled stream holds exactly ``data.labels_per_class`` examples of every
class (``num_classes * labels_per_class`` in all), drawn once from the training
split in a seeded order (:func:`labeled_indices`). The unlabelled stream is the
whole unlabelled split *without* a ``label`` field, so no other label can reach
training. Evaluation uses the held-out, labelled *test* split as in-memory
arrays (:func:`test_split`).

``data.source`` (the config's ``data`` block, built by :func:`data_block`):

- ``embedded``: :func:`ganda_jax.data.synthetic.digits` at 32x32, domain
  ``data.domain`` (default ``'target'``: slanted, bent strokes of any width over
  colour textures, which makes 10 labels per class a hard problem; ``'source'``
  gives clean grey strokes). ``num_train`` training images (the unlabelled
  stream; the labelled subset is drawn from them too) and ``num_test`` test
  images. No files, no network.
- ``tfds``: a prepared TensorFlow Datasets classification dataset ``data.name``
  (never downloaded; e.g. ``cifar10`` or ``stl10``). The labelled subset comes
  from ``data.train_split``, the unlabelled stream from ``data.unlabeled_split``
  (e.g. STL-10's ``'unlabelled'``; empty: the training split itself, labels
  hidden). Images are resized (bicubic, centre square) to ``image_size``.
  ``num_train`` / ``num_test`` > 0 take the first that many examples of the
  unlabelled / test split, 0 the whole split.
"""

from __future__ import annotations

import functools

import numpy as np

from ganda_jax import config_lib
from ganda_jax.data import da, pipeline, sources

SOURCES = ("embedded", "tfds")

#: Size of the embedded digits (``synthetic.digits`` renders 32x32 only).
EMBEDDED_SIZE = 32

#: The fields a semi-supervised ``data`` block adds to :func:`config_lib.data_block`.
SEMI_FIELDS = dict(
    labels_per_class=10,  # size of the labelled subset, per class
    num_classes=10,
    domain="target",  # embedded digits style: 'target' (textured) or 'source' (clean)
    label_key="label",  # tfds feature holding the class
    train_split="train",  # tfds: the labelled subset is drawn from here
    unlabeled_split="",  # tfds: '' = train_split (labels hidden)
    test_split="test",
)


def data_block(**kw):
    """``config_lib.data_block`` plus :data:`SEMI_FIELDS` (keywords override both)."""
    return config_lib.data_block(**{**SEMI_FIELDS, **kw})


def _check(data, image_size: int) -> str:
    if data.source not in SOURCES:
        raise ValueError(
            f"unknown data.source {data.source!r} for semi-supervised classification; "
            f"expected one of {SOURCES}"
        )
    if data.labels_per_class < 1:
        raise ValueError(f"data.labels_per_class must be >= 1, got {data.labels_per_class}")
    if data.source == "embedded":
        if image_size != EMBEDDED_SIZE:
            raise ValueError(
                f"the embedded digits are {EMBEDDED_SIZE}x{EMBEDDED_SIZE}; "
                f"set image_size={EMBEDDED_SIZE} (got {image_size})"
            )
        if data.num_classes != 10:
            raise ValueError(f"the embedded digits have 10 classes, got {data.num_classes}")
    if data.source == "tfds" and not data.name:
        raise ValueError("data.source='tfds' needs data.name (e.g. 'cifar10' or 'stl10')")
    return data.source


def labeled_indices(labels: np.ndarray, per_class: int, num_classes: int, seed: int) -> np.ndarray:
    """Indices of the first ``per_class`` examples of each class in a seeded shuffled order.

    Sorted, so the labelled stream does not depend on the order classes were found in.
    Raises if a class has fewer than ``per_class`` examples.
    """
    order = np.random.default_rng([seed, 0x5E71]).permutation(len(labels))
    chosen = [order[labels[order] == c][:per_class] for c in range(num_classes)]
    short = {c: len(ix) for c, ix in enumerate(chosen) if len(ix) < per_class}
    if short:
        raise ValueError(
            f"labels_per_class={per_class}, but some classes have fewer examples: {short}"
        )
    return np.sort(np.concatenate(chosen))


@functools.lru_cache(maxsize=4)
def _tfds_labeled(
    name, split, data_dir, label_key, per_class, num_classes, seed, image_size
) -> dict[str, np.ndarray]:
    """Reads the labelled subset into memory (scans labels in a seeded order, stops when full)."""
    src = sources.TfdsSource(name, split=split, data_dir=data_dir, label_key=label_key)
    order = np.random.default_rng([seed, 0x5E71]).permutation(len(src))
    counts = np.zeros(num_classes, np.int64)
    picked: list[int] = []
    for i in order:
        label = int(src[int(i)]["label"])
        if not 0 <= label < num_classes:
            raise ValueError(
                f"{name}[{split}] record {i}: label {label} outside [0, {num_classes})"
            )
        if counts[label] < per_class:
            counts[label] += 1
            picked.append(int(i))
            if counts.min() == per_class:
                break
    if counts.min() < per_class:
        raise ValueError(
            f"{name}[{split}] has fewer than labels_per_class={per_class} examples of some "
            f"class (counts {counts.tolist()})"
        )
    examples = [src[i] for i in sorted(picked)]
    return {
        "image": np.stack([pipeline.center_resize(e["image"], size=image_size) for e in examples]),
        "label": np.asarray([e["label"] for e in examples], np.int32),
    }


def train_streams(data, image_size: int) -> dict:
    """``{'labeled': {image, label}, 'unlabeled': {image}}`` training sources."""
    if _check(data, image_size) == "embedded":
        train = da.embedded_digits(data.domain, "train", data.num_train, data.seed)
        idx = labeled_indices(train["label"], data.labels_per_class, data.num_classes, data.seed)
        return {
            "labeled": sources.ArraySource(
                {"image": train["image"][idx], "label": train["label"][idx]},
                name=f"digits {data.domain} labelled subset",
            ),
            "unlabeled": sources.ArraySource(
                {"image": train["image"]}, name=f"digits {data.domain} train (unlabelled)"
            ),
        }
    labeled = _tfds_labeled(
        data.name,
        data.train_split,
        data.data_dir or None,
        data.label_key,
        data.labels_per_class,
        data.num_classes,
        data.seed,
        image_size,
    )
    return {
        "labeled": sources.ArraySource(labeled, name=f"{data.name} labelled subset"),
        "unlabeled": sources.TfdsSource(
            data.name,
            split=sources.first_n(data.unlabeled_split or data.train_split, data.num_train),
            data_dir=data.data_dir or None,
            label_key=None,
        ),
    }


def train_transforms(data, image_size: int):
    """Resize (bicubic) the tfds unlabelled stream to ``image_size``; the rest needs none."""
    if _check(data, image_size) == "embedded":
        return None
    return {"unlabeled": pipeline.image_transform(pipeline.center_resize, size=image_size)}


def test_split(data, image_size: int) -> dict[str, np.ndarray]:
    """The labelled, held-out test split: ``{'image': uint8 [N, S, S, 3], 'label': int32 [N]}``.

    Cached, so do not modify the arrays. Every process builds the same arrays
    (deterministic), as :func:`ganda_jax.evaluation.batched_apply` expects.
    """
    if _check(data, image_size) == "embedded":
        return da.embedded_digits(data.domain, "test", data.num_test, data.seed)
    return da.read_labeled(
        data.name,
        sources.first_n(data.test_split, data.num_test),
        data.data_dir or None,
        data.label_key,
        image_size,
    )


def example_batch(batch_size: int, image_size: int) -> dict:
    """A zero batch in the loader's format (shapes only)."""
    image = np.zeros((batch_size, image_size, image_size, 3), np.uint8)
    return {
        "labeled": {"image": image, "label": np.zeros((batch_size,), np.int32)},
        "unlabeled": {"image": image},
    }
