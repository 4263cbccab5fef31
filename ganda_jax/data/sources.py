"""Random-access data sources.

A *source* is anything with ``__len__()`` and ``__getitem__(i)`` that returns
one example as ``dict[str, np.ndarray]``.  Conventions for the fields:

* ``image``: ``uint8`` array ``[H, W, 3]`` (always RGB, never grayscale/RGBA);
* ``label``: ``int32`` scalar (0-d array);
* ``mask``: ``uint8`` array ``[H, W]`` (segmentation masks, if a source has them).

A source may also define ``describe(i) -> str`` returning a human-readable
location of example ``i`` (a file path, a record number); the loader uses it
to name the culprit when loading an example fails.

A training *dataset* is a ``dict[str, Source]`` of named streams, e.g.
``{'A': ..., 'B': ...}`` for unpaired translation or
``{'source': ..., 'target': ...}`` for domain adaptation; see
:mod:`ganda_jax.data.pipeline` for how streams are shuffled and batched.

Sources provided here:

* :class:`ArraySource` - in-memory numpy arrays;
* :class:`NpzSource` - a ``.npz`` file with ``images`` (and optional ``labels``);
* :class:`FolderSource` - a folder of JPEG/PNG/BMP files decoded lazily;
* :func:`cyclegan_folder` - the CycleGAN ``trainA/trainB/testA/testB`` layout;
* :class:`TfdsSource` / :func:`tfds_cyclegan` - an *already prepared*
  TensorFlow Datasets dataset read with random access (no TensorFlow, and
  never a download).

Every error raised for bad input is a one-line message that names the file,
array or dataset at fault.
"""

from __future__ import annotations

import operator
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ArraySource",
    "FolderSource",
    "NpzSource",
    "Source",
    "TfdsSource",
    "cyclegan_folder",
    "describe_example",
    "load_image_file",
    "tfds_cyclegan",
]

#: File extensions (lower case) that :class:`FolderSource` picks up; matching is
#: case-insensitive.
IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png")

_CONVERT_MODES = ("rgb", "error")


