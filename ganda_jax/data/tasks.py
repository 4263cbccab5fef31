"""The one data layer every method uses: a config's ``data`` block -> streams and test splits.

Four tasks share one interface (:class:`TaskData`), built from the domains of
:mod:`ganda_jax.data.domains` (each of which may be ``embedded``, ``tfds``, ``npz`` or
``folder``):

=========  ==========================  ========================================
task       domains in ``config.data``  training streams
=========  ==========================  ========================================
translate  ``A``, ``B``                ``{'A': {image}, 'B': {image}}``
classify   ``source_domain``,          ``{'source': {image, label},``
           ``target_domain``           `` 'target': {image}}``
segment    ``source_domain``,          ``{'source': {image, label [H, W]},``
           ``target_domain``           `` 'target': {image}}``
semi       ``domain``                  ``{'labeled': {image, label},``
                                       `` 'unlabeled': {image}}``
=========  ==========================  ========================================

Unlabelled streams have no ``label`` field at all, so target labels cannot reach
training; the labelled *test* splits (:meth:`TaskData.test_split`, in memory) are for
evaluation only. :meth:`TaskData.check` reads everything a run will need before its first
step (paths, class sets, test splits; with ``data.validate='full'`` every training file
too), so bad input is a one-line error before anything is trained or written.

The embedded data is generated at ``image_size`` and served as generated (no
augmentation); other kinds are resized to ``image_size`` (classification: shorter side,
bicubic, central square; segmentation: image bicubic and label nearest, random crop;
translation: CycleGAN's resize to ``load_size``, random crop and flip).
"""

from __future__ import annotations

import dataclasses
import functools
from concurrent.futures import ThreadPoolExecutor

import ml_collections
import numpy as np

from ganda_jax.data import domains, pipeline, seg, sources, synthetic

VALIDATE = ("full", "headers", "off")
#: Size of the embedded digits (``synthetic.digits`` renders 32x32 only).
EMBEDDED_DIGITS_SIZE = 32


def data_block(task: str, **kw) -> ml_collections.ConfigDict:
    """A config's ``data`` block for ``task``: shared fields, task fields, one block per domain.

    Keywords override fields; a domain's keyword takes a dict of domain fields, e.g.
    ``data_block('classify', source_domain=dict(kind='npz', path='mnist.npz'))``.
    """
    d = dict(
        seed=0,
        num_train=2000,  # embedded: images generated; other kinds: > 0 the first N, 0 all
        num_test=200,
        path="",  # a root shared by the domains whose own path is empty
        data_dir="",  # tfds: the data folder shared by the domains whose own is empty
        load_size=0,
        flip=task == "translate",
        convert_mode="rgb",  # folders: 'rgb' converts grayscale/RGBA/palette, 'error' rejects
        num_threads=4,
        validate="full",  # before training: 'full' decodes every file, 'headers', 'off'
    )
    if task in ("classify", "semi"):
        d["num_classes"] = 10
    if task == "segment":
        d.update(num_classes=synthetic.NUM_SEG_CLASSES, ignore_index=255)
    if task == "semi":
        d.update(labels_per_class=10, unlabeled_split="")
    if task == "translate":
        d["paired"] = False
    for role in ROLES[task]:
        block = dict(kw.pop(role, None) or {})
        if task == "semi" and "name" not in block:
            block["name"] = "target"  # the textured digits (the clean ones are too easy)
        d[role] = domains.domain_block(**block)
    unknown = set(kw) - set(d)
    if unknown:
        raise ValueError(f"unknown data field(s) {sorted(unknown)} for task {task!r}")
    d.update(kw)
    return ml_collections.ConfigDict(d)


ROLES = {
    "translate": ("A", "B"),
    "classify": ("source_domain", "target_domain"),
    "segment": ("source_domain", "target_domain"),
    "semi": ("domain",),
}


