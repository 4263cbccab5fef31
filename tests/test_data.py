"""Tests for ganda_jax.data.sources and ganda_jax.data.pipeline.

Covers the determinism contract of the training Loader (same seed/step ->
same batch, resumption, process slicing, independent stream shuffles, exact
epochs), the evaluation iterator, prefetch error propagation, and the
one-line error messages for bad inputs (folders, image files, .npz, tfds).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import threading
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from ganda_jax.data import pipeline
from ganda_jax.data.pipeline import (
    Loader,
    center_resize,
    epoch_iterator,
    example_rng,
    image_transform,
    random_crop_flip,
    resize_crop_flip,
)
from ganda_jax.data.sources import (
    ArraySource,
    FolderSource,
    NpzSource,
    TfdsSource,
    cyclegan_folder,
    load_image_file,
    tfds_cyclegan,
)

# ----------------------------------------------------------------- helpers


def array_source(n, size=8, seed=0):
    """n random RGB images; label i for example i (so labels identify examples)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return ArraySource({"image": images, "label": np.arange(n)})


def make_loader(streams, **kwargs):
    kwargs.setdefault("global_batch_size", 4)
    kwargs.setdefault("seed", 0)
    kwargs.setdefault("process_index", 0)
    kwargs.setdefault("process_count", 1)
    kwargs.setdefault("num_threads", 2)
    return Loader(streams, **kwargs)


def assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for stream in a:
        assert a[stream].keys() == b[stream].keys()
        for field in a[stream]:
            np.testing.assert_array_equal(a[stream][field], b[stream][field])


def batches_equal(a, b):
    try:
        assert_batches_equal(a, b)
    except AssertionError:
        return False
    return True


def write_png(path, array, mode=None):
    Image.fromarray(array, mode=mode).save(path)
    return path


CROP = image_transform(resize_crop_flip, load_size=12, crop_size=8)


# ----------------------------------------------------------------- determinism


def test_same_seed_and_step_give_identical_batches():
    a, b = array_source(10), array_source(7, seed=1)
    first = make_loader({"A": a, "B": b}, transforms=CROP, num_threads=4)
    second = make_loader({"A": a, "B": b}, transforms=CROP, num_threads=0)
    assert_batches_equal(first.batch(3), second.batch(3))
    assert_batches_equal(first.batch(3), first.batch(3))
    assert first.batch(3)["A"]["image"].shape == (4, 8, 8, 3)
    assert first.batch(3)["A"]["label"].dtype == np.int32
    # A different step or seed gives a different batch.
    assert not batches_equal(first.batch(3), first.batch(4))
    other_seed = make_loader({"A": a, "B": b}, transforms=CROP, seed=1)
    assert not batches_equal(first.batch(3), other_seed.batch(3))


def test_iterate_resumes_exactly_at_start_step():
    streams = {"A": array_source(10), "B": array_source(6, seed=1)}
    loader = make_loader(streams, transforms=CROP, prefetch=2)
    fresh = make_loader(streams, transforms=CROP)
    resumed = list(loader.iterate(5, num_steps=4))
    assert len(resumed) == 4
    for offset, batch in enumerate(resumed):
        assert_batches_equal(batch, fresh.batch(5 + offset))
    # Infinite iteration, stopped by the consumer.
    gen = loader.iterate(2)
    for step, batch in zip(range(2, 5), gen):
        assert_batches_equal(batch, fresh.batch(step))
    gen.close()


def test_transform_rng_depends_only_on_seed_stream_step_and_row():
    seen = []
    lock = threading.Lock()

    def record(example, rng):
        with lock:
            seen.append((int(example["label"]), rng.random()))
        return example

    loader = make_loader({"src": array_source(10)}, transforms={"src": record}, seed=7)
    batch = loader.batch(2)
    draws = dict(seen)
    for k, label in enumerate(batch["src"]["label"]):
        assert draws[int(label)] == example_rng(7, "src", 2, k).random()


