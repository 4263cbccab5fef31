"""Deterministic, resumable, multi-process input pipeline (numpy + threads).

Training input
==============

A training dataset is a dict of named *streams* (``dict[str, Source]``, see
:mod:`ganda_jax.data.sources`), e.g. ``{'A': horses, 'B': zebras}``.
:class:`Loader` turns it into batches ``{'A': {'image': [b, H, W, 3]},
'B': {...}}`` where ``b`` is this process's share of the global batch.

Determinism contract
--------------------

The batch for training step ``step`` is a *pure function* of
``(seed, step, global_batch_size, stream names, the sources, the
transforms)``: it does not depend on threads, prefetching, the order in which
steps are requested, or the number of processes. Concretely, with ``B`` the
global batch size and ``n = len(stream)``:

* every stream has its own shuffle: the order of epoch ``e`` is
  ``perm(seed, crc32(name), e) = default_rng([seed, crc32(name), e, 2**32-1])
  .permutation(n)`` (``zlib.crc32`` of the UTF-8 name, *not* Python's salted
  ``hash()``; the trailing constant keeps these seeds disjoint from the
  per-example ones below). Streams are therefore shuffled independently, which
  is what makes ``A`` and ``B`` unpaired, and a stream's order does not depend
  on which other streams are present;
* global example slot ``k`` (``0 <= k < B``) of step ``s`` is the stream's
  ``slot = s * B + k``-th example overall: ``epoch = slot // n`` and
  ``index = perm(epoch)[slot % n]``. Epochs follow each other seamlessly (a
  batch may straddle two epochs; every batch is full), and within every epoch
  each example is seen exactly once;
* the per-example transform gets ``rng = default_rng([seed, crc32(name), s,
  k])``, so random crops/flips depend only on the slot, never on the thread
  or process that computes them;
* process ``p`` of ``P`` gets the global rows ``[p * B/P, (p+1) * B/P)``.
  Concatenating the slices of all processes gives exactly the single-process
  batch.

Resuming at step ``N`` therefore needs nothing but ``N``: ``iterate(N)``
yields ``batch(N), batch(N+1), ...``. The position can even be resumed with a
different number of processes. :meth:`Loader.state` / :meth:`Loader.check_state`
serialise the position and check that a checkpoint matches the configuration.

Evaluation input
================

:func:`epoch_iterator` walks one source sequentially, without shuffling; the
last partial batch is padded and a boolean ``mask`` field marks the real
rows, so no example is lost or counted twice.

Transforms
==========

A transform is ``fn(example: dict, rng: np.random.Generator) -> dict``,
numpy only, deterministic given ``rng``. :func:`image_transform` lifts the
image functions here (:func:`resize_crop_flip`, :func:`random_crop_flip`,
:func:`center_resize`, all ``fn(image, rng, **kwargs)``) to example
transforms.
"""

from __future__ import annotations

import itertools
import math
import queue
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from ganda_jax.data.sources import describe_example

__all__ = [
    "EpochIterator",
    "Loader",
    "Transform",
    "center_resize",
    "epoch_iterator",
    "epoch_permutation",
    "example_rng",
    "image_transform",
    "prefetch_iterator",
    "random_crop_flip",
    "resize_crop_flip",
    "stream_hash",
    "to_global",
]

Example = dict[str, np.ndarray]
Transform = Callable[[Example, np.random.Generator], Example]

#: Appended to the permutation seeds so they never equal a per-example seed
#: ``[seed, crc32, step, k]`` (``k`` is a row index, always < 2**32 - 1).
_PERM_TAG = 2**32 - 1
_STATE_VERSION = 1


# ---------------------------------------------------------------------------
# The seeds of the determinism contract.
# ---------------------------------------------------------------------------


def stream_hash(name: str) -> int:
    """Stable 32-bit hash of a stream name (``zlib.crc32`` of its UTF-8 bytes)."""
    return zlib.crc32(name.encode("utf-8"))


def epoch_permutation(seed: int, stream: str, epoch: int, n: int) -> np.ndarray:
    """The order in which stream ``stream`` (of ``n`` examples) is read in ``epoch``."""
    rng = np.random.default_rng([seed, stream_hash(stream), epoch, _PERM_TAG])
    return rng.permutation(n)


def example_rng(seed: int, stream: str, step: int, k: int) -> np.random.Generator:
    """The rng given to the transform of global row ``k`` of ``stream`` at ``step``."""
    return np.random.default_rng([seed, stream_hash(stream), step, k])