def make(task: str, config, *, oracle: bool = False) -> TaskData:
    """The :class:`TaskData` of ``task`` for a method's config.

    ``oracle``: also a ``target_labeled`` stream (target training images *with* labels) for
    a target oracle, a baseline that bounds what adaptation can reach; the method's own
    phases read only ``source`` and ``target``.
    """
    classes = {
        "translate": Translation,
        "classify": Classification,
        "segment": Segmentation,
        "semi": SemiSupervised,
    }
    if task not in classes:
        raise ValueError(f"unknown data task {task!r}; expected one of {sorted(classes)}")
    return classes[task](config.data, int(config.image_size), oracle=oracle)


class _WithoutLabels:
    """A source's examples without their ``label`` field."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        return {k: v for k, v in self.source[index].items() if k != "label"}

    def describe(self, index):
        return sources.describe_example(self.source, index)


def without_labels(source):
    """The same images with no ``label`` field at all (what an unlabelled stream serves)."""
    if isinstance(source, sources.ArraySource):
        arrays = {k: v for k, v in source.arrays.items() if k != "label"}
        return sources.ArraySource(arrays, name=source.describe(0).rsplit(" index", 1)[0])
    if isinstance(source, domains.ListSource):
        return domains.ListSource(source.files, convert_mode=source.convert_mode, name=source.name)
    return _WithoutLabels(source)


def _stack(examples, what: str) -> dict[str, np.ndarray]:
    if not examples:
        raise ValueError(f"{what} is empty")
    return {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}


class TaskData:
    """The data of one method's run. Subclasses set ``task`` and ``streams``."""

    task = ""
    #: stream name -> (domain role in config.data, whether it is labelled)
    streams: dict[str, tuple[str, bool]] = {}
    holdout = True  # one-split layouts hold out a test split (all but translation)

    def __init__(self, data, image_size: int, *, oracle: bool = False):
        self.data = data
        self.image_size = image_size
        self.streams = dict(type(self).streams)
        if oracle:  # labelled target images for a target oracle, never for the method
            if self.task not in ("classify", "segment"):
                raise ValueError(f"a target oracle is for adaptation tasks, not {self.task!r}")
            self.streams["target_labeled"] = ("target_domain", True)
        if data.get("validate", "full") not in VALIDATE:
            raise ValueError(f"unknown data.validate {data.validate!r}; expected one of {VALIDATE}")
        for role in ROLES[self.task]:
            block = data[role]
            if block.kind not in domains.KINDS:
                raise ValueError(f"data.{role}.kind={block.kind!r} is not one of {domains.KINDS}")
        self._test: dict[str, dict] = {}
        self._streams: dict | None = None

    # --- the interface --------------------------------------------------------------
    def check_config(self) -> None:
        """Config checks that need no data (sizes, class counts); run before reading any."""

    def train_streams(self) -> dict:
        """``{stream: source}`` for :class:`ganda_jax.data.pipeline.Loader` (opened once)."""
        if self._streams is None:
            self._streams = {name: self._train(name) for name in self.streams}
        return dict(self._streams)

    def train_transforms(self) -> dict:
        """``{stream: transform or None}`` (host-side, numpy)."""
        return {name: self._transform(name) for name in self.streams}

    def test_split(self, role: str) -> dict[str, np.ndarray]:
        """The labelled test split of a domain, in memory: ``{'image' uint8 NHWC, 'label'}``.

        ``role`` is ``'source'`` / ``'target'`` (or the domain block's name). Cached, so do
        not modify it; every process builds the same arrays (deterministic), as
        :func:`ganda_jax.metrics.evaluation.batched_apply` expects.
        """
        role = self._role(role)
        if role not in self._test:
            self._test[role] = self._load_test(role)
        return self._test[role]

    def example_batch(self, batch_size: int) -> dict:
        """A zero batch in the loader's format (shapes only)."""
        s = self.image_size
        image = np.zeros((batch_size, s, s, 3), np.uint8)
        out = {}
        for name, (_, labelled) in self.streams.items():
            out[name] = {"image": image}
            if labelled:
                out[name]["label"] = self._zero_labels(batch_size)
        return out

    def class_names(self) -> tuple[str, ...]:
        return tuple(f"class{c}" for c in range(self.data.get("num_classes", 0)))

    def check(self) -> None:
        """Reads everything a run needs before its first step; raises a one-line error."""
        streams = self.train_streams()
        for role in self.test_roles():
            self.test_split(role)
        mode = self.data.get("validate", "full")
        for name, source in streams.items():
            role = self.streams[name][0]
            if mode != "off" and self.data[role].kind in ("npz", "folder"):
                self._validate(name, source, full=mode == "full")

    def info(self) -> dict:
        """What the run reads, for ``workdir/data.json`` (kinds, paths, sizes, class names)."""
        out = {"task": self.task, "class_names": list(self.class_names())}
        for name, source in self.train_streams().items():
            role = self.streams[name][0]
            out[name] = {"kind": self.data[role].kind, "examples": len(source)}
        for role in self.test_roles():
            out.setdefault(f"{role}_test", {})["examples"] = len(self.test_split(role)["image"])
        return out

    # --- shared machinery -------------------------------------------------------------
    def test_roles(self) -> tuple[str, ...]:
        return tuple(ROLES[self.task])

    def _role(self, role: str) -> str:
        if role in ROLES[self.task]:
            return role
        if f"{role}_domain" in ROLES[self.task]:
            return f"{role}_domain"
        raise ValueError(f"no domain {role!r}; the {self.task} domains are {ROLES[self.task]}")

    def _open(self, role: str, split: str, labels: bool) -> domains.Split:
        self.check_config()  # (example_batch alone needs no data: any image_size will do)
        return domains.open_split(
            self.data[role],
            role,
            split,
            task=self.task,
            data=self.data,
            image_size=self.image_size,
            labels=labels,
            holdout=self.holdout,
        )

    def _embedded(self, role: str) -> bool:
        return self.data[role].kind == "embedded"

    def _train(self, name: str):
        role, labelled = self.streams[name]
        return self._open_split(role, "train", labelled).source

    def _transform(self, name: str):
        return None

    def _zero_labels(self, batch_size: int) -> np.ndarray:
        return np.zeros((batch_size,), np.int32)

    def _open_split(self, role: str, split: str, labels: bool) -> domains.Split:
        return self._open(role, split, labels)

    def _load_test(self, role: str) -> dict[str, np.ndarray]:
        src = self._open_split(role, "test", True).source
        if self._embedded(role):
            out = src.arrays
        else:
            out = _stack(self._map(lambda i: self._test_example(role, src, i), len(src)), role)
        out["label"] = out["label"].astype(np.int32, copy=False)
        return out

    def _test_example(self, role: str, src, i: int) -> dict:
        raise NotImplementedError

    def _check_example(self, name: str, example: dict) -> None:
        """Per-example label checks of the validation pass (raise ValueError)."""

    def _map(self, fn, n: int) -> list:
        threads = max(int(self.data.get("num_threads", 4)), 1)
        if threads == 1 or n < 64:
            return [fn(i) for i in range(n)]
        with ThreadPoolExecutor(threads, thread_name_prefix="ganda-data") as pool:
            return list(pool.map(fn, range(n)))

    def _validate(self, name: str, source, *, full: bool) -> None:
        """Decodes (``full``) or header-checks every example of a training stream."""
        if not full and hasattr(source, "files"):
            sources.FolderSource.validate(source)
            return

        def check(i):
            try:
                self._check_example(name, source[i])
            except ValueError as e:
                msg = str(e)
                files = [getattr(source, "files", None), getattr(source, "label_files", None)]
                if not any(f is not None and str(f[i]) in msg for f in files):
                    msg = f"{sources.describe_example(source, i)}: {msg}"
                raise ValueError(msg) from e

        self._map(check, len(source))


