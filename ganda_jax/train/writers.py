"""Metric and image summaries (JSONL + PNG + TensorBoard) and progress logging.

Layout of a work directory written by :class:`MetricWriter`::

    workdir/
      metrics.jsonl                  one JSON object per write_scalars call
      samples/{name}_{step:07d}.png  one PNG per image per write_images call
      tensorboard/events.out.tfevents.*

Only process 0 writes by default (``jax.process_index() == 0``), so every
process of a multi-host job can call the writer unconditionally.

``metrics.jsonl`` is the source of truth (easy to parse, diff and plot without
TensorBoard); read it back with :func:`read_metrics`. Each line is
``{"step": <int>, "<name>": <float or null>, ...}``. Values are converted
with ``float(np.asarray(v))``; **non-finite values (NaN, +-inf) are written
as JSON ``null``** so that every line is strict, valid JSON (Python's default
``NaN`` token is not); TensorBoard still receives the raw value.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from PIL import Image

from ganda_jax.metrics.image_metrics import to_uint8

__all__ = [
    "MetricWriter",
    "ProgressLogger",
    "format_eta",
    "format_progress",
    "image_grid",
    "read_metrics",
]

METRICS_FILENAME = "metrics.jsonl"
SAMPLES_DIRNAME = "samples"
TENSORBOARD_DIRNAME = "tensorboard"


def _to_float(name: str, value: Any) -> float:
    """``float(np.asarray(value))``, with a clear error for non-scalars."""
    array = np.asarray(value)
    if array.size != 1:
        raise ValueError(f"Scalar {name!r} must have exactly one element, got shape {array.shape}.")
    return float(array.reshape(()))


def _json_value(value: float) -> float | None:
    """Finite floats as-is; NaN and +-inf as ``None`` (JSON ``null``)."""
    return value if math.isfinite(value) else None


def _as_uint8_image(name: str, image: Any) -> np.ndarray:
    """Validates one ``HxW``, ``HxWx1``, ``HxWx3`` or ``HxWx4`` image; returns uint8."""
    image = to_uint8(np.asarray(image))
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"Image {name!r} must be HxW or HxWxC with C in (1, 3, 4), got shape {image.shape}; "
            "combine a batch into one image with image_grid()."
        )
    return image


class MetricWriter:
    """Writes scalars to ``metrics.jsonl`` + TensorBoard and images to PNG + TensorBoard.

    Example::

        writer = MetricWriter(workdir)
        writer.write_scalars(step, {"loss_G": g, "loss_D": d})  # jax arrays OK
        writer.write_images(step, {"train/A2B": image_grid([a, fake_b, rec_a])})
        writer.close()

    Also usable as a context manager. Scalar values may be Python numbers,
    NumPy or JAX arrays with one element; converting a JAX array waits for the
    computation that produces it, so write scalars every N steps, not every
    step.

    Args:
        workdir: Directory for all outputs (created if needed, only when
            enabled).
        tensorboard: Also write TensorBoard event files to
            ``workdir/tensorboard/`` (via tensorboardX; no TensorFlow needed).
        enabled: Whether this process writes anything. Defaults to
            ``jax.process_index() == 0``. A disabled writer creates no files
            and all its methods are no-ops.
    """

    def __init__(self, workdir: str, *, tensorboard: bool = True, enabled: bool | None = None):
        self.workdir = os.fspath(workdir)
        self.enabled = (jax.process_index() == 0) if enabled is None else bool(enabled)
        self._jsonl = None
        self._tb = None
        self._closed = False
        if not self.enabled:
            return
        os.makedirs(self.workdir, exist_ok=True)
        path = os.path.join(self.workdir, METRICS_FILENAME)
        # Kept open for the writer's lifetime; closed in close().
        self._jsonl = open(path, "a", encoding="utf-8")  # noqa: SIM115
        # After a crash the file may end in a truncated line with no newline;
        # start on a fresh line so that the next record is not glued onto it.
        if self._jsonl.tell() > 0:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    self._jsonl.write("\n")
        if tensorboard:
            from tensorboardX import SummaryWriter  # Lazy: heavy import.

            self._tb = SummaryWriter(logdir=os.path.join(self.workdir, TENSORBOARD_DIRNAME))

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.workdir, METRICS_FILENAME)

    @property
    def samples_dir(self) -> str:
        return os.path.join(self.workdir, SAMPLES_DIRNAME)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("MetricWriter is closed.")

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Appends ``{"step": step, **scalars}`` as one line to ``metrics.jsonl``.

        The line is written with a single ``write`` and flushed, so a crash
        leaves at most one truncated last line. Non-finite values become
        ``null``. Each scalar also goes to TensorBoard under its name (use
        ``"train/loss_G"``-style names to group them there).

        Raises:
            ValueError: if a value has more than one element or a key is
                ``"step"``.
        """
        if not self.enabled:
            return
        self._check_open()
        step = int(step)
        values = {}
        for name, value in scalars.items():
            if name == "step":
                raise ValueError(
                    "'step' is reserved in write_scalars; pass it as the step argument."
                )
            values[str(name)] = _to_float(name, value)
        record = {"step": step, **{k: _json_value(v) for k, v in values.items()}}
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(name, value, global_step=step)

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        """Saves each image as ``samples/{name}_{step:07d}.png`` and to TensorBoard.

        Args:
            step: Training step (file name and TensorBoard step).
            images: ``{name: image}``; each image a single ``HxWx3`` (or
                ``HxW`` / ``HxWx1`` / ``HxWx4``) array, uint8 in ``[0, 255]``
                or float in ``[-1, 1]`` (converted with
                :func:`~ganda_jax.metrics.image_metrics.to_uint8`). A ``/`` in the name
                becomes ``_`` in the file name; TensorBoard keeps the name as
                its tag. Use :func:`image_grid` to combine batches.
        """
        if not self.enabled:
            return
        self._check_open()
        step = int(step)
        os.makedirs(self.samples_dir, exist_ok=True)
        for name, image in images.items():
            image = _as_uint8_image(name, image)
            filename = f"{str(name).replace('/', '_')}_{step:07d}.png"
            pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
            pil.save(os.path.join(self.samples_dir, filename))
            if self._tb is not None:
                self._tb.add_image(str(name), image, global_step=step, dataformats="HWC")

    def flush(self) -> None:
        """Flushes ``metrics.jsonl`` and the TensorBoard writer."""
        if self._jsonl is not None and not self._closed:
            self._jsonl.flush()
        if self._tb is not None and not self._closed:
            self._tb.flush()

    def close(self) -> None:
        """Flushes and closes all files; further writes raise. Idempotent."""
        if self._closed:
            return
        self.flush()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        self._closed = True

    def __enter__(self) -> MetricWriter:  # noqa: PYI034
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def image_grid(rows: Sequence[Any], *, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tiles batches of images into one uint8 grid: one grid row per batch.

    Typical use: ``image_grid([real_a, fake_b, rec_a])`` shows each sample's
    real image, its translation and its reconstruction in one column.

    Args:
        rows: Sequence of ``R`` batches, each ``[N_r, H, W, C]`` (or
            ``[N_r, H, W]``), uint8 in ``[0, 255]`` or float in ``[-1, 1]``
            (each row converted independently with
            :func:`~ganda_jax.metrics.image_metrics.to_uint8`, so uint8 and float rows
            can be mixed). All images need the same ``H, W``. Single-channel
            rows (e.g. grayscale or masks) are repeated to the largest channel
            count among the rows. Rows may hold different numbers of images;
            the grid has ``N = max(N_r)`` columns and short rows leave blank
            (``pad_value``) cells on the right.
        pad: Pixels of ``pad_value`` between images and around the border.
        pad_value: uint8 fill value of padding and blank cells (255 = white).

    Returns:
        uint8 array of shape
        ``[R * H + (R + 1) * pad, N * W + (N + 1) * pad, C]``.
    """
    if len(rows) == 0:
        raise ValueError("image_grid needs at least one row.")
    batches = []
    for i, row in enumerate(rows):
        row = to_uint8(np.asarray(row))
        if row.ndim == 3:
            row = row[..., None]
        if row.ndim != 4:
            raise ValueError(f"image_grid row {i} must be [N, H, W, C], got shape {row.shape}.")
        batches.append(row)
    channels = max(b.shape[-1] for b in batches)
    batches = [np.repeat(b, channels, axis=-1) if b.shape[-1] == 1 else b for b in batches]
    h, w, c = batches[0].shape[1:]
    for i, b in enumerate(batches):
        if b.shape[1:] != (h, w, c):
            raise ValueError(
                f"image_grid row {i} has images of shape {b.shape[1:]}, expected {(h, w, c)}."
            )
    r, n = len(batches), max(len(b) for b in batches)
    grid = np.full((r * h + (r + 1) * pad, n * w + (n + 1) * pad, c), pad_value, np.uint8)
    for i, batch in enumerate(batches):
        top = pad + i * (h + pad)
        for j, image in enumerate(batch):
            left = pad + j * (w + pad)
            grid[top : top + h, left : left + w] = image
    return grid


def read_metrics(path: str) -> list[dict]:
    """Parses a ``metrics.jsonl`` file (or the workdir containing one).

    Returns one dict per valid line, in file order (``null`` values come back
    as ``None``). A line that is not valid JSON, typically the truncated last
    line of a run that crashed mid-write (which a resumed writer leaves on its
    own line), is skipped with a ``UserWarning``. Blank lines are ignored.
    Steps may repeat after a resume from an earlier checkpoint; no
    de-duplication is done.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILENAME)
    records = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                warnings.warn(
                    f"{path}: skipping malformed line {line_number} "
                    f"(truncated by a crash?): {line[:80]!r}"
                )
                continue
            if not isinstance(record, dict):
                warnings.warn(
                    f"{path}: skipping line {line_number}, not a JSON object: {line[:80]!r}"
                )
                continue
            records.append(record)
    return records


