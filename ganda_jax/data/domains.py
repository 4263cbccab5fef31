"""One domain of a dataset: where its images (and labels) come from, for every task.

A config's ``data`` block holds one *domain block* per domain (``data.source_domain`` and
``data.target_domain`` for adaptation, ``data.A`` / ``data.B`` for translation,
``data.domain`` for semi-supervised classification), so that every domain may be of
another kind::

    kind        embedded | tfds | npz | folder
    path        npz: a file, a folder of <split>.npz, or a pattern with {split};
                folder: the dataset root ('' = data.path, shared by both domains)
    name        embedded: the generator's domain ('' = the domain's role);
                tfds: the dataset name (prepared, never downloaded)
    data_dir    tfds: the data folder ('' = data.data_dir, else the tfds default)
    train_split, test_split
                split names ('' test split = the layout's labelled evaluation split:
                'test'; Cityscapes 'val'; a one-split layout holds out every 10th example)
    image_key, label_key
                npz array / tfds feature names ('' = images/labels, image/label)
    label_map   segmentation: '' (labels are class ids) | 'cityscapes19'

Folder layouts, by task:

- classification: ``ROOT/<split>/<class>/*.png|jpg`` (torchvision's ImageFolder; class
  names sorted); an unlabelled training split may be flat (``ROOT/<split>/*.png`` or
  ``ROOT/*.png``);
- segmentation: GTA5 ``ROOT/[<split>/]images/*`` + ``ROOT/[<split>/]labels/*`` matched by
  file stem, or Cityscapes ``ROOT/leftImg8bit/<split>/<city>/*_leftImg8bit.png`` +
  ``ROOT/gtFine/<split>/<city>/*_gtFine_labelIds.png``;
- translation: the CycleGAN layout ``ROOT/<split>A``, ``ROOT/<split>B``, or ``ROOT/<split>/``.

:func:`open_split` returns a :class:`ganda_jax.data.sources` source of *raw* examples
(``image`` uint8 ``[H, W, 3]`` of any size; ``label`` an int32 class id or a raw label
image) and, for class folders, the class names; :mod:`ganda_jax.data.tasks` resizes,
maps and checks them. Every error names the domain and the path or file at fault.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

import ml_collections
import numpy as np
from PIL import Image

from ganda_jax.data import sources, synthetic

KINDS = ("embedded", "tfds", "npz", "folder")
TASKS = ("translate", "classify", "segment", "semi")
#: A one-split layout (one npz file, GTA5's images/ + labels/) keeps every HOLDOUT-th
#: example (the last of every HOLDOUT, in sorted order) as its test split, out of training.
HOLDOUT = 10


def domain_block(kind: str = "embedded", **kw) -> ml_collections.ConfigDict:
    """One domain of ``config.data`` (see the module docstring); keywords override."""
    d = dict(
        kind=kind,
        path="",
        name="",
        data_dir="",
        train_split="train",
        test_split="",
        image_key="",
        label_key="",
        label_map="",
    )
    unknown = set(kw) - set(d)
    if unknown:
        raise ValueError(f"unknown domain field(s) {sorted(unknown)}; known: {sorted(d)}")
    d.update(kw)
    return ml_collections.ConfigDict(d)


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of a domain: a source of raw examples, and class names if it has them."""

    source: object
    class_names: tuple[str, ...] | None = None  # class folders only
    where: str = ""  # for messages


def _what(role: str, split: str) -> str:
    return f"data.{role}, {split} split"


def split_name(block, split: str, default_test: str = "test") -> str:
    if split == "train":
        return block.train_split
    return block.test_split or default_test


# ---------------------------------------------------------------------------
# embedded
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def embedded_arrays(
    task: str, name: str, split: str, num: int, seed: int, size: int
) -> dict[str, np.ndarray]:
    """The embedded generator of ``task``: ``{'image'[, 'label']}`` (cached; do not modify)."""
    if task in ("classify", "semi"):
        return synthetic.digits(domain=name, split=split, num=num, seed=seed)
    if task == "segment":
        d = synthetic.segmentation_pair(domain=name, split=split, num=num, seed=seed, size=size)
        return {"image": d["image"], "label": d["mask"]}
    if name not in ("A", "B"):
        raise ValueError(f"the embedded translation pair has domains 'A' and 'B', got {name!r}")
    return {"image": synthetic.translation_pair(split=split, num=num, seed=seed, size=size)[name]}