# ---------------------------------------------------------------------------
# Image transforms: fn(image uint8 [H, W, C], rng, **kwargs) -> image.
# ---------------------------------------------------------------------------


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic resize with PIL (as the CycleGAN reference implementation)."""
    if image.shape[:2] == (height, width):
        return image
    pil = Image.fromarray(image)
    return np.asarray(pil.resize((width, height), Image.BICUBIC))


def _crop_flip(
    image: np.ndarray, rng: np.random.Generator, crop_size: int, flip: bool
) -> np.ndarray:
    """Random ``crop_size`` square crop, then a horizontal flip with prob. 1/2.

    Draws, in this order: top, left, then (if ``flip``) the flip coin.
    """
    h, w = image.shape[:2]
    top = int(rng.integers(0, h - crop_size + 1))
    left = int(rng.integers(0, w - crop_size + 1))
    image = image[top : top + crop_size, left : left + crop_size]
    if flip and rng.random() < 0.5:
        image = image[:, ::-1]
    return np.ascontiguousarray(image)


def _check_size(value: Any, name: str) -> int:
    if not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def resize_crop_flip(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    load_size: int,
    crop_size: int,
    flip: bool = True,
) -> np.ndarray:
    """CycleGAN's ``resize_and_crop``: resize to ``load_size`` square (bicubic),
    random ``crop_size`` crop, random horizontal flip (if ``flip``).

    The aspect ratio is not preserved (as in the reference implementation).
    """
    load_size = _check_size(load_size, "load_size")
    crop_size = _check_size(crop_size, "crop_size")
    if crop_size > load_size:
        raise ValueError(f"crop_size={crop_size} is larger than load_size={load_size}")
    return _crop_flip(_resize(image, load_size, load_size), rng, crop_size, flip)


def random_crop_flip(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    crop_size: int,
    flip: bool = True,
) -> np.ndarray:
    """CycleGAN's ``crop`` mode: random ``crop_size`` crop without resizing,
    then a random horizontal flip (if ``flip``).

    Raises:
      ValueError: the image is smaller than the crop (the loader adds the
        stream and file to the message).
    """
    crop_size = _check_size(crop_size, "crop_size")
    h, w = image.shape[:2]
    if h < crop_size or w < crop_size:
        raise ValueError(
            f"image of size {h}x{w} (HxW) is smaller than crop_size={crop_size}; "
            "resize it first (resize_crop_flip) or use a smaller crop_size"
        )
    return _crop_flip(image, rng, crop_size, flip)


def center_resize(
    image: np.ndarray, rng: np.random.Generator | None = None, *, size: int
) -> np.ndarray:
    """Evaluation preprocessing: resize the shorter side to ``size`` (bicubic),
    then take the central ``size x size`` square. ``rng`` is ignored (it is there
    so that every image function has the same signature)."""
    del rng
    size = _check_size(size, "size")
    h, w = image.shape[:2]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    image = _resize(image, new_h, new_w)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return np.ascontiguousarray(image[top : top + size, left : left + size])


def image_transform(
    fn: Callable[..., np.ndarray], *, field: str = "image", **kwargs: Any
) -> Transform:
    """Lifts an image function ``fn(image, rng, **kwargs)`` to an example transform.

    Example::

      train = image_transform(resize_crop_flip, load_size=286, crop_size=256)
      loader = Loader({'A': a, 'B': b}, transforms={'A': train, 'B': train}, ...)
    """

    def transform(example: Example, rng: np.random.Generator) -> Example:
        if field not in example:
            raise KeyError(f"example has no field {field!r} (fields: {sorted(example)})")
        out = dict(example)
        out[field] = fn(example[field], rng, **kwargs)
        return out

    name = getattr(fn, "__name__", "fn")
    transform.__name__ = transform.__qualname__ = f"image_transform({name})"
    return transform


# ---------------------------------------------------------------------------
# Loading helpers shared by Loader and EpochIterator.
# ---------------------------------------------------------------------------


def _with_context(exc: BaseException, context: str) -> BaseException:
    """A copy of ``exc`` (same type where possible) with ``context`` prefixed."""
    message = f"{context}: {exc}"
    try:
        new = type(exc)(message)
    except Exception:  # noqa: BLE001
        new = RuntimeError(message)
    if str(new) != message and not isinstance(new, KeyError):
        new = RuntimeError(message)
    return new


def _stack(examples: list[Example], what: str) -> dict[str, np.ndarray]:
    """Stacks examples field by field; a clear error if fields/shapes differ."""
    keys = list(examples[0])
    for ex in examples[1:]:
        if set(ex) != set(keys):
            raise ValueError(
                f"{what}: examples have different fields {sorted(keys)} vs {sorted(ex)}"
            )
    out = {}
    for key in keys:
        arrays = [np.asarray(ex[key]) for ex in examples]
        shapes = sorted({a.shape for a in arrays})
        if len(shapes) > 1:
            raise ValueError(
                f"{what}: field {key!r} has different shapes across examples "
                f"{shapes[:4]}; add a resize/crop transform so all examples match"
            )
        out[key] = np.stack(arrays)
    return out


class _Workers:
    """Runs a list of calls on a lazily created thread pool, results in order.

    ``num_threads <= 1`` runs everything in the calling thread.
    """

    def __init__(self, num_threads: int, name: str):
        if not isinstance(num_threads, int) or num_threads < 0:
            raise ValueError(f"num_threads must be an integer >= 0, got {num_threads!r}")
        self._num_threads = num_threads
        self._name = name
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def map(self, fn: Callable[..., Any], args: list[tuple]) -> list[Any]:
        if self._num_threads <= 1 or len(args) <= 1:
            return [fn(*a) for a in args]
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._num_threads, thread_name_prefix=self._name)
            pool = self._pool
        futures: list[Future] = [pool.submit(fn, *a) for a in args]
        try:
            return [f.result() for f in futures]
        finally:
            for f in futures:  # After an error: drop the work not started yet.
                f.cancel()

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None


def _check_source(name: str, source: Any) -> int:
    if not (hasattr(source, "__len__") and hasattr(source, "__getitem__")):
        raise TypeError(
            f"stream {name!r}: a source needs __len__ and __getitem__, got {type(source).__name__}"
        )
    n = len(source)
    if n <= 0:
        raise ValueError(f"stream {name!r} is empty (0 examples)")
    return n


def _process_defaults(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        if process_index is None:
            process_index = jax.process_index()
        if process_count is None:
            process_count = jax.process_count()
    if not isinstance(process_count, (int, np.integer)) or process_count < 1:
        raise ValueError(f"process_count must be a positive integer, got {process_count!r}")
    if not isinstance(process_index, (int, np.integer)) or not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index!r}")
    return int(process_index), int(process_count)


# ---------------------------------------------------------------------------
# Prefetching.
# ---------------------------------------------------------------------------

_ITEM, _DONE, _ERROR = "item", "done", "error"


def prefetch_iterator(
    iterator: Iterable[Any], size: int, *, name: str = "ganda-prefetch"
) -> Iterator[Any]:
    """Runs ``iterator`` in a background thread, ``size`` items ahead.

    Exceptions raised by ``iterator`` are re-raised in the consumer (at the
    position where they happened). Closing the returned generator (``break``,
    ``.close()``, garbage collection) stops the thread. ``size <= 0`` iterates
    synchronously.
    """
    if size <= 0:
        yield from iterator
        return
    q: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()

    def put(item: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for item in iterator:
                if not put((_ITEM, item)):
                    return
            put((_DONE, None))
        except BaseException as e:  # noqa: BLE001
            put((_ERROR, e))

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            try:
                kind, payload = q.get(timeout=0.1)
            except queue.Empty:
                if not thread.is_alive() and q.empty():
                    raise RuntimeError(f"{name}: the prefetch thread died unexpectedly") from None
                continue
            if kind == _ITEM:
                yield payload
            elif kind == _DONE:
                return
            else:
                raise payload
    finally:
        stop.set()
        thread.join(timeout=10.0)


# ---------------------------------------------------------------------------
# Training loader.
# ---------------------------------------------------------------------------


class Loader:
    """Deterministic, resumable, multi-process batches of several streams.

    See the module docstring for the determinism contract. In short: the batch
    of ``step`` depends only on ``(seed, step)`` (and the configuration), each
    stream is shuffled independently, and process ``p`` of ``P`` gets rows
    ``[p*B/P, (p+1)*B/P)`` of the global batch of size ``B``.

    Args:
      streams: ``{name: source}``; every source needs ``__len__`` and
        ``__getitem__`` returning ``dict[str, np.ndarray]``.
      global_batch_size: examples per stream per step, over all processes.
      seed: non-negative integer < 2**32.
      transforms: ``{name: fn(example, rng) -> example}`` for some streams, or
        one callable for all streams, or ``None``.
      process_index, process_count: this process and the number of processes;
        default ``jax.process_index()`` / ``jax.process_count()``.
      num_threads: threads decoding/transforming examples (0/1: none).
      prefetch: batches prepared ahead by :meth:`iterate` (0: synchronous).
      drop_remainder: must be ``True``: training batches are always full, the
        example order wrapping seamlessly into the next epoch, so no example is
        dropped either. Use :func:`epoch_iterator` for exact single passes.

    Usage::

      loader = Loader({'A': a, 'B': b}, global_batch_size=8, seed=0,
                      transforms=image_transform(resize_crop_flip,
                                                 load_size=286, crop_size=256))
      for step, batch in zip(range(start, total), loader.iterate(start)):
        batch = to_global(batch, sharding)   # {'A': {'image': ...}, 'B': ...}
    """

    def __init__(
        self,
        streams: Mapping[str, Any],
        *,
        global_batch_size: int,
        seed: int,
        transforms: Mapping[str, Transform] | Transform | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
        num_threads: int = 4,
        prefetch: int = 2,
        drop_remainder: bool = True,
    ):
        if not isinstance(streams, Mapping) or not streams:
            raise ValueError("streams must be a non-empty dict {name: source}")
        for name in streams:
            if not isinstance(name, str):
                raise TypeError(f"stream names must be strings, got {name!r}")
        if (
            not isinstance(global_batch_size, (int, np.integer))
            or isinstance(global_batch_size, bool)
            or global_batch_size <= 0
        ):
            raise ValueError(
                f"global_batch_size must be a positive integer, got {global_batch_size!r}"
            )
        if (
            not isinstance(seed, (int, np.integer))
            or isinstance(seed, bool)
            or not 0 <= seed < 2**32
        ):
            raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
        if not drop_remainder:
            raise ValueError(
                "Loader always yields full batches (epochs wrap seamlessly, nothing "
                "is dropped); for one exact pass with a padded last batch use "
                "epoch_iterator()"
            )
        if not isinstance(prefetch, int) or prefetch < 0:
            raise ValueError(f"prefetch must be an integer >= 0, got {prefetch!r}")

        self.process_index, self.process_count = _process_defaults(process_index, process_count)
        self.global_batch_size = int(global_batch_size)
        if self.global_batch_size % self.process_count:
            raise ValueError(
                f"global_batch_size={self.global_batch_size} is not divisible by "
                f"process_count={self.process_count}; every process must get the same "
                "number of rows"
            )
        self.local_batch_size = self.global_batch_size // self.process_count
        self.seed = int(seed)
        self.prefetch = prefetch

        self._streams = dict(streams)
        self._sizes = {name: _check_source(name, src) for name, src in self._streams.items()}
        if transforms is None:
            self._transforms: dict[str, Transform | None] = {n: None for n in self._streams}
        elif callable(transforms) and not isinstance(transforms, Mapping):
            self._transforms = {n: transforms for n in self._streams}
        elif isinstance(transforms, Mapping):
            unknown = sorted(set(transforms) - set(self._streams))
            if unknown:
                raise ValueError(
                    f"transforms for unknown streams {unknown}; streams are {sorted(self._streams)}"
                )
            self._transforms = {n: transforms.get(n) for n in self._streams}
        else:
            raise TypeError(
                f"transforms must be a dict of callables, a callable or None, got "
                f"{type(transforms).__name__}"
            )

        self._workers = _Workers(num_threads, "ganda-load")
        self._perm_cache: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._perm_lock = threading.Lock()

    # -- positions --------------------------------------------------------------

    @property
    def stream_sizes(self) -> dict[str, int]:
        """Number of examples of each stream."""
        return dict(self._sizes)

    def epoch(self, step: int) -> dict[str, float]:
        """How many epochs of each stream have been consumed before ``step``."""
        return {n: step * self.global_batch_size / size for n, size in self._sizes.items()}

    def _permutation(self, name: str, epoch: int) -> np.ndarray:
        key = (name, epoch)
        with self._perm_lock:
            perm = self._perm_cache.get(key)
            if perm is not None:
                self._perm_cache.move_to_end(key)
                return perm
        perm = epoch_permutation(self.seed, name, epoch, self._sizes[name])
        with self._perm_lock:
            self._perm_cache[key] = perm
            while len(self._perm_cache) > 3 * len(self._sizes):
                self._perm_cache.popitem(last=False)
        return perm

    def _rows(self) -> np.ndarray:
        """The global row numbers ``k`` of this process."""
        start = self.process_index * self.local_batch_size
        return np.arange(start, start + self.local_batch_size, dtype=np.int64)

    def indices(self, step: int) -> dict[str, np.ndarray]:
        """Source indices of this process's rows at ``step``, per stream."""
        step = self._check_step(step)
        slots = step * self.global_batch_size + self._rows()
        out = {}
        for name, n in self._sizes.items():
            epochs, positions = np.divmod(slots, n)
            idx = np.empty_like(slots)
            for e in np.unique(epochs):
                sel = epochs == e
                idx[sel] = self._permutation(name, int(e))[positions[sel]]
            out[name] = idx
        return out

    @staticmethod
    def _check_step(step: Any) -> int:
        if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        return int(step)

    # -- loading ----------------------------------------------------------------

    def _load(self, name: str, step: int, k: int, index: int) -> Example:
        source = self._streams[name]
        try:
            example = source[index]
            transform = self._transforms[name]
            if transform is not None:
                example = transform(example, example_rng(self.seed, name, step, k))
            if not isinstance(example, Mapping):
                raise TypeError(
                    f"expected a dict example, got {type(example).__name__} (does the "
                    "transform return the example?)"
                )
        except Exception as e:
            context = f"stream {name!r}, {describe_example(source, index)} (step {step})"
            raise _with_context(e, context) from e
        return dict(example)

    def batch(self, step: int) -> dict[str, dict[str, np.ndarray]]:
        """This process's slice of the global batch of training step ``step``.

        Returns ``{stream: {field: array [local_batch_size, ...]}}``.
        """
        step = self._check_step(step)
        indices = self.indices(step)
        rows = self._rows()
        calls = [
            (name, step, int(k), int(i))
            for name in self._streams
            for k, i in zip(rows, indices[name])
        ]
        examples = self._workers.map(self._load, calls)
        out = {}
        b = self.local_batch_size
        for j, name in enumerate(self._streams):
            out[name] = _stack(examples[j * b : (j + 1) * b], f"stream {name!r} step {step}")
        return out

    def iterate(
        self, start_step: int = 0, num_steps: int | None = None
    ) -> Iterator[dict[str, dict[str, np.ndarray]]]:
        """Yields ``batch(start_step), batch(start_step + 1), ...`` (forever, or
        ``num_steps`` batches), prepared ``prefetch`` batches ahead in a background
        thread. Loading errors are raised here, in the consumer."""
        start_step = self._check_step(start_step)
        if num_steps is None:
            steps: Iterable[int] = itertools.count(start_step)
        else:
            steps = range(start_step, start_step + int(num_steps))
        return prefetch_iterator((self.batch(s) for s in steps), self.prefetch)

    # -- checkpointing ----------------------------------------------------------

    def state(self, step: int) -> dict[str, Any]:
        """JSON-serialisable position: resuming needs only ``step``; the rest lets
        :meth:`check_state` verify that the data configuration is unchanged."""
        return {
            "version": _STATE_VERSION,
            "step": self._check_step(step),
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "stream_sizes": dict(self._sizes),
        }

    def check_state(self, state: Mapping[str, Any]) -> int:
        """Checks a :meth:`state` from a checkpoint against this loader.

        Returns the step to resume from. Raises ``ValueError`` listing every
        mismatch (a different seed, batch size, stream names or sizes would make
        the resumed run see a different data order). The process count may differ.
        """
        if not isinstance(state, Mapping) or "step" not in state:
            raise ValueError(f"not a loader state: {state!r:.200}")
        if state.get("version", _STATE_VERSION) != _STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} is not supported")
        mine = self.state(0)
        problems = []
        for key in ("seed", "global_batch_size"):
            if key in state and state[key] != mine[key]:
                problems.append(f"{key}: checkpoint {state[key]!r} vs now {mine[key]!r}")
        if "stream_sizes" in state:
            theirs = dict(state["stream_sizes"])
            if theirs != mine["stream_sizes"]:
                problems.append(f"stream_sizes: checkpoint {theirs} vs now {mine['stream_sizes']}")
        if problems:
            raise ValueError("loader state does not match this loader: " + "; ".join(problems))
        return self._check_step(state["step"])

    def close(self) -> None:
        """Shuts down the decoding threads (the loader can still be used after)."""
        self._workers.close()

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Loader(streams={self._sizes}, global_batch_size={self.global_batch_size}, "
            f"seed={self.seed}, process {self.process_index}/{self.process_count})"
        )