@runtime_checkable
class Source(Protocol):
    """A random-access dataset: ``len(source)`` examples, ``source[i]`` -> dict."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, np.ndarray]: ...


def describe_example(source: Any, index: int) -> str:
    """Human-readable location of ``source[index]`` (file path if known)."""
    describe = getattr(source, "describe", None)
    if callable(describe):
        try:
            return str(describe(index))
        except Exception:  # noqa: BLE001 - a description must never fail.
            return f"index {index}"
    return f"index {index}"


def _check_index(index: Any, length: int, what: str) -> int:
    """Validates an integer index (negative indices count from the end)."""
    try:
        i = operator.index(index)  # int and numpy integers; not floats/bools-as-arrays
    except TypeError:
        raise TypeError(f"{what}: index must be an integer, got {type(index).__name__}") from None
    if i < 0:
        i += length
    if not 0 <= i < length:
        raise IndexError(f"{what}: index {index} out of range for {length} examples")
    return i


# ---------------------------------------------------------------------------
# Image helpers.
# ---------------------------------------------------------------------------


def _is_image_field(name: str) -> bool:
    """Fields holding images: ``image``/``images`` or names ending in ``_image``."""
    return name in ("image", "images") or name.endswith("_image")


def _image_batch_to_rgb(images: np.ndarray, what: str) -> np.ndarray:
    """Converts a uint8 image batch to ``[N, H, W, 3]``.

    Accepted: ``[N, H, W, 3]`` (as is), ``[N, H, W]`` and ``[N, H, W, 1]``
    (grayscale, channel repeated), ``[N, H, W, 4]`` (RGBA, alpha dropped).
    """
    shape = tuple(images.shape)
    if images.dtype != np.uint8:
        raise ValueError(
            f"{what} has dtype {images.dtype} and shape {shape}; expected uint8 "
            "images in [0, 255] (convert float images with "
            "(x * 255).round().astype(np.uint8))"
        )
    if images.ndim == 3:
        if shape[-1] in (1, 3, 4) and shape[-1] != shape[-2]:
            raise ValueError(
                f"{what} has shape {shape}, which looks like a single [H, W, C] "
                "image; expected a batch [N, H, W, 3] (add a leading axis)"
            )
        return np.repeat(images[..., None], 3, axis=-1)
    if images.ndim == 4:
        channels = shape[-1]
        if channels == 3:
            return images
        if channels == 1:
            return np.repeat(images, 3, axis=-1)
        if channels == 4:
            return np.ascontiguousarray(images[..., :3])
    raise ValueError(
        f"{what} has shape {shape}; expected [N, H, W, 3] RGB images (grayscale "
        "[N, H, W] or [N, H, W, 1] and RGBA [N, H, W, 4] are converted)"
    )


def _image_to_rgb(image: np.ndarray, what: str) -> np.ndarray:
    """Single-image version of :func:`_image_batch_to_rgb` (``[H, W(, C)]``)."""
    image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise ValueError(
            f"{what} has shape {tuple(image.shape)}; expected an image [H, W, 3] "
            "(or grayscale [H, W] / [H, W, 1], or RGBA [H, W, 4])"
        )
    if image.ndim == 2:
        image = image[..., None]
    return _image_batch_to_rgb(image[None], what)[0]


_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def _pil_to_rgb(img: Image.Image, path: str, convert_mode: str) -> np.ndarray:
    """Converts a loaded PIL image to a writable uint8 ``[H, W, 3]`` array."""
    if img.mode == "RGB":
        return np.array(img, dtype=np.uint8)
    if convert_mode == "error":
        raise ValueError(
            f"image file {path} has mode {img.mode!r}, expected RGB (use "
            "convert_mode='rgb' to convert grayscale/RGBA/palette images)"
        )
    if img.mode in _SIXTEEN_BIT_MODES:
        # 16-bit grayscale (e.g. some PNGs): PIL's convert('RGB') would clip at
        # 255, so rescale [0, 65535] -> [0, 255] with rounding instead.
        wide = np.array(img, dtype=np.uint32)
        gray = ((wide * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if img.mode in ("I", "F"):
        raise ValueError(
            f"image file {path} has mode {img.mode!r} (32-bit int/float pixels), "
            "which has no unambiguous conversion to 8-bit RGB"
        )
    # 'L', 'LA', 'P', 'PA', 'RGBA', 'CMYK', 'YCbCr', '1', ...: alpha is dropped.
    return np.array(img.convert("RGB"), dtype=np.uint8)


def _reason(e: BaseException) -> str:
    """First line of an exception's message (or its type name)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _check_convert_mode(convert_mode: str) -> None:
    if convert_mode not in _CONVERT_MODES:
        raise ValueError(f"convert_mode must be one of {_CONVERT_MODES}, got {convert_mode!r}")


def load_image_file(path: str | os.PathLike[str], *, convert_mode: str = "rgb") -> np.ndarray:
    """Decodes one image file to a uint8 ``[H, W, 3]`` RGB array.

    Args:
      path: a JPEG/PNG/BMP (anything PIL reads) file.
      convert_mode: ``'rgb'`` converts grayscale, RGBA (alpha dropped), palette
        and 16-bit grayscale images to RGB; ``'error'`` rejects any image whose
        mode is not RGB.

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: the file cannot be decoded (corrupt, truncated, not an image),
        or it is not RGB and ``convert_mode='error'``. The message names the file.
    """
    _check_convert_mode(convert_mode)
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        img = Image.open(path)
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
    ) as e:
        raise ValueError(f"cannot decode image file {path}: {_reason(e)}") from e
    with img:
        try:
            img.load()  # Decode fully here so truncated files fail now, by name.
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"cannot decode image file {path}: {_reason(e)}") from e
        return _pil_to_rgb(img, path, convert_mode)


# ---------------------------------------------------------------------------
# In-memory arrays and .npz files.
# ---------------------------------------------------------------------------