# ---------------------------------------------------------------------------
# Classification (PixelDA, CyCADA digits, GTA digits) and semi-supervised (CC-GAN)
# ---------------------------------------------------------------------------


class _ClassTask(TaskData):
    """One class id per image; class folders are named, and their names shared by all domains."""

    labelled_role = ""  # the domain whose training split defines the classes

    def check_config(self):
        for role in ROLES[self.task]:
            if self._embedded(role):
                if self.image_size != EMBEDDED_DIGITS_SIZE:
                    raise ValueError(
                        f"the embedded digits are {EMBEDDED_DIGITS_SIZE}x{EMBEDDED_DIGITS_SIZE}; "
                        f"set image_size={EMBEDDED_DIGITS_SIZE} (got {self.image_size})"
                    )
                if self.data.num_classes != 10:
                    raise ValueError(
                        f"the embedded digits have 10 classes, got {self.data.num_classes}"
                    )

    @functools.cached_property
    def _splits(self) -> dict[tuple[str, str], domains.Split]:
        """Every split the run reads, opened once (files listed, npz arrays read, checked)."""
        out = {}
        for name, (role, labelled) in self.streams.items():
            if (role, "train") not in out or labelled:
                try:
                    out[(role, "train")] = self._open(role, "train", labelled)
                except (ValueError, FileNotFoundError) as e:
                    if name != "target_labeled":
                        raise
                    raise type(e)(
                        f"{e}; the target oracle trains on labelled target training images: "
                        "give the target's train split labels, or set --config.train_oracle=False"
                    ) from e
        for role in self.test_roles():
            out[(role, "test")] = self._open(role, "test", True)
        self._names = self._resolve_classes(out)
        for (role, _), split in out.items():
            arrays = getattr(split.source, "arrays", None)
            if arrays is not None and "label" in arrays and not self._embedded(role):
                self._check_ids(arrays["label"], split.where)
        return out

    def _resolve_classes(self, splits: dict) -> tuple[str, ...]:
        """Checks the class folders among ``splits`` and relabels them by the shared names."""
        named = {k: s for k, s in splits.items() if s.class_names is not None}
        if not named:
            return ()
        ref_key = min(named, key=lambda k: (k[0] != self.labelled_role, k[1] != "train"))
        ref = named[ref_key]
        names = tuple(sorted(ref.class_names))
        for (role, split), s in named.items():
            extra = sorted(set(s.class_names) - set(names))
            own_train = (role, "train") in named and split != "train"
            if role == ref_key[0] or own_train:
                if extra:  # a test split's classes must all be trained on
                    raise ValueError(
                        f"data.{role}: classes {extra} of {s.where} are not in its training "
                        f"split ({sorted(names if role == ref_key[0] else named[(role, 'train')].class_names)})"
                    )
            elif set(s.class_names) != set(names):
                raise ValueError(
                    f"the domains have different class sets: {s.where} has "
                    f"{sorted(s.class_names)}, {ref.where} has {sorted(names)}"
                )
            if s.source.labels is not None:  # folder index -> index in the shared names
                lut = np.asarray([names.index(c) for c in s.class_names], np.int32)
                s.source.labels = lut[s.source.labels]
        if len(names) != self.data.num_classes:
            raise ValueError(
                f"{ref.where} has {len(names)} classes {list(names)[:10]}, but "
                f"data.num_classes={self.data.num_classes}; set "
                f"--config.data.num_classes={len(names)}"
            )
        return names

    def class_names(self):
        self._splits  # noqa: B018 - resolves the names
        return self._names or super().class_names()

    def _check_ids(self, labels, where: str) -> None:
        labels = np.asarray(labels)
        bad = (labels < 0) | (labels >= self.data.num_classes)
        if bad.any():
            raise ValueError(
                f"{where}: labels {np.unique(labels[bad])[:8].tolist()} outside "
                f"[0, {self.data.num_classes}) (data.num_classes={self.data.num_classes})"
            )

    def _resize(self, example: dict, rng=None) -> dict:
        out = dict(example)
        out["image"] = pipeline.center_resize(example["image"], size=self.image_size)
        if "label" in out:
            self._check_ids(out["label"], "label")
        return out

    def _test_example(self, role, src, i):
        try:
            return self._resize(src[i])
        except ValueError as e:
            raise ValueError(f"{sources.describe_example(src, i)}: {e}") from e

    def _open_split(self, role, split, labels):
        out = self._splits[(role, split)]  # opened with labels if any stream needs them
        if labels:
            if out.class_names is None and "label" not in out.source[0]:
                raise ValueError(f"data.{role}: the {split} split has no labels ({out.where})")
            return out
        return dataclasses.replace(out, source=without_labels(out.source))

    def _check_example(self, name, example):
        if "label" in example:
            self._check_ids(example["label"], "label")


