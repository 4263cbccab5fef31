"""Tests for ganda_jax.train.writers: JSONL/PNG/TensorBoard outputs, grids, progress lines."""

import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ganda_jax.train import writers


def _lines(path):
    with open(path) as f:
        return [line for line in f.read().splitlines() if line]


# ---------------------------------------------------------------- MetricWriter


def test_write_scalars_jsonl(tmp_path):
    workdir = str(tmp_path / "run")
    with writers.MetricWriter(workdir, tensorboard=False, enabled=True) as w:
        w.write_scalars(10, {"loss_G": 1.5, "loss/D": np.float32(0.25), "acc": jnp.array([0.5])})
        w.write_scalars(20, {"loss_G": jnp.asarray(2.0, jnp.bfloat16), "n": 3})
        # Readable before close: every call is flushed.
        assert len(_lines(os.path.join(workdir, "metrics.jsonl"))) == 2
    records = [json.loads(line) for line in _lines(os.path.join(workdir, "metrics.jsonl"))]
    assert records == [
        {"step": 10, "loss_G": 1.5, "loss/D": 0.25, "acc": 0.5},
        {"step": 20, "loss_G": 2.0, "n": 3.0},
    ]
    assert list(records[0]) == ["step", "loss_G", "loss/D", "acc"]  # step first
    assert writers.read_metrics(os.path.join(workdir, "metrics.jsonl")) == records
    assert writers.read_metrics(workdir) == records  # directory accepted


def test_non_finite_written_as_null(tmp_path):
    with writers.MetricWriter(str(tmp_path), tensorboard=False, enabled=True) as w:
        w.write_scalars(1, {"a": float("nan"), "b": np.inf, "c": -jnp.inf, "d": 1.0})
    (line,) = _lines(tmp_path / "metrics.jsonl")
    assert "NaN" not in line and "Infinity" not in line
    assert json.loads(line) == {"step": 1, "a": None, "b": None, "c": None, "d": 1.0}


def test_write_scalars_rejects_bad_values(tmp_path):
    with writers.MetricWriter(str(tmp_path), tensorboard=False, enabled=True) as w:
        with pytest.raises(ValueError, match="exactly one element"):
            w.write_scalars(1, {"vec": np.ones(3)})
        with pytest.raises(ValueError, match="reserved"):
            w.write_scalars(1, {"step": 3})
    with pytest.raises(RuntimeError, match="closed"):
        w.write_scalars(2, {"a": 1.0})
    w.close()  # idempotent


def test_truncated_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
    with pytest.warns(UserWarning, match="line 3"):
        records = writers.read_metrics(str(path))
    assert [r["step"] for r in records] == [1, 2]
    # A writer resumed after the crash starts on a fresh line.
    with writers.MetricWriter(str(tmp_path), tensorboard=False, enabled=True) as w:
        w.write_scalars(3, {"loss": 0.3})
    with pytest.warns(UserWarning):
        records = writers.read_metrics(str(path))
    assert [r["step"] for r in records] == [1, 2, 3]


def test_write_images_png(tmp_path):
    grid_u8 = np.zeros((10, 12, 3), np.uint8)
    grid_u8[0, 0] = [255, 0, 0]
    grid_float = -np.ones((6, 4, 3), np.float32)  # [-1, 1] -> black
    gray = np.full((5, 7), 200, np.uint8)
    with writers.MetricWriter(str(tmp_path), tensorboard=False, enabled=True) as w:
        w.write_images(42, {"train/AtoB": grid_u8, "fake": grid_float, "mask": gray})
        with pytest.raises(ValueError, match="image_grid"):
            w.write_images(42, {"batch": np.zeros((2, 4, 4, 3), np.uint8)})
    samples = tmp_path / "samples"
    assert sorted(os.listdir(samples)) == [
        "fake_0000042.png",
        "mask_0000042.png",
        "train_AtoB_0000042.png",
    ]
    with Image.open(samples / "train_AtoB_0000042.png") as im:
        assert im.size == (12, 10)  # PIL: (width, height)
        assert im.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(im), grid_u8)
    with Image.open(samples / "fake_0000042.png") as im:
        assert im.size == (4, 6)
        assert np.asarray(im).max() == 0
    with Image.open(samples / "mask_0000042.png") as im:
        assert im.size == (7, 5) and im.mode == "L"


def test_tensorboard_event_file(tmp_path):
    with writers.MetricWriter(str(tmp_path), enabled=True) as w:
        w.write_scalars(1, {"loss/G": 1.0, "nan": float("nan")})
        w.write_images(1, {"grid": np.zeros((8, 8, 3), np.uint8)})
        w.flush()
    tb_dir = tmp_path / "tensorboard"
    events = [f for f in os.listdir(tb_dir) if f.startswith("events.out.tfevents")]
    assert len(events) == 1
    assert os.path.getsize(tb_dir / events[0]) > 0


def test_disabled_writer_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    w = writers.MetricWriter(str(workdir), enabled=False)
    w.write_scalars(1, {"loss": 1.0})
    w.write_images(1, {"grid": np.zeros((4, 4, 3), np.uint8)})
    w.flush()
    w.close()
    assert not workdir.exists()


def test_default_enabled_is_process_zero(tmp_path):
    # Single-process tests run as process 0.
    w = writers.MetricWriter(str(tmp_path), tensorboard=False)
    assert w.enabled
    w.close()


# ---------------------------------------------------------------- image_grid