class ArraySource:
    """In-memory arrays; the first axis of every array indexes the examples.

    ``ArraySource({'image': x, 'label': y})[i] == {'image': x[i], 'label': y[i]}``
    (copies, so transforms may modify them in place).

    Validation: at least one array; all arrays of the same non-zero length;
    image fields (named ``image``/``images`` or ending in ``_image``) must be
    uint8 ``[N, H, W, 3]``. Fields named ``label``/``labels`` must be integers
    and are stored as int32.
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], *, name: str = "ArraySource"):
        if not isinstance(arrays, Mapping) or not arrays:
            raise ValueError(f"{name}: expected a non-empty dict of arrays, got {arrays!r:.80}")
        self._name = name
        checked: dict[str, np.ndarray] = {}
        length = None
        for key, value in arrays.items():
            arr = np.asarray(value)
            what = f"{name}: array {key!r}"
            if arr.ndim == 0:
                raise ValueError(f"{what} is a scalar; expected a leading example axis")
            if _is_image_field(key) and (
                arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3
            ):
                raise ValueError(
                    f"{what} has shape {arr.shape} and dtype {arr.dtype}; images must "
                    "be uint8 [N, H, W, 3]"
                )
            if key in ("label", "labels"):
                arr = _labels_to_int32(arr, what, pixel=arr.ndim == 3)
            if length is None:
                length = arr.shape[0]
            elif arr.shape[0] != length:
                lengths = {k: np.shape(v)[0] if np.ndim(v) else None for k, v in arrays.items()}
                raise ValueError(
                    f"{name}: arrays have different lengths {lengths}; all must have "
                    "the same first dimension"
                )
            checked[key] = arr
        if length == 0:
            raise ValueError(f"{name}: arrays are empty (0 examples)")
        self._arrays = checked
        self._length = int(length)

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        """The underlying arrays (do not modify)."""
        return dict(self._arrays)

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(self._arrays)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        i = _check_index(index, self._length, self._name)
        return {k: np.array(v[i]) for k, v in self._arrays.items()}

    def describe(self, index: int) -> str:
        return f"{self._name} index {index}"

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {v.dtype}{list(v.shape)}" for k, v in self._arrays.items())
        return f"{type(self).__name__}({shapes})"


def _labels_to_int32(labels: np.ndarray, what: str, *, pixel: bool = False) -> np.ndarray:
    """Class ids ``[N]`` -> int32; with ``pixel``, class maps ``[N, H, W]`` stay as they are."""
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{what} has dtype {labels.dtype}; labels must be integers")
    if pixel:
        if labels.ndim == 4 and labels.shape[-1] == 1:
            labels = labels[..., 0]
        if labels.ndim != 3:
            raise ValueError(
                f"{what} has shape {labels.shape}; per-pixel labels must be [N, H, W] integers"
            )
        return labels
    if labels.ndim != 1:
        raise ValueError(f"{what} has shape {labels.shape}; labels must be [N] integers")
    if labels.size and (
        labels.min() < np.iinfo(np.int32).min or labels.max() > np.iinfo(np.int32).max
    ):
        raise ValueError(f"{what} has values outside the int32 range")
    return labels.astype(np.int32, copy=False)


class NpzSource(ArraySource):
    """A ``.npz`` file with uint8 images (and optionally integer labels).

    Exposes the fields ``image`` (always uint8 ``[H, W, 3]``) and, when the file
    has labels, ``label`` (int32 scalar). The whole file is loaded into memory.

    Friendly conversions: grayscale ``[N, H, W]`` or ``[N, H, W, 1]`` images are
    repeated to RGB; RGBA ``[N, H, W, 4]`` drops alpha. Anything else (other
    ranks/channel counts, non-uint8 dtypes) is a ``ValueError`` naming the file.

    Args:
      path: the ``.npz`` file.
      image_key: name of the image array in the file.
      label_key: name of the label array; ``None`` to ignore labels. A missing
        label array is fine unless ``require_labels`` is set.
      require_labels: raise if ``label_key`` is not in the file.
      pixel_labels: labels are per-pixel class maps ``[N, H, W]`` (segmentation), not
        class ids ``[N]``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        image_key: str = "images",
        label_key: str | None = "labels",
        require_labels: bool = False,
        pixel_labels: bool = False,
    ):
        path = os.fspath(path)
        self.path = path
        if not os.path.isfile(path):
            raise FileNotFoundError(f"npz file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as npz:
                keys = list(npz.files)
                if image_key not in keys:
                    raise ValueError(
                        f"{path}: no array named {image_key!r}; arrays present: {keys}"
                    )
                images = npz[image_key]
                labels = None
                if label_key is not None and label_key in keys:
                    labels = npz[label_key]
                elif label_key is not None and require_labels:
                    raise ValueError(
                        f"{path}: no array named {label_key!r}; arrays present: {keys}"
                    )
        except ValueError as e:
            if str(e).startswith(path):
                raise
            raise ValueError(f"cannot read {path} as .npz: {e}") from e
        except (OSError, EOFError) as e:  # Not a zip file, truncated, ...
            raise ValueError(f"cannot read {path} as .npz: {e}") from e

        arrays = {"image": _image_batch_to_rgb(images, f"{path}: array {image_key!r}")}
        if labels is not None:
            what = f"{path}: array {label_key!r}"
            labels = _labels_to_int32(labels, what, pixel=pixel_labels)
            if pixel_labels and labels.shape[1:] != arrays["image"].shape[1:3]:
                raise ValueError(
                    f"{what} has shape {labels.shape}; expected one class map per image "
                    f"[N, H, W] with [H, W] = {arrays['image'].shape[1:3]}"
                )
            if labels.shape[0] != arrays["image"].shape[0]:
                raise ValueError(
                    f"{what} has {labels.shape[0]} labels but {image_key!r} has "
                    f"{arrays['image'].shape[0]} images"
                )
            arrays["label"] = labels
        if arrays["image"].shape[0] == 0:
            raise ValueError(f"{path}: array {image_key!r} is empty (0 images)")
        super().__init__(arrays, name=path)

    def describe(self, index: int) -> str:
        return f"{self.path} index {index}"


# ---------------------------------------------------------------------------
# Image folders.
# ---------------------------------------------------------------------------


def _list_images(root: Path, recursive: bool) -> list[Path]:
    """Image files under ``root`` sorted by relative path; hidden files skipped.

    Hidden files (``.name``) are skipped so that e.g. macOS ``._x.jpg``
    AppleDouble files in downloaded archives are not mistaken for images.
    """
    found: list[tuple[str, Path]] = []
    if recursive:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fname in filenames:
                if not fname.startswith(".") and fname.lower().endswith(IMAGE_EXTENSIONS):
                    p = Path(dirpath) / fname
                    found.append((p.relative_to(root).as_posix(), p))
    else:
        with os.scandir(root) as it:
            for entry in it:
                if (
                    entry.is_file()
                    and not entry.name.startswith(".")
                    and entry.name.lower().endswith(IMAGE_EXTENSIONS)
                ):
                    found.append((entry.name, Path(entry.path)))
    found.sort(key=lambda item: item[0])
    return [p for _, p in found]


class FolderSource:
    """Every image file in a folder, decoded lazily with PIL in ``__getitem__``.

    Files with extensions ``.jpg .jpeg .png .bmp`` (any case) are used, sorted by
    name (by relative path when ``recursive``); hidden files are skipped. The
    example is ``{'image': uint8 [H, W, 3]}``; the file of example ``i`` is
    ``source.files[i]``.

    Args:
      path: the folder.
      recursive: also look in sub-folders.
      convert_mode: ``'rgb'`` converts grayscale/RGBA/palette images to RGB;
        ``'error'`` makes reading a non-RGB image a ``ValueError`` naming it.

    Raises:
      FileNotFoundError: the folder does not exist.
      NotADirectoryError: ``path`` is not a folder.
      ValueError: no image files in the folder. Corrupt files raise a
        ``ValueError`` naming the file when they are read (or from
        :meth:`validate`).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        recursive: bool = False,
        convert_mode: str = "rgb",
    ):
        _check_convert_mode(convert_mode)
        self.root = Path(path)
        self.convert_mode = convert_mode
        if not self.root.exists():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        if not self.root.is_dir():
            raise NotADirectoryError(f"not a folder: {self.root}")
        self.files: list[Path] = _list_images(self.root, recursive)
        if not self.files:
            where = "or its sub-folders " if recursive else ""
            raise ValueError(
                f"no images in folder {self.root} {where}(looked for "
                f"{', '.join(IMAGE_EXTENSIONS)}, case-insensitive)"
            )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        i = _check_index(index, len(self.files), str(self.root))
        return {"image": load_image_file(self.files[i], convert_mode=self.convert_mode)}

    def describe(self, index: int) -> str:
        return f"file {self.files[index]}"

    def validate(self, *, full: bool = False) -> None:
        """Checks every file; raises ``ValueError`` naming the first bad one.

        By default uses PIL's quick ``verify()`` (headers and, for PNG, chunk
        checksums; it does not decode pixel data, so a truncated JPEG may pass).
        ``full=True`` decodes every image completely (slow but thorough).
        With ``convert_mode='error'`` the image mode is checked as well.
        """
        for path in self.files:
            if full:
                load_image_file(path, convert_mode=self.convert_mode)
                continue
            try:
                with Image.open(path) as img:
                    mode = img.mode
                    img.verify()
            except Exception as e:
                raise ValueError(f"cannot decode image file {path}: {_reason(e)}") from e
            if self.convert_mode == "error" and mode != "RGB":
                raise ValueError(
                    f"image file {path} has mode {mode!r}, expected RGB (use "
                    "convert_mode='rgb' to convert grayscale/RGBA/palette images)"
                )

    def __repr__(self) -> str:
        return f"FolderSource({str(self.root)!r}, {len(self.files)} images)"


def cyclegan_folder(
    root: str | os.PathLike[str], split: str, **kwargs: Any
) -> dict[str, FolderSource]:
    """The CycleGAN dataset layout: ``root/{train,test}{A,B}``.

    Args:
      root: dataset folder, e.g. ``datasets/horse2zebra``.
      split: ``'train'`` or ``'test'`` (any ``X`` with ``XA``/``XB`` folders).
      **kwargs: passed to :class:`FolderSource` (``recursive``, ``convert_mode``).

    Returns:
      ``{'A': FolderSource(root/<split>A), 'B': FolderSource(root/<split>B)}``.

    Raises:
      FileNotFoundError: ``root`` or one of the two sub-folders is missing (the
        message lists the sub-folders that do exist).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"CycleGAN dataset folder not found: {root}")
    streams = {}
    for domain in ("A", "B"):
        sub = root / f"{split}{domain}"
        if not sub.is_dir():
            present = sorted(p.name for p in root.iterdir() if p.is_dir())
            raise FileNotFoundError(
                f"CycleGAN folder {root} has no {sub.name}/ sub-folder (expected "
                f"{split}A/ and {split}B/; sub-folders present: {present})"
            )
        streams[domain] = FolderSource(sub, **kwargs)
    return streams