class Classification(_ClassTask):
    """Labelled source, unlabelled target."""

    task = "classify"
    streams = {"source": ("source_domain", True), "target": ("target_domain", False)}
    labelled_role = "source_domain"

    def _transform(self, name):
        return None if self._embedded(self.streams[name][0]) else self._resize


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


def _scan_labeled(src, per_class: int, num_classes: int, seed: int) -> np.ndarray:
    """:func:`labeled_indices` for a source without cheap labels (tfds: reads in that order)."""
    order = np.random.default_rng([seed, 0x5E71]).permutation(len(src))
    counts = np.zeros(num_classes, np.int64)
    picked = []
    for i in order:
        label = int(src[int(i)]["label"])
        if not 0 <= label < num_classes:
            raise ValueError(
                f"{sources.describe_example(src, int(i))}: label {label} outside [0, {num_classes})"
            )
        if counts[label] < per_class:
            counts[label] += 1
            picked.append(int(i))
            if counts.min() == per_class:
                break
    if counts.min() < per_class:
        short = {c: int(n) for c, n in enumerate(counts) if n < per_class}
        raise ValueError(
            f"labels_per_class={per_class}, but some classes have fewer examples: {short}"
        )
    return np.sort(np.asarray(picked))


class SemiSupervised(_ClassTask):
    """``labels_per_class`` labelled examples of every class, and the unlabelled images.

    The labelled subset is drawn once from the training split in a seeded order
    (:func:`labeled_indices`); the unlabelled stream is ``data.unlabeled_split`` of the
    domain (e.g. STL-10's 'unlabelled'), or the training split with its labels hidden.
    """

    task = "semi"
    streams = {"labeled": ("domain", True), "unlabeled": ("domain", False)}
    labelled_role = "domain"

    def check_config(self):
        super().check_config()
        if self.data.labels_per_class < 1:
            raise ValueError(
                f"data.labels_per_class must be >= 1, got {self.data.labels_per_class}"
            )

    @functools.cached_property
    def _labeled(self) -> sources.ArraySource:
        d, split = self.data, self._splits[("domain", "train")]
        src = split.source
        labels = getattr(src, "labels", None)
        if labels is None and isinstance(src, sources.ArraySource):
            labels = src.arrays["label"]
        if labels is not None:
            idx = labeled_indices(np.asarray(labels), d.labels_per_class, d.num_classes, d.seed)
        else:
            idx = _scan_labeled(src, d.labels_per_class, d.num_classes, d.seed)
        if self._embedded("domain"):
            arrays = {k: v[idx] for k, v in src.arrays.items()}
        else:  # in memory, resized once
            arrays = _stack(
                self._map(lambda i: self._resize(src[int(idx[i])]), len(idx)), "labelled subset"
            )
        return sources.ArraySource(arrays, name=f"{split.where} labelled subset")

    def _train(self, name):
        if name == "labeled":
            return self._labeled
        d = self.data
        if d.unlabeled_split:
            block = ml_collections.ConfigDict(d.domain.to_dict())
            block.train_split = d.unlabeled_split
            return domains.open_split(
                block,
                "domain",
                "train",
                task=self.task,
                data=d,
                image_size=self.image_size,
                labels=False,
                holdout=False,
            ).source
        return self._open_split("domain", "train", False).source

    def _transform(self, name):
        if name == "labeled" or self._embedded("domain"):
            return None
        return self._resize


