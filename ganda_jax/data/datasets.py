"""From a config's ``data`` block to named training streams (shared by all methods).

``data.source`` selects where images come from:

- ``embedded``: the deterministic synthetic datasets of :mod:`ganda_jax.data.synthetic`
  (no files, no network); they have held-out test splits with ground truth.
- ``folder``: the CycleGAN layout ``data.path/{trainA,trainB,testA,testB}``.
- ``tfds``: a prepared TensorFlow Datasets dataset (``data.name``, ``data.data_dir``);
  never downloads.
- ``npz``: ``data.path_A`` / ``data.path_B`` arrays files (``images`` uint8 NHWC).
"""

from __future__ import annotations

import functools

import numpy as np

from ganda_jax.data import pipeline, sources, synthetic

SOURCES = ("embedded", "folder", "tfds", "npz")


def _check_source(data) -> str:
    if data.source not in SOURCES:
        raise ValueError(f"unknown data.source {data.source!r}; expected one of {SOURCES}")
    return data.source


@functools.lru_cache(maxsize=8)
def _translation_pair(split: str, num: int, seed: int, size: int):
    return synthetic.translation_pair(split=split, num=num, seed=seed, size=size)


def unpaired_streams(data, split: str, image_size: int) -> dict:
    """``{'A': source, 'B': source}`` for unpaired translation (CycleGAN, DiscoGAN)."""
    kind = _check_source(data)
    if kind == "embedded":
        num = data.num_train if split == "train" else data.num_test
        pair = _translation_pair(split, num, data.seed, image_size)
        return {k: sources.ArraySource({"image": pair[k]}) for k in ("A", "B")}
    if kind == "folder":
        return sources.cyclegan_folder(data.path, split, convert_mode=data.convert_mode)
    if kind == "tfds":
        return sources.tfds_cyclegan(data.name, split, data.data_dir or None)
    return {k: sources.NpzSource(data[f"path_{k}"]) for k in ("A", "B")}


def unpaired_transforms(data, image_size: int):
    """CycleGAN's train augmentation: resize to ``load_size``, random crop, random flip.

    The embedded data is generated at ``image_size`` and needs none.
    """
    if _check_source(data) == "embedded":
        return None
    return pipeline.image_transform(
        pipeline.resize_crop_flip,
        load_size=data.load_size or image_size,
        crop_size=image_size,
        flip=data.flip,
    )


def paired_test(data, image_size: int) -> dict[str, np.ndarray] | None:
    """Test images with their true counterparts (``B[i]`` is ``A[i]`` translated), if known."""
    if _check_source(data) != "embedded":
        return None
    return _translation_pair("test", data.num_test, data.seed, image_size)


def embedded_train_mean(data, image_size: int, domain: str) -> np.ndarray | None:
    """Mean training image of a domain of the embedded pair (a constant-prediction baseline)."""
    if _check_source(data) != "embedded":
        return None
    return _translation_pair("train", data.num_train, data.seed, image_size)[domain].mean(0)