def test_two_process_slices_concatenate_to_the_global_batch():
    streams = {"A": array_source(9, size=10), "B": array_source(5, size=14, seed=2)}
    transforms = {"A": CROP, "B": image_transform(random_crop_flip, crop_size=8)}
    single = make_loader(streams, transforms=transforms, global_batch_size=8)
    for count in (2, 4):
        parts = [
            make_loader(
                streams,
                transforms=transforms,
                global_batch_size=8,
                process_index=p,
                process_count=count,
            )
            for p in range(count)
        ]
        for step in (0, 3):
            whole = single.batch(step)
            slices = [part.batch(step) for part in parts]
            assert slices[0]["A"]["image"].shape[0] == 8 // count
            for stream in whole:
                for field in whole[stream]:
                    joined = np.concatenate([s[stream][field] for s in slices])
                    np.testing.assert_array_equal(joined, whole[stream][field])


def test_stream_shuffles_are_independent():
    src = array_source(50)
    both = make_loader({"A": src, "B": src}, global_batch_size=10)
    batch = both.batch(0)
    # The same source under two names is shuffled differently (unpaired).
    assert not np.array_equal(batch["A"]["label"], batch["B"]["label"])
    # A stream's order does not depend on which other streams are present.
    alone = make_loader({"A": src}, global_batch_size=10)
    with_other = make_loader({"A": src, "Z": array_source(3)}, global_batch_size=10)
    for step in range(3):
        np.testing.assert_array_equal(
            alone.batch(step)["A"]["label"], both.batch(step)["A"]["label"]
        )
        np.testing.assert_array_equal(
            alone.batch(step)["A"]["label"], with_other.batch(step)["A"]["label"]
        )
    # Stream hashing is stable (crc32), not Python's salted hash().
    assert pipeline.stream_hash("A") == 3554254475