def _embedded(block, role, split, *, task, data, size, labels) -> Split:
    num = data.num_train if split == "train" else data.num_test
    name = block.name or role.removesuffix("_domain")  # source_domain -> the "source" digits
    arrays = embedded_arrays(task, name, split, num, data.seed, size)
    fields = {"image": arrays["image"]}
    if labels:
        fields["label"] = arrays["label"]
    return Split(sources.ArraySource(fields, name=f"embedded {role} {split}"), where="embedded")


# ---------------------------------------------------------------------------
# tfds
# ---------------------------------------------------------------------------


def _tfds(block, role, split, *, task, data, labels) -> Split:
    if not block.name:
        raise ValueError(f"data.{role}: kind='tfds' needs a dataset name (.name)")
    num = data.num_train if split == "train" else data.num_test
    label_key = block.label_key or ("segmentation_label" if task == "segment" else "label")
    kw = {}
    if labels and task == "segment":  # a class-map image, not a class id
        kw["extra_fields"] = {"label": label_key}
    elif labels:
        kw["label_key"] = label_key
    src = sources.TfdsSource(
        block.name,
        split=sources.first_n(split_name(block, split), num),
        data_dir=block.data_dir or data.get("data_dir", "") or None,
        image_key=block.image_key or "image",
        **kw,
    )
    return Split(src, where=f"tfds {block.name}")


# ---------------------------------------------------------------------------
# npz
# ---------------------------------------------------------------------------


def holdout_indices(n: int, split: str) -> np.ndarray:
    """The examples of a one-split layout that belong to ``split`` (every HOLDOUT-th is test)."""
    test = np.arange(n) % HOLDOUT == HOLDOUT - 1
    return np.flatnonzero(test if split == "test" else ~test)


def _first(indices: np.ndarray, num: int) -> np.ndarray:
    return indices[:num] if num > 0 else indices


def _npz_file(block, role, split, path: str, holdout: bool) -> tuple[str, bool]:
    """``(file, one_split)``: the file holding ``split``; one_split when a holdout applies."""
    name = split_name(block, split)
    if "{split}" in path:
        file = path.format(split=name)
    elif os.path.isdir(path):
        file = os.path.join(path, f"{name}.npz")
    elif os.path.isfile(path):
        if split == "test" and not holdout:
            raise ValueError(f"data.{role}: {path} is one npz file and has no test split")
        return path, holdout
    else:
        raise FileNotFoundError(f"data.{role}: npz path not found: {path}")
    if not os.path.isfile(file):
        raise FileNotFoundError(
            f"{_what(role, split)}: npz file not found: {file} (path={path!r}: a file, a "
            "folder of <split>.npz files, or a pattern with {split})"
        )
    return file, False


def _npz(block, role, split, *, task, data, labels, holdout) -> Split:
    path = block.path or data.path
    if not path:
        raise ValueError(f"data.{role}: kind='npz' needs a path")
    file, one_split = _npz_file(block, role, split, path, holdout)
    npz = sources.NpzSource(
        file,
        image_key=block.image_key or "images",
        label_key=(block.label_key or "labels") if labels else None,
        require_labels=labels,
        pixel_labels=task == "segment",
    )
    arrays = npz.arrays
    index = np.arange(len(npz))
    if one_split:
        index = holdout_indices(len(npz), split)
        if not len(index):
            raise ValueError(f"{file}: too few examples ({len(npz)}) to hold out a test split")
    index = _first(index, data.num_train if split == "train" else data.num_test)
    fields = {k: v[index] for k, v in arrays.items()}
    return Split(sources.ArraySource(fields, name=file), where=file)


# ---------------------------------------------------------------------------
# folder
# ---------------------------------------------------------------------------