# ---------------------------------------------------------------------------
# Segmentation (GTA-seg, CyCADA segmentation)
# ---------------------------------------------------------------------------


class Segmentation(TaskData):
    """Labelled source, unlabelled target, a class id per pixel (``ignore_index`` for void)."""

    task = "segment"
    streams = {"source": ("source_domain", True), "target": ("target_domain", False)}

    def check_config(self):
        d = self.data
        if not 0 < d.num_classes <= 255 or d.num_classes > d.ignore_index:
            raise ValueError(
                f"need 0 < num_classes <= ignore_index <= 255 (labels are stored as uint8); "
                f"got num_classes={d.num_classes}, ignore_index={d.ignore_index}"
            )
        for role in ROLES[self.task]:
            if d[role].label_map not in seg.LABEL_MAPS:
                raise ValueError(
                    f"unknown data.{role}.label_map {d[role].label_map!r}; expected one of "
                    f"{seg.LABEL_MAPS}"
                )
            if self._embedded(role):
                if self.image_size < 16:
                    raise ValueError(
                        "the embedded segmentation scenes need image_size >= 16, "
                        f"got {self.image_size}"
                    )
                if d.num_classes != synthetic.NUM_SEG_CLASSES:
                    raise ValueError(
                        f"the embedded segmentation scenes have {synthetic.NUM_SEG_CLASSES} "
                        f"classes {synthetic.SEG_CLASS_NAMES}; set data.num_classes="
                        f"{synthetic.NUM_SEG_CLASSES} (got {d.num_classes})"
                    )

    def class_names(self):
        d = self.data
        roles = ROLES[self.task]
        if all(self._embedded(r) for r in roles):
            names = synthetic.SEG_CLASS_NAMES
        elif any(d[r].label_map == "cityscapes19" for r in roles):
            names = seg.CITYSCAPES_19_NAMES
        else:
            names = ()
        return tuple(names) if len(names) == d.num_classes else super().class_names()

    def _label_fn(self, role):
        return functools.partial(
            seg.to_class_map,
            num_classes=self.data.num_classes,
            ignore_index=self.data.ignore_index,
            label_map=self.data[role].label_map,
        )

    def _transform(self, name):
        role = self.streams[name][0]
        if self._embedded(role):
            if not self.data.flip:
                return None
            return functools.partial(seg.joint_transform, image_size=self.image_size, flip=True)
        return functools.partial(
            seg.joint_transform,
            image_size=self.image_size,
            load_size=self.data.load_size,
            flip=self.data.flip,
            label_fn=self._label_fn(role),
        )

    def _zero_labels(self, batch_size):
        return np.zeros((batch_size, self.image_size, self.image_size), np.uint8)

    def _test_example(self, role, src, i):
        try:
            return seg.joint_transform(
                src[i],
                None,
                image_size=self.image_size,
                label_fn=self._label_fn(role),
                train=False,
            )
        except ValueError as e:
            raise ValueError(f"{sources.describe_example(src, i)}: {e}") from e

    def _check_example(self, name, example):
        if "label" in example:
            self._label_fn(self.streams[name][0])(example["label"])