# -----------------------------------------------------------------------------
# Console progress.
# -----------------------------------------------------------------------------


def format_eta(seconds: float | None) -> str:
    """Formats a duration compactly: ``'42s'``, ``'2m11s'``, ``'1h02m03s'``, ``'2d03h04m'``.

    Rounds to whole seconds; ``None``, negative or non-finite input gives
    ``'?'``.
    """
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    total = round(seconds)
    days, rem = divmod(total, 86400)
    hours, rem = divmod(rem, 3600)
    minutes, secs = divmod(rem, 60)
    if days:
        return f"{days}d{hours:02d}h{minutes:02d}m"
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def format_progress(
    *,
    step: int,
    total_steps: int,
    steps_per_sec: float | None,
    images_per_sec: float | None = None,
    eta_seconds: float | None = None,
    scalars: Mapping[str, Any] | None = None,
) -> str:
    """The progress line, e.g.

    ``step 120/2000 | 14.3 it/s | 57.1 img/s | ETA 2m11s | loss_G 1.234 loss_D 0.456``

    Rates print as ``-`` when unknown (``None``); the ``img/s`` field is
    omitted when ``images_per_sec`` is ``None``; scalars use ``.4g`` format.
    """
    parts = [f"step {step}/{total_steps}"]
    parts.append("- it/s" if steps_per_sec is None else f"{steps_per_sec:.1f} it/s")
    if images_per_sec is not None:
        parts.append(f"{images_per_sec:.1f} img/s")
    parts.append(f"ETA {format_eta(eta_seconds)}")
    if scalars:
        parts.append(" ".join(f"{k} {_to_float(k, v):.4g}" for k, v in scalars.items()))
    return " | ".join(parts)