def _images_in(folder: Path) -> list[Path]:
    return sources._list_images(folder, recursive=False) if folder.is_dir() else []


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


class ListSource:
    """Image files (and optional per-file class ids or label files), decoded lazily."""

    def __init__(self, files, *, labels=None, label_files=None, convert_mode="rgb", name=""):
        self.files = list(files)
        self.labels = None if labels is None else np.asarray(labels, np.int32)
        self.label_files = None if label_files is None else list(label_files)
        self.convert_mode = convert_mode
        self.name = name

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        i = sources._check_index(index, len(self.files), self.name)
        ex = {"image": sources.load_image_file(self.files[i], convert_mode=self.convert_mode)}
        if self.labels is not None:
            ex["label"] = np.asarray(self.labels[i], np.int32)
        if self.label_files is not None:
            ex["label"] = load_label_file(self.label_files[i])
        return ex

    def describe(self, index: int) -> str:
        extra = f" (label {self.label_files[index]})" if self.label_files is not None else ""
        return f"file {self.files[index]}{extra}"

    def subset(self, index: np.ndarray) -> ListSource:
        pick = lambda xs: None if xs is None else [xs[i] for i in index]  # noqa: E731
        return ListSource(
            pick(self.files),
            labels=None if self.labels is None else self.labels[index],
            label_files=pick(self.label_files),
            convert_mode=self.convert_mode,
            name=self.name,
        )