# ---------------------------------------------------------------------------
# TensorFlow Datasets (random access, prepared data only, no network).
# ---------------------------------------------------------------------------


def first_n(split: str, num: int) -> str:
    """The tfds split string for the first ``num`` examples of ``split`` (all if ``num <= 0``)."""
    return f"{split}[:{num}]" if num > 0 else split


def _import_tfds():
    """Imports tensorflow_datasets with every network path switched off."""
    import tensorflow_datasets as tfds

    # tfds >= 4.9.3 ships with GCS disabled (`_is_gcs_disabled = True`); older
    # versions query gs://tfds-data for dataset metadata while *constructing* a
    # builder whose data is missing, which hangs without network. Force it off.
    try:
        from tensorflow_datasets.core.utils import gcs_utils

        if hasattr(gcs_utils, "_is_gcs_disabled"):
            gcs_utils._is_gcs_disabled = True
    except ImportError:  # pragma: no cover - layout of other tfds versions
        pass
    return tfds


def _split_base_names(split: str) -> list[str]:
    """``'train[:10%]+test'`` -> ``['train', 'test']``."""
    return [re.split(r"[\[(]", part.strip())[0].strip() for part in split.split("+")]


def _prepared_builder(name: str, data_dir: str | os.PathLike[str] | None):
    """Returns a tfds builder for ``name`` whose data is prepared, or raises.

    Never downloads or prepares anything: the builder is only constructed
    (``try_gcs=False``; no ``download_and_prepare``), then ``is_prepared()``
    decides.
    """
    if ":" in name.split("/")[0]:
        raise ValueError(
            f"TFDS dataset {name!r}: namespaced (community/huggingface) datasets "
            "are not supported because resolving them needs the network; load "
            "the prepared folder with tfds.builder_from_directory instead"
        )
    tfds = _import_tfds()
    where = (
        f"data_dir={os.fspath(data_dir)!r}"
        if data_dir
        else ("the default data_dir (TFDS_DATA_DIR or ~/tensorflow_datasets)")
    )
    how = (
        f"prepare it on a machine with network, e.g. `tfds build {name}"
        f"{' --data_dir=' + os.fspath(data_dir) if data_dir else ''}"
        " --file_format=array_record`, and copy the folder over"
    )
    try:
        builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
    except tfds.core.registered.DatasetNotFoundError:
        raise FileNotFoundError(
            f"TFDS dataset {name!r} is neither a known tfds dataset nor prepared "
            f"in {where} (check the name)"
        ) from None
    except Exception as e:
        raise ValueError(f"cannot open TFDS dataset {name!r} in {where}: {_reason(e)}") from e
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"TFDS dataset {name!r} is not prepared in {where} (looked for "
            f"{builder.data_dir}); {how}"
        )
    return builder