# ---------------------------------------------------------------------------
# Global arrays.
# ---------------------------------------------------------------------------


def to_global(batch: Any, sharding: Any) -> Any:
    """Turns a process-local numpy batch (nested dict) into global ``jax.Array``s.

    Each leaf is assembled with ``jax.make_array_from_process_local_data``;
    ``sharding`` is typically ``NamedSharding(mesh, P('data'))``, so the global
    leading dimension is the sum of all processes' local ones.
    """
    import jax

    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch
    )


# ---------------------------------------------------------------------------
# Evaluation.
# ---------------------------------------------------------------------------


class EpochIterator:
    """One sequential pass over a source, in (padded) batches; see
    :func:`epoch_iterator`. ``len()`` is the number of batches; iterating again
    starts a new pass."""

    def __init__(
        self,
        source: Any,
        *,
        batch_size: int,
        transform: Transform | None = None,
        seed: int = 0,
        process_index: int | None = None,
        process_count: int | None = None,
        num_threads: int = 4,
        prefetch: int = 2,
        mask_key: str = "mask",
        index_key: str = "index",
    ):
        if (
            not isinstance(batch_size, (int, np.integer))
            or isinstance(batch_size, bool)
            or batch_size <= 0
        ):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.process_index, self.process_count = _process_defaults(process_index, process_count)
        if batch_size % self.process_count:
            raise ValueError(
                f"batch_size={batch_size} is not divisible by process_count="
                f"{self.process_count}; every process must get the same number of rows"
            )
        if mask_key == index_key:
            raise ValueError("mask_key and index_key must differ")
        self.source = source
        self.size = _check_source("eval", source)
        self.batch_size = int(batch_size)
        self.local_batch_size = self.batch_size // self.process_count
        self.transform = transform
        self.seed = int(seed)
        self.prefetch = prefetch
        self.mask_key = mask_key
        self.index_key = index_key
        self._workers = _Workers(num_threads, "ganda-eval")

    def __len__(self) -> int:
        return math.ceil(self.size / self.batch_size)

    def _load(self, index: int) -> Example:
        try:
            example = self.source[index]
            if self.transform is not None:
                example = self.transform(example, np.random.default_rng([self.seed, index]))
            if not isinstance(example, Mapping):
                raise TypeError(f"expected a dict example, got {type(example).__name__}")
        except Exception as e:
            raise _with_context(e, f"eval source, {describe_example(self.source, index)}") from e
        for key in (self.mask_key, self.index_key):
            if key in example:
                raise ValueError(
                    f"eval source examples already have a field {key!r}; pass another "
                    f"mask_key/index_key to epoch_iterator"
                )
        return dict(example)

    def batch(self, b: int) -> dict[str, np.ndarray]:
        """This process's rows of eval batch ``b`` (``0 <= b < len(self)``)."""
        start = b * self.batch_size + self.process_index * self.local_batch_size
        indices = np.arange(start, start + self.local_batch_size)
        valid = indices < self.size
        real = [int(i) for i in indices[valid]]
        examples = self._workers.map(self._load, [(i,) for i in real])
        if not valid.all():  # Pad with copies of one real example (masked out).
            filler = examples[0] if examples else self._load(0)
            examples += [filler] * int((~valid).sum())
        out = _stack(examples, f"eval batch {b}")
        out[self.mask_key] = valid
        out[self.index_key] = np.where(valid, indices, -1).astype(np.int32)
        return out

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return prefetch_iterator(
            (self.batch(b) for b in range(len(self))),
            self.prefetch,
            name="ganda-eval-prefetch",
        )

    def close(self) -> None:
        self._workers.close()


def epoch_iterator(source: Any, *, batch_size: int, **kwargs: Any) -> EpochIterator:
    """Sequential, unshuffled pass over ``source`` for evaluation.

    ``batch_size`` is global: batch ``b`` holds examples ``[b*B, (b+1)*B)`` and
    process ``p`` of ``P`` gets rows ``[p*B/P, (p+1)*B/P)`` of it. The last batch
    is padded to full size (with copies of a real example); a boolean ``mask``
    field is ``True`` exactly for real rows, and an int32 ``index`` field holds
    the source index (``-1`` for padding). Over all processes and batches every
    example appears exactly once with ``mask=True``. Every process gets the
    same number of batches, ``ceil(len(source) / B)``.

    Keyword args (see :class:`EpochIterator`): ``transform`` (``fn(example, rng)``
    with ``rng = default_rng([seed, index])``), ``seed``, ``process_index``,
    ``process_count``, ``num_threads``, ``prefetch``, ``mask_key``, ``index_key``.
    """
    return EpochIterator(source, batch_size=batch_size, **kwargs)