class ProgressLogger:
    """Progress lines like ``step 120/2000 | 14.3 it/s | 57.1 img/s | ETA 2m11s | loss_G 1.234``.

    Throughput is measured from wall time between consecutive calls that
    produce a line (:meth:`line`, :meth:`log`, or logging calls of
    ``__call__``), so the first such call only starts the clock: compilation
    and warm-up before it are excluded, and its line shows ``- it/s``.
    Converting the scalars to floats waits for the step that produced them, so
    the measured time covers the device work.

    Two ways to use it:

    * The caller decides when to log (as ``loop.py`` does)::

          progress = ProgressLogger(total_steps=total, batch_size=global_batch)
          if step % log_every == 0:
              progress.log(step, scalars)

    * Call it every step and let it gate on ``every``::

          progress = ProgressLogger(total_steps=total, batch_size=global_batch, every=100)
          for step in range(1, total + 1):
              state, metrics = train_step(state, batch)
              progress(step, metrics)  # logs when step % 100 == 0 or at the end

    Args:
        total_steps: Steps of the whole run (for ``step i/total`` and ETA).
        batch_size: Global batch size (all devices and hosts), for ``img/s``;
            ``None`` omits that field.
        every: Gating interval of ``__call__``; :meth:`log` ignores it.
        include_prefixes: Only scalars whose name starts with one of these
            prefixes are printed (default ``("loss",)``, i.e. ``loss_G``,
            ``loss/D``...; rates and learning rates already written elsewhere
            are left out). ``None`` prints all.
        log_fn: Where lines go; default ``absl.logging.info``.
        enabled: Whether to log at all; defaults to ``jax.process_index() == 0``.
        clock: Time source in seconds (injectable for tests).
    """

    def __init__(
        self,
        total_steps: int,
        *,
        batch_size: int | None = None,
        every: int = 100,
        include_prefixes: Sequence[str] | None = ("loss",),
        log_fn: Callable[[str], Any] = logging.info,
        enabled: bool | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}.")
        self.total_steps = int(total_steps)
        self.batch_size = batch_size
        self.every = int(every)
        self.include_prefixes = None if include_prefixes is None else tuple(include_prefixes)
        self.log_fn = log_fn
        self.enabled = (jax.process_index() == 0) if enabled is None else bool(enabled)
        self.clock = clock
        self._last: tuple[int, float] | None = None  # (step, time) of the reference point

    def _select(self, scalars: Mapping[str, Any] | None) -> dict:
        """The scalars to print, as Python floats."""
        if not scalars:
            return {}
        prefixes = self.include_prefixes
        return {
            k: _to_float(k, v)
            for k, v in scalars.items()
            if prefixes is None or str(k).startswith(prefixes)
        }

    def line(
        self, step: int, scalars: Mapping[str, Any] | None = None, now: float | None = None
    ) -> str:
        """Returns the progress line for ``step`` and restarts the clock there.

        Rates are computed since the previous :meth:`line` call (``-`` on the
        first). ``now`` overrides the clock (seconds). Does not log.
        """
        step = int(step)
        if scalars:
            jax.block_until_ready(dict(scalars))  # Time the finished step.
        selected = self._select(scalars)
        now = self.clock() if now is None else float(now)
        steps_per_sec = None
        if self._last is not None:
            last_step, last_time = self._last
            elapsed = now - last_time
            if step > last_step and elapsed > 0:
                steps_per_sec = (step - last_step) / elapsed
        self._last = (step, now)
        images_per_sec = None
        if self.batch_size is not None and steps_per_sec is not None:
            images_per_sec = steps_per_sec * self.batch_size
        eta = None if steps_per_sec is None else (self.total_steps - step) / steps_per_sec
        text = format_progress(
            step=step,
            total_steps=self.total_steps,
            steps_per_sec=steps_per_sec,
            images_per_sec=images_per_sec,
            eta_seconds=eta,
            scalars=selected,
        )
        if self.batch_size is not None and images_per_sec is None:
            text = text.replace(" it/s | ", " it/s | - img/s | ", 1)
        return text

    def log(self, step: int, scalars: Mapping[str, Any] | None = None) -> str | None:
        """Logs (and returns) the line for ``step`` unconditionally; ``None`` when disabled."""
        if not self.enabled:
            return None
        text = self.line(step, scalars)
        self.log_fn(text)
        return text

    def __call__(self, step: int, scalars: Mapping[str, Any] | None = None) -> str | None:
        """Per-step entry point: logs when ``step % every == 0`` or ``step == total_steps``.

        The very first call starts the clock even when it is not a logging
        step (so the first printed rate already excludes compilation).
        Returns the logged line, or ``None``.
        """
        if not self.enabled:
            return None
        step = int(step)
        if step % self.every == 0 or step == self.total_steps:
            return self.log(step, scalars)
        if self._last is None:
            if scalars:
                jax.block_until_ready(dict(scalars))  # Wait for the step,
            self._last = (step, self.clock())  # then start the clock.
        return None


# Libraries whose INFO lines (Orbax: a dozen per checkpoint; JAX: backend probing) drown the
# trainer's progress lines; their warnings and errors always show.
CHATTY_LIBRARIES = ("orbax", "jax", "jaxlib", "etils", "tensorflow_datasets", "tensorflow")


class _LibraryInfoFilter:
    """Drops INFO (and finer) records logged from inside :data:`CHATTY_LIBRARIES`."""

    def __init__(self):
        self._dirs = tuple(f"{os.sep}{name}{os.sep}" for name in CHATTY_LIBRARIES)

    def filter(self, record) -> bool:
        if record.levelno > 20:  # WARNING and above
            return True
        return not any(d in record.pathname for d in self._dirs)


def quiet_library_logs(verbose: bool = False) -> None:
    """Console logging shows the trainer's lines (progress, evaluations, resumes) and every
    library warning; ``verbose`` also shows the libraries' INFO lines. Idempotent."""
    handler = logging.get_absl_handler()
    for f in [f for f in handler.filters if isinstance(f, _LibraryInfoFilter)]:
        handler.removeFilter(f)
    if not verbose:
        handler.addFilter(_LibraryInfoFilter())