def load_label_file(path) -> np.ndarray:
    """A label PNG -> its raw values ``[H, W]`` (palette indices or grey levels, not colours)."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
                raise ValueError(
                    f"label file {path} has mode {img.mode!r}; expected a single-channel "
                    "image of class ids (mode L or P), not colours"
                )
            return np.array(img)
    except (OSError, SyntaxError) as e:
        raise ValueError(f"cannot decode label file {path}: {sources._reason(e)}") from e


def _need_dir(path: Path, role: str, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"data.{role}: {what} not found: {path}")
    if not path.is_dir():
        raise NotADirectoryError(f"data.{role}: {what} is not a folder: {path}")
    return path


def _class_folders(root: Path, role, split, name, labels, convert_mode) -> Split:
    """ImageFolder ``<name>/<class>/*``; a flat folder when labels are not needed."""
    folder = root / name
    if not folder.is_dir():
        if split == "train" and not labels and _images_in(root):
            folder = root  # an unlabelled training domain may be one flat folder
        else:
            raise FileNotFoundError(
                f"{_what(role, split)}: folder not found: {folder} (expected "
                f"{root}/<split>/<class>/*.png)"
            )
    classes = _subdirs(folder)
    if not classes:
        files = _images_in(folder)
        if labels or not files:
            raise ValueError(
                f"{_what(role, split)}: {folder} has no class sub-folders"
                + (" and no images" if not files else "")
                + " (a labelled split is <split>/<class>/*.png)"
            )
        src = ListSource(files, convert_mode=convert_mode, name=str(folder))
        return Split(src, where=str(folder))
    files, ids = [], []
    for c, sub in enumerate(classes):
        found = _images_in(sub)
        if not found:
            raise ValueError(f"{_what(role, split)}: empty class folder {sub}")
        files += found
        ids += [c] * len(found)
    names = tuple(p.name for p in classes)
    src = ListSource(
        files, labels=ids if labels else None, convert_mode=convert_mode, name=str(folder)
    )
    return Split(src, class_names=names, where=str(folder))


def _seg_folders(root: Path, role, split_label, name: str, labels, convert_mode, holdout):
    """GTA5 (images/ + labels/) or Cityscapes (leftImg8bit/ + gtFine/) pairs by file stem."""
    if (root / "leftImg8bit").is_dir():
        base = _need_dir(root / "leftImg8bit" / name, role, f"Cityscapes {split_label} images")
        files = sources._list_images(base, recursive=True)
        files = [f for f in files if f.name.endswith("_leftImg8bit.png")] or files
        stem = lambda f: f.name[: -len("_leftImg8bit.png")]  # noqa: E731
        label_of = lambda f: (  # noqa: E731
            root / "gtFine" / name / f.parent.name / f"{stem(f)}_gtFine_labelIds.png"
        )
        one_split = False
    else:
        split_root = root / name
        one_split = not (split_root / "images").is_dir()
        if one_split:
            if not holdout and split_label == "test":
                raise ValueError(f"data.{role}: {root} has no {name}/ split")
            split_root = root
        if not (split_root / "images").is_dir():
            raise FileNotFoundError(
                f"data.{role}: segmentation folder {root} has neither GTA5's images/ + "
                "labels/ (or <split>/images/ + <split>/labels/) nor Cityscapes' leftImg8bit/ + "
                "gtFine/"
            )
        files = _images_in(split_root / "images")
        by_stem = {p.stem: p for p in _images_in(split_root / "labels")}
        label_of = lambda f: by_stem.get(f.stem, split_root / "labels" / f"{f.stem}.png")  # noqa: E731
    if not files:
        raise ValueError(f"{_what(role, split_label)}: no images under {root}")
    label_files = None
    if labels:
        label_files = [label_of(f) for f in files]
        missing = [(f, lf) for f, lf in zip(files, label_files) if not lf.is_file()]
        if missing:
            f, lf = missing[0]
            raise FileNotFoundError(
                f"{_what(role, split_label)}: no label file {lf} for image {f} "
                f"({len(missing)} of {len(files)} images have none)"
            )
    src = ListSource(files, label_files=label_files, convert_mode=convert_mode, name=str(root))
    if one_split and holdout:
        src = src.subset(holdout_indices(len(src), split_label))
    return src


def _translation_folder(root: Path, role, split, name, convert_mode) -> Split:
    for folder in (root / f"{name}{role}", root / name):
        if folder.is_dir():
            return Split(sources.FolderSource(folder, convert_mode=convert_mode), where=str(folder))
    if split == "train" and _images_in(root):
        return Split(sources.FolderSource(root, convert_mode=convert_mode), where=str(root))
    raise FileNotFoundError(
        f"{_what(role, split)}: no {name}{role}/ (the CycleGAN layout) or {name}/ folder in {root}"
    )


def _folder(block, role, split, *, task, data, labels, holdout) -> Split:
    path = block.path or data.path
    if not path:
        raise ValueError(f"data.{role}: kind='folder' needs a path")
    root = _need_dir(Path(path), role, "dataset folder")
    convert_mode = data.get("convert_mode", "rgb")
    num = data.num_train if split == "train" else data.num_test
    if task == "translate":
        out = _translation_folder(root, role, split, split_name(block, split), convert_mode)
    elif task == "segment":
        default_test = "val" if (root / "leftImg8bit").is_dir() else "test"
        name = split_name(block, split, default_test)
        out = Split(
            _seg_folders(root, role, split, name, labels, convert_mode, holdout), where=str(root)
        )
    else:
        out = _class_folders(root, role, split, split_name(block, split), labels, convert_mode)
    if num > 0 and isinstance(out.source, ListSource) and num < len(out.source):
        out = dataclasses.replace(out, source=out.source.subset(np.arange(num)))
    return out


def open_split(
    block,
    role: str,
    split: str,
    *,
    task: str,
    data,
    image_size: int,
    labels: bool,
    holdout: bool = True,
) -> Split:
    """The raw examples of ``split`` ('train' | 'test') of the domain ``role``.

    ``labels``: include a ``label`` field (and require one). ``holdout``: a one-split
    layout serves a held-out test split (every HOLDOUT-th example) and trains on the rest.
    """
    if block.kind not in KINDS:
        raise ValueError(f"data.{role}: unknown kind {block.kind!r}; expected one of {KINDS}")
    if block.kind == "embedded":
        return _embedded(block, role, split, task=task, data=data, size=image_size, labels=labels)
    if block.kind == "tfds":
        return _tfds(block, role, split, task=task, data=data, labels=labels)
    if block.kind == "npz":
        return _npz(block, role, split, task=task, data=data, labels=labels, holdout=holdout)
    return _folder(block, role, split, task=task, data=data, labels=labels, holdout=holdout)