def test_image_grid_shape_and_layout():
    rows = [np.full((4, 8, 8, 3), v, np.uint8) for v in (10, 20, 30)]
    grid = writers.image_grid(rows, pad=2, pad_value=0)
    # 3 rows of 8 + 4 pads; 4 columns of 8 + 5 pads.
    assert grid.shape == (3 * 8 + 4 * 2, 4 * 8 + 5 * 2, 3) == (32, 42, 3)
    assert grid.dtype == np.uint8
    assert grid[0, 0, 0] == 0  # border padding
    assert grid[2, 2, 0] == 10  # first image of row 0
    assert grid[2 + 10, 2 + 3 * 10, 0] == 20  # row 1, column 3
    assert grid[2 + 2 * 10 + 7, 2 + 3 * 10 + 7, 0] == 30  # last pixel of the last image
    assert grid[2, 2 + 8, 0] == 0  # gap between columns


def test_image_grid_float_gray_and_ragged_rows():
    real = np.ones((3, 4, 4, 3), np.float32)  # [-1, 1] float -> 255
    mask = np.zeros((3, 4, 4, 1), np.uint8)  # 1 channel -> repeated to 3
    short = np.full((2, 4, 4), 100, np.uint8)  # no channel axis, only 2 images
    grid = writers.image_grid([real, mask, short], pad=1)
    assert grid.shape == (3 * 4 + 4, 3 * 4 + 4, 3)
    assert grid[1, 1].tolist() == [255, 255, 255]
    assert grid[6, 1].tolist() == [0, 0, 0]
    assert grid[11, 6].tolist() == [100, 100, 100]
    assert grid[11, 11].tolist() == [255, 255, 255]  # blank cell, default pad_value
    assert writers.image_grid([real], pad=0).shape == (4, 12, 3)
    with pytest.raises(ValueError):
        writers.image_grid([real, np.zeros((3, 5, 5, 3), np.uint8)])


# ---------------------------------------------------------------- progress


@pytest.mark.parametrize(
    "seconds, expected",
    [
        (0, "0s"),
        (42.4, "42s"),
        (59.6, "1m00s"),
        (131, "2m11s"),
        (3600, "1h00m00s"),
        (3723, "1h02m03s"),
        (2 * 86400 + 3 * 3600 + 4 * 60, "2d03h04m"),
        (None, "?"),
        (-1, "?"),
        (math.inf, "?"),
        (math.nan, "?"),
    ],
)
def test_format_eta(seconds, expected):
    assert writers.format_eta(seconds) == expected


def test_format_progress():
    line = writers.format_progress(
        step=120,
        total_steps=2000,
        steps_per_sec=14.3,
        images_per_sec=57.1,
        eta_seconds=131,
        scalars={"loss_G": 1.234, "loss_D": np.float32(0.456)},
    )
    assert line == "step 120/2000 | 14.3 it/s | 57.1 img/s | ETA 2m11s | loss_G 1.234 loss_D 0.456"
    line = writers.format_progress(step=1, total_steps=10, steps_per_sec=None)
    assert line == "step 1/10 | - it/s | ETA ?"


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_progress_logger_explicit_log():
    clock, lines = FakeClock(), []
    p = writers.ProgressLogger(
        total_steps=2000, batch_size=4, log_fn=lines.append, enabled=True, clock=clock
    )
    clock.now = 100.0  # e.g. after compilation
    first = p.log(20, {"loss_G": jnp.asarray(2.0), "perf/steps_per_sec": 3.0, "lr": 1e-4})
    assert first == "step 20/2000 | - it/s | - img/s | ETA ? | loss_G 2"
    clock.now = 110.0  # 100 steps in 10 s -> 10 it/s, 40 img/s, (2000-120)/10 = 188 s
    line = p.log(120, {"loss_G": 1.234, "loss/D": 0.456})
    assert line == "step 120/2000 | 10.0 it/s | 40.0 img/s | ETA 3m08s | loss_G 1.234 loss/D 0.456"
    assert lines == [first, line]
    # include_prefixes=None prints everything; no batch size -> no img/s field.
    p = writers.ProgressLogger(
        10, include_prefixes=None, log_fn=lines.append, enabled=True, clock=clock
    )
    assert p.log(1, {"lr": 0.5}) == "step 1/10 | - it/s | ETA ? | lr 0.5"


def test_progress_logger_gated_call():
    clock, lines = FakeClock(), []
    p = writers.ProgressLogger(
        total_steps=250, batch_size=2, every=100, log_fn=lines.append, enabled=True, clock=clock
    )
    clock.now = 50.0  # step 1 includes compilation: only starts the clock
    assert p(1, {"loss": 1.0}) is None
    clock.now = 60.0
    assert p(2, {"loss": 1.0}) is None
    clock.now = 69.8  # 99 steps since step 1 in 19.8 s -> 5 it/s
    assert p(100, {"loss": 0.5}) == "step 100/250 | 5.0 it/s | 10.0 img/s | ETA 30s | loss 0.5"
    clock.now = 89.8
    assert p(200) == "step 200/250 | 5.0 it/s | 10.0 img/s | ETA 10s"
    clock.now = 99.8
    assert p(250).startswith("step 250/250 | 5.0 it/s")  # last step always logged
    assert len(lines) == 3


def test_progress_logger_disabled():
    lines = []
    p = writers.ProgressLogger(total_steps=10, every=1, log_fn=lines.append, enabled=False)
    assert p(1, {"loss": 1.0}) is None and p.log(2) is None
    assert lines == []