def test_every_example_seen_exactly_once_per_epoch():
    sizes = {"A": 10, "B": 7}
    loader = make_loader({k: array_source(n) for k, n in sizes.items()}, global_batch_size=4)
    labels = {k: [] for k in sizes}
    for step in range(18):  # 72 slots: >= 7 epochs of B, 7 epochs of A.
        for k in sizes:
            labels[k].extend(loader.batch(step)[k]["label"].tolist())
    for k, n in sizes.items():
        epochs = [labels[k][e * n : (e + 1) * n] for e in range(len(labels[k]) // n)]
        assert len(epochs) >= 7
        for order in epochs:
            assert sorted(order) == list(range(n))
        assert len({tuple(order) for order in epochs}) > 1  # Reshuffled per epoch.


def test_state_is_json_and_checked():
    loader = make_loader({"A": array_source(10)})
    state = json.loads(json.dumps(loader.state(123)))
    assert loader.check_state(state) == 123
    other = make_loader({"A": array_source(11)}, seed=5)
    with pytest.raises(ValueError, match=r"seed: checkpoint 0 vs now 5.*stream_sizes"):
        other.check_state(state)
    # The process count may change between runs.
    two = make_loader({"A": array_source(10)}, process_index=1, process_count=2)
    assert two.check_state(state) == 123


def test_eval_iterator_covers_every_example_once_with_mask():
    src = array_source(10)
    transform = image_transform(center_resize, size=6)
    it = epoch_iterator(src, batch_size=4, transform=transform, process_index=0, process_count=1)
    batches = list(it)
    assert len(batches) == len(it) == 3
    mask = np.concatenate([b["mask"] for b in batches])
    index = np.concatenate([b["index"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    assert mask.dtype == bool and mask.sum() == 10 and not mask[-2:].any()
    np.testing.assert_array_equal(index[mask], np.arange(10))
    np.testing.assert_array_equal(labels[mask], np.arange(10))
    assert all(b["image"].shape == (4, 6, 6, 3) for b in batches)
    np.testing.assert_array_equal(batches[1]["image"][0], center_resize(src[4]["image"], size=6))
    # Two processes: same number of batches each, union covers each example once.
    seen = []
    for p in range(2):
        it = epoch_iterator(src, batch_size=4, process_index=p, process_count=2, prefetch=0)
        assert len(list(it)) == 3
        for b in it:
            assert b["mask"].shape == (2,)
            seen.extend(b["index"][b["mask"]].tolist())
    assert sorted(seen) == list(range(10))


def test_to_global_makes_jax_arrays():
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    batch = make_loader({"A": array_source(10)}, global_batch_size=len(jax.devices()) * 2).batch(0)
    out = pipeline.to_global(batch, sharding)
    assert isinstance(out["A"]["image"], jax.Array)
    np.testing.assert_array_equal(np.asarray(out["A"]["image"]), batch["A"]["image"])


# ----------------------------------------------------------------- transforms


def test_image_transforms_shapes_and_determinism():
    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    out = resize_crop_flip(image, np.random.default_rng(1), load_size=16, crop_size=12)
    again = resize_crop_flip(image, np.random.default_rng(1), load_size=16, crop_size=12)
    assert out.shape == (12, 12, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, again)
    crop = random_crop_flip(image, np.random.default_rng(2), crop_size=10, flip=False)
    assert crop.shape == (10, 10, 3)
    assert any(
        np.array_equal(crop, image[t : t + 10, l : l + 10]) for t in range(11) for l in range(21)
    )
    assert center_resize(image, size=10).shape == (10, 10, 3)
    with pytest.raises(ValueError, match="crop_size=20 is larger than load_size=16"):
        resize_crop_flip(image, np.random.default_rng(0), load_size=16, crop_size=20)


def test_image_smaller_than_crop_names_size_and_file(tmp_path):
    with pytest.raises(ValueError, match=r"image of size 8x8 \(HxW\) is smaller than crop_size=16"):
        random_crop_flip(np.zeros((8, 8, 3), np.uint8), np.random.default_rng(0), crop_size=16)
    folder = tmp_path / "imgs"
    folder.mkdir()
    write_png(folder / "small.png", np.zeros((8, 8, 3), np.uint8))
    loader = make_loader(
        {"A": FolderSource(folder)},
        global_batch_size=2,
        transforms={"A": image_transform(random_crop_flip, crop_size=16)},
    )
    with pytest.raises(ValueError, match=r"stream 'A', file .*small\.png.*8x8.*crop_size=16"):
        loader.batch(0)


# ----------------------------------------------------------------- folders


def test_folder_source_lists_sorted_images_and_converts_modes(tmp_path):
    rgb = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    gray = np.arange(20, dtype=np.uint8).reshape(4, 5) * 10
    rgba = np.concatenate([rgb, np.full((4, 5, 1), 7, np.uint8)], axis=-1)
    write_png(tmp_path / "b_gray.png", gray)
    write_png(tmp_path / "c_rgba.PNG", rgba)
    write_png(tmp_path / "a_rgb.png", rgb)
    Image.fromarray(rgb).convert("P").save(tmp_path / "d_palette.png")
    (tmp_path / "notes.txt").write_text("not an image")
    write_png(tmp_path / "._a_rgb.png", rgb)  # macOS metadata file: skipped.
    (tmp_path / "sub").mkdir()
    write_png(tmp_path / "sub" / "e.jpg", rgb)

    src = FolderSource(tmp_path)
    assert [p.name for p in src.files] == [
        "a_rgb.png",
        "b_gray.png",
        "c_rgba.PNG",
        "d_palette.png",
    ]
    np.testing.assert_array_equal(src[0]["image"], rgb)
    np.testing.assert_array_equal(src[1]["image"], np.repeat(gray[..., None], 3, axis=-1))
    np.testing.assert_array_equal(src[2]["image"], rgb)  # Alpha dropped.
    assert src[3]["image"].shape == (4, 5, 3) and src[3]["image"].dtype == np.uint8
    src.validate()
    assert len(FolderSource(tmp_path, recursive=True)) == 5

    strict = FolderSource(tmp_path, convert_mode="error")
    strict[0]  # RGB is fine.
    with pytest.raises(ValueError, match=r"b_gray\.png has mode 'L', expected RGB"):
        strict[1]
    with pytest.raises(ValueError, match=r"c_rgba\.PNG has mode 'RGBA', expected RGB"):
        strict[2]
    with pytest.raises(ValueError, match=r"b_gray\.png has mode 'L'"):
        strict.validate()


def test_sixteen_bit_grayscale_is_rescaled(tmp_path):
    wide = np.array([[0, 257, 65535]], dtype=np.uint16)
    Image.fromarray(wide).save(tmp_path / "deep.png")
    np.testing.assert_array_equal(load_image_file(tmp_path / "deep.png")[0, :, 0], [0, 1, 255])


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"image folder not found: .*nowhere"):
        FolderSource(tmp_path / "nowhere")
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(
        ValueError,
        match=r"no images in folder .* \(looked for \.bmp, \.jpeg, \.jpg, \.png",
    ):
        FolderSource(tmp_path)


def test_corrupt_and_truncated_jpeg(tmp_path):
    write_png(tmp_path / "good.png", np.zeros((4, 4, 3), np.uint8))
    (tmp_path / "x.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    src = FolderSource(tmp_path)  # Listing does not decode.
    assert src[0]["image"].shape == (4, 4, 3)
    with pytest.raises(ValueError, match=r"cannot decode image file .*x\.jpg"):
        src[1]
    with pytest.raises(ValueError, match=r"cannot decode image file .*x\.jpg"):
        src.validate()
    loader = make_loader({"B": src}, global_batch_size=2)
    with pytest.raises(ValueError, match=r"stream 'B', file .*x\.jpg.*cannot decode"):
        loader.batch(0)
    # A JPEG cut in half has a valid header but fails on decoding.
    full = tmp_path / "full.jpeg"
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(full)
    data = full.read_bytes()
    (tmp_path / "cut.jpeg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cannot decode image file .*cut\.jpeg"):
        load_image_file(tmp_path / "cut.jpeg")
    with pytest.raises(FileNotFoundError, match="image file not found"):
        load_image_file(tmp_path / "missing.png")


def test_cyclegan_folder_layout(tmp_path):
    for sub, n in (("trainA", 3), ("trainB", 2), ("testA", 1)):
        (tmp_path / sub).mkdir()
        for i in range(n):
            write_png(tmp_path / sub / f"{i}.png", np.full((4, 4, 3), i, np.uint8))
    streams = cyclegan_folder(tmp_path, "train")
    assert sorted(streams) == ["A", "B"] and (len(streams["A"]), len(streams["B"])) == (
        3,
        2,
    )
    with pytest.raises(
        FileNotFoundError,
        match=r"no testB/ sub-folder.*present: \['testA', 'trainA', 'trainB'\]",
    ):
        cyclegan_folder(tmp_path, "test")
    with pytest.raises(FileNotFoundError, match="CycleGAN dataset folder not found"):
        cyclegan_folder(tmp_path / "nope", "train")


def test_config_chooses_whether_mixed_image_modes_are_converted(tmp_path):
    from ganda_jax.data import tasks

    for sub in ("trainA", "trainB"):
        (tmp_path / sub).mkdir()
        write_png(tmp_path / sub / "0_rgb.png", np.full((4, 4, 3), 9, np.uint8))
    write_png(tmp_path / "trainA" / "1_gray.png", np.full((4, 4), 5, np.uint8))
    folder = dict(kind="folder")
    data = tasks.data_block("translate", path=str(tmp_path), A=folder, B=folder)
    assert data.convert_mode == "rgb"  # the default converts
    np.testing.assert_array_equal(
        tasks.Translation(data, 4).train_streams()["A"][1]["image"], np.full((4, 4, 3), 5)
    )
    data.convert_mode = "error"
    strict = tasks.Translation(data, 4).train_streams()["A"]
    with pytest.raises(ValueError, match=r"1_gray\.png has mode 'L', expected RGB"):
        strict[1]


# ----------------------------------------------------------------- arrays / npz


def test_array_source_validation():
    images = np.zeros((4, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match=r"different lengths \{'image': 4, 'label': 3\}"):
        ArraySource({"image": images, "label": np.arange(3)})
    with pytest.raises(ValueError, match=r"array 'image' has shape \(4, 8, 8, 1\) and dtype uint8"):
        ArraySource({"image": np.zeros((4, 8, 8, 1), np.uint8)})
    with pytest.raises(
        ValueError, match=r"array 'image' has shape \(4, 8, 8, 3\) and dtype float32"
    ):
        ArraySource({"image": images.astype(np.float32)})
    with pytest.raises(ValueError, match="empty"):
        ArraySource({"image": images[:0]})
    src = ArraySource({"image": images, "label": np.arange(4, dtype=np.int64)})
    assert src[-1]["label"].dtype == np.int32 and src[-1]["label"].shape == ()
    with pytest.raises(IndexError, match="out of range"):
        src[4]


def test_npz_source(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (5, 6, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "ok.npz", images=rgb, labels=np.arange(5))
    src = NpzSource(tmp_path / "ok.npz")
    assert len(src) == 5 and src[2]["label"] == 2
    np.testing.assert_array_equal(src[2]["image"], rgb[2])

    np.savez(tmp_path / "gray.npz", images=rgb[..., 0])
    assert NpzSource(tmp_path / "gray.npz")[0]["image"].shape == (6, 6, 3)
    np.savez(tmp_path / "rgba.npz", images=np.concatenate([rgb, rgb[..., :1]], -1))
    np.testing.assert_array_equal(NpzSource(tmp_path / "rgba.npz")[1]["image"], rgb[1])

    np.savez(tmp_path / "x.npz", x=rgb)
    with pytest.raises(ValueError, match=r"no array named 'images'; arrays present: \['x'\]"):
        NpzSource(tmp_path / "x.npz")
    np.savez(tmp_path / "rank.npz", images=np.zeros((5, 6), np.uint8))
    with pytest.raises(ValueError, match=r"'images' has shape \(5, 6\); expected \[N, H, W, 3\]"):
        NpzSource(tmp_path / "rank.npz")
    np.savez(tmp_path / "chan.npz", images=np.zeros((5, 6, 6, 2), np.uint8))
    with pytest.raises(ValueError, match=r"shape \(5, 6, 6, 2\)"):
        NpzSource(tmp_path / "chan.npz")
    np.savez(tmp_path / "float.npz", images=rgb.astype(np.float32))
    with pytest.raises(ValueError, match="dtype float32.*expected uint8"):
        NpzSource(tmp_path / "float.npz")
    np.savez(tmp_path / "lab.npz", images=rgb, labels=np.arange(4))
    with pytest.raises(ValueError, match="has 4 labels but 'images' has 5 images"):
        NpzSource(tmp_path / "lab.npz")
    with pytest.raises(FileNotFoundError, match="npz file not found"):
        NpzSource(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"cannot read .*junk\.npz as \.npz"):
        NpzSource(tmp_path / "junk.npz")


# ----------------------------------------------------------------- loader arguments


def test_loader_argument_errors():
    src = array_source(10)
    with pytest.raises(
        ValueError, match="global_batch_size=10 is not divisible by process_count=3"
    ):
        make_loader({"A": src}, global_batch_size=10, process_index=0, process_count=3)
    with pytest.raises(ValueError, match=r"transforms for unknown streams \['C'\]"):
        make_loader({"A": src}, transforms={"C": CROP})
    with pytest.raises(ValueError, match="process_index must be in"):
        make_loader({"A": src}, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="seed must be"):
        make_loader({"A": src}, seed=-1)
    with pytest.raises(ValueError, match="epoch_iterator"):
        make_loader({"A": src}, drop_remainder=False)
    # Defaults come from jax (a single process here).
    assert Loader({"A": src}, global_batch_size=2, seed=0).process_count == 1


def test_examples_of_different_shapes_are_reported(tmp_path):
    write_png(tmp_path / "a.png", np.zeros((4, 4, 3), np.uint8))
    write_png(tmp_path / "b.png", np.zeros((6, 4, 3), np.uint8))
    loader = make_loader({"A": FolderSource(tmp_path)}, global_batch_size=2)
    with pytest.raises(ValueError, match=r"stream 'A' step 0: field 'image' has different shapes"):
        loader.batch(0)


# ----------------------------------------------------------------- prefetch errors


class FailingSource:
    """Wraps a source; reading example ``bad`` raises."""

    def __init__(self, inner, bad):
        self.inner, self.bad = inner, bad

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        if i == self.bad:
            raise OSError(f"disk error reading example {i}")
        return self.inner[i]


def test_exceptions_in_prefetch_propagate_to_the_consumer():
    loader = make_loader(
        {"A": array_source(12), "B": FailingSource(array_source(12), bad=5)}, prefetch=2
    )
    bad_step = next(s for s in range(3) if 5 in loader.indices(s)["B"])

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(lambda: list(loader.iterate(0)))
        with pytest.raises(
            OSError,
            match=r"stream 'B', .*index 5 \(step \d+\): disk error reading example 5",
        ):
            future.result(timeout=20)  # Must raise, not hang.
    # The batches before the failing step are still delivered, in order.
    good = list(loader.iterate(0, num_steps=bad_step))
    assert len(good) == bad_step


def test_prefetch_thread_stops_when_the_consumer_stops():
    loader = make_loader({"A": array_source(10)}, prefetch=2)
    gen = loader.iterate(0)
    next(gen)
    assert any(t.name == "ganda-prefetch" for t in threading.enumerate())
    gen.close()
    deadline = time.monotonic() + 5
    while any(t.name == "ganda-prefetch" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "prefetch thread still running"
        time.sleep(0.01)


# ----------------------------------------------------------------- tfds


@pytest.fixture
def no_network(monkeypatch):
    """Fails the test if anything opens a network connection."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield attempts
    assert not attempts, f"network access attempted: {attempts}"


def test_tfds_not_prepared_raises_fast_without_download(tmp_path, no_network):
    start = time.monotonic()
    with pytest.raises(
        FileNotFoundError,
        match=r"TFDS dataset 'mnist' is not prepared in data_dir=.*tfds build",
    ):
        TfdsSource("mnist", split="train", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"'cycle_gan/horse2zebra' is not prepared"):
        tfds_cyclegan("cycle_gan/horse2zebra", "train", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a known tfds dataset nor prepared"):
        TfdsSource("no_such_dataset_ganda", split="train", data_dir=tmp_path)
    assert time.monotonic() - start < 3.0
    downloaded = [f for _, _, files in os.walk(tmp_path) for f in files]
    assert downloaded == []


class GandaTestTinyPairs(tfds.core.GeneratorBasedBuilder):
    """A tiny two-domain dataset built locally (no download, no TensorFlow)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(6, 6, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=3),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {
            "trainA": self._generate_examples(5, 0),
            "trainB": self._generate_examples(3, 100),
        }

    def _generate_examples(self, n, offset):
        for i in range(n):
            yield i, {"image": np.full((6, 6, 1), offset + i, np.uint8), "label": i % 3}


def test_tfds_prepared_dataset_is_read_with_random_access(tmp_path, no_network):
    GandaTestTinyPairs(data_dir=tmp_path).download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(try_download_gcs=False),
    )
    streams = tfds_cyclegan("ganda_test_tiny_pairs", "train", data_dir=tmp_path, label_key="label")
    assert (len(streams["A"]), len(streams["B"])) == (5, 3)
    example = streams["B"][2]
    assert example["image"].shape == (6, 6, 3) and example["image"].dtype == np.uint8
    assert example["label"].dtype == np.int32 and example["label"].shape == ()
    # tfds shuffles records when preparing; the values identify the examples.
    values = sorted(int(streams["B"][i]["image"][0, 0, 0]) for i in range(3))
    assert values == [100, 101, 102]
    for i in range(5):
        ex = streams["A"][i]
        assert int(ex["label"]) == int(ex["image"][0, 0, 0]) % 3
    batch = make_loader(streams, global_batch_size=4).batch(1)
    assert batch["A"]["image"].shape == (4, 6, 6, 3)
    with pytest.raises(ValueError, match=r"has no split 'valid'; splits: \['trainA', 'trainB'\]"):
        TfdsSource("ganda_test_tiny_pairs", split="valid", data_dir=tmp_path)
    with pytest.raises(ValueError, match=r"has no feature 'segmentation'"):
        TfdsSource(
            "ganda_test_tiny_pairs",
            split="trainA",
            data_dir=tmp_path,
            label_key="segmentation",
        )