# ---------------------------------------------------------------------------
# Unpaired translation (CycleGAN, DiscoGAN)
# ---------------------------------------------------------------------------


class Translation(TaskData):
    """Two unlabelled domains; the embedded pair also has a paired test split (hidden truth)."""

    task = "translate"
    streams = {"A": ("A", False), "B": ("B", False)}
    holdout = False

    def test_roles(self):
        return ()  # no labels: the only test split with a truth is the embedded pair's

    def _transform(self, name):
        if self._embedded(name):
            return None
        return pipeline.image_transform(
            pipeline.resize_crop_flip,
            load_size=self.data.load_size or self.image_size,
            crop_size=self.image_size,
            flip=self.data.flip,
        )

    def _embedded_pair(self, split: str) -> dict[str, np.ndarray] | None:
        if not all(self._embedded(r) for r in ("A", "B")):
            return None
        num = self.data.num_train if split == "train" else self.data.num_test
        return {
            r: domains.embedded_arrays(
                "translate", self.data[r].name or r, split, num, self.data.seed, self.image_size
            )["image"]
            for r in ("A", "B")
        }

    def paired_test(self) -> dict[str, np.ndarray] | None:
        """Test images with their true counterparts (``B[i]`` is ``A[i]`` translated), if known."""
        return self._embedded_pair("test")

    def train_mean(self, role: str) -> np.ndarray | None:
        """Mean training image of a domain of the embedded pair (a constant baseline)."""
        pair = self._embedded_pair("train")
        return None if pair is None else pair[role].mean(0)