class TfdsSource:
    """One split of an already-prepared TFDS dataset, read with random access.

    Uses ``tfds.data_source`` (ArrayRecord random access, no TensorFlow). The
    dataset must have been prepared beforehand (in ``array_record`` format) -
    this class never downloads: if ``builder.is_prepared()`` is false it raises
    ``FileNotFoundError`` at once.

    Records are mapped to our field names: ``image`` (uint8 ``[H, W, 3]``;
    grayscale/RGBA are converted to RGB) from ``image_key``, ``label`` (int32
    scalar) from ``label_key`` if given, and any ``extra_fields``
    (``{our_name: tfds_feature_key}``) passed through as numpy arrays.

    Args:
      name: tfds name, e.g. ``'mnist'`` or ``'cycle_gan/horse2zebra'``.
      split: split (tfds split syntax, e.g. ``'train[:90%]'``).
      data_dir: tfds data folder; ``None`` for the tfds default.
      image_key: feature holding the image.
      label_key: feature holding an integer label, or ``None``.
      extra_fields: more features to expose, ``{our_name: tfds_key}``.
    """

    def __init__(
        self,
        name: str,
        *,
        split: str,
        data_dir: str | os.PathLike[str] | None = None,
        image_key: str = "image",
        label_key: str | None = None,
        extra_fields: Mapping[str, str] | None = None,
    ):
        self.name = name
        self.split = split
        self.data_dir = os.fspath(data_dir) if data_dir is not None else None
        builder = _prepared_builder(name, self.data_dir)
        info = builder.info

        known_splits = sorted(info.splits.keys())
        for base in _split_base_names(split):
            if base not in known_splits:
                raise ValueError(
                    f"TFDS dataset {name!r} has no split {base!r}; splits: {known_splits}"
                )
        feature_keys = list(info.features.keys()) if hasattr(info.features, "keys") else []
        self._fields: dict[str, str] = {"image": image_key}
        if label_key is not None:
            self._fields["label"] = label_key
        self._fields.update(extra_fields or {})
        for ours, theirs in self._fields.items():
            if feature_keys and theirs not in feature_keys:
                raise ValueError(
                    f"TFDS dataset {name!r} has no feature {theirs!r} (for field "
                    f"{ours!r}); features: {feature_keys}"
                )

        tfds = _import_tfds()
        try:
            # download=False: even if the check above raced with a deletion, this
            # can only fail, never fetch.
            self._data = tfds.data_source(
                name,
                split=split,
                data_dir=self.data_dir,
                download=False,
                try_gcs=False,
            )
        except Exception as e:
            reason = _reason(e)
            formats = getattr(info, "file_format", None)
            raise ValueError(
                f"cannot open TFDS dataset {name!r} split {split!r} for random access "
                f"(stored as {formats}; random access needs file_format=array_record): "
                f"{reason}"
            ) from e
        self._length = len(self._data)
        if self._length == 0:
            raise ValueError(f"TFDS dataset {name!r} split {split!r} is empty")

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        i = _check_index(index, self._length, f"{self.name}[{self.split}]")
        record = self._data[i]
        out = {}
        for ours, theirs in self._fields.items():
            value = record[theirs]
            if ours == "image":
                out[ours] = _image_to_rgb(
                    value,
                    f"TFDS {self.name}[{self.split}] record {i} feature {theirs!r}",
                )
            elif ours == "label":
                out[ours] = np.asarray(value, dtype=np.int32)
            else:
                out[ours] = np.asarray(value)
        return out

    def describe(self, index: int) -> str:
        return f"TFDS {self.name}[{self.split}] record {index}"

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r}, {self._length} examples)"


def tfds_cyclegan(
    name: str = "cycle_gan/horse2zebra",
    split: str = "train",
    data_dir: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> dict[str, TfdsSource]:
    """A tfds dataset with ``<split>A``/``<split>B`` splits as ``{'A', 'B'}``.

    E.g. ``tfds_cyclegan('cycle_gan/horse2zebra', 'train')`` reads splits
    ``trainA`` and ``trainB``. ``kwargs`` go to :class:`TfdsSource`.
    """
    return {
        domain: TfdsSource(name, split=f"{split}{domain}", data_dir=data_dir, **kwargs)
        for domain in ("A", "B")
    }
