"""Every method on a user's own data: npz files, class folders, GTA5- and Cityscapes-style trees.

The datasets are written to ``tmp_path`` from the embedded generators (so the images are
real digits and scenes), at other sizes than the models' and partly in grayscale, so that
the resizing and conversion paths run too.
"""

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
from conftest import ROOT, load_config
from PIL import Image

from ganda_jax.data import domains, synthetic, tasks
from ganda_jax.train import parallel, trainer

CLASSES = tuple(f"c{k}" for k in range(10))  # class folder names (sorted = ids 0..9)
# The embedded scene classes as Cityscapes label ids: sky, road, car, building, pole.
CITYSCAPES_IDS = np.array([23, 7, 26, 11, 17], np.uint8)


# ---------------------------------------------------------------------------
# Writing datasets
# ---------------------------------------------------------------------------


def _digits(domain, split, n, size=28):
    d = synthetic.digits(domain=domain, split=split, num=n, seed=3)
    images = np.stack([np.asarray(Image.fromarray(x).resize((size, size))) for x in d["image"]])
    return images, d["label"]


def write_npz(path, domain, splits=(("train", 40), ("test", 20))):
    """``path/<split>.npz`` with ``images`` uint8 NHWC (28x28) and ``labels``."""
    os.makedirs(path, exist_ok=True)
    for split, n in splits:
        images, labels = _digits(domain, split, n)
        np.savez(os.path.join(path, f"{split}.npz"), images=images, labels=labels)
    return str(path)


def write_class_folders(root, domain, splits=(("train", 40), ("test", 20)), gray=False):
    """torchvision's ImageFolder layout ``root/<split>/<class>/<i>.png``."""
    for split, n in splits:
        images, labels = _digits(domain, split, n)
        for i, (x, y) in enumerate(zip(images, labels)):
            folder = os.path.join(root, split, CLASSES[y])
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(x[..., 0] if gray else x).save(os.path.join(folder, f"{i:04d}.png"))
    return str(root)


def _scenes(domain, split, n, size=40):
    d = synthetic.segmentation_pair(domain=domain, split=split, num=n, seed=3, size=size)
    labels = CITYSCAPES_IDS[d["mask"]]
    labels[:, :2] = 0  # a void band (Cityscapes id 0 -> ignore_index)
    return d["image"], labels


def write_gta5(root, n=24):
    """GTA5's layout: ``root/images/<stem>.png`` + ``root/labels/<stem>.png`` (label ids)."""
    images, labels = _scenes("source", "train", n)
    for sub in ("images", "labels"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    for i, (x, y) in enumerate(zip(images, labels)):
        Image.fromarray(x).save(os.path.join(root, "images", f"{i:05d}.png"))
        Image.fromarray(y, mode="L").save(os.path.join(root, "labels", f"{i:05d}.png"))
    return str(root)


def write_cityscapes(root, splits=(("train", 16), ("val", 8))):
    """``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` + ``gtFine/.../*_gtFine_labelIds.png``."""
    for split, n in splits:
        images, labels = _scenes("target", "train" if split == "train" else "test", n)
        for i, (x, y) in enumerate(zip(images, labels)):
            city = ("aachen", "bremen")[i % 2]
            stem = f"{city}_{i:06d}_000019"
            for kind, arr, suffix in (
                ("leftImg8bit", x, "leftImg8bit"),
                ("gtFine", y, "gtFine_labelIds"),
            ):
                folder = os.path.join(root, kind, split, city)
                os.makedirs(folder, exist_ok=True)
                Image.fromarray(arr).save(os.path.join(folder, f"{stem}_{suffix}.png"))
    return str(root)


# ---------------------------------------------------------------------------
# Training on them
# ---------------------------------------------------------------------------


def _tiny(name, steps=2, variant="runlocal"):
    cfg = load_config(name, variant)
    if name == "cycada":
        for stage in ("pretrain", "pixel", "feature"):
            cfg.stage_steps[stage] = steps
    else:
        cfg.num_train_steps = steps
    cfg.log_every_steps = cfg.checkpoint_every_steps = steps
    cfg.data.num_train = cfg.data.num_test = 0  # the whole splits written
    return cfg


def _train(cfg, workdir):
    trainer.train(cfg, str(workdir), mesh=parallel.make_mesh(2))
    wd = workdir / "feature" if cfg.method == "cycada" else workdir
    lines = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in lines if any(k.startswith("eval/") for k in x)]
    assert evals, lines
    return evals[-1], json.loads((wd / "data.json").read_text())


def _check_accuracies(ev, info, n_test=20):
    for k in ("eval/target_accuracy", "eval/source_only_accuracy", "eval/source_accuracy"):
        assert 0.0 <= ev[k] <= 1.0, k
        # An accuracy over n test images is a multiple of 1/n: scored on the whole split.
        assert abs(ev[k] * n_test - round(ev[k] * n_test)) < 1e-6, (k, ev[k])
    assert info["target_domain_test"]["examples"] == n_test


def test_pixelda_trains_on_an_npz_source_and_a_class_folder_target(tmp_path):
    cfg = _tiny("pixelda")
    cfg.data.source_domain.update(kind="npz", path=write_npz(tmp_path / "src", "source"))
    cfg.data.target_domain.update(
        kind="folder", path=write_class_folders(tmp_path / "tgt", "target")
    )
    ev, info = _train(cfg, tmp_path / "wd")
    _check_accuracies(ev, info)
    assert info["class_names"] == list(CLASSES)  # the class folder -> id mapping, written
    assert info["source"] == {"kind": "npz", "examples": 40}
    assert info["target"] == {"kind": "folder", "examples": 40}


def test_gta_trains_on_grayscale_class_folders_and_an_npz_target(tmp_path):
    cfg = _tiny("gta")
    src = write_class_folders(tmp_path / "src", "source", gray=True)
    cfg.data.source_domain.update(kind="folder", path=src)
    cfg.data.target_domain.update(kind="npz", path=write_npz(tmp_path / "tgt", "target"))
    ev, info = _train(cfg, tmp_path / "wd")
    _check_accuracies(ev, info)


def test_ccgan_trains_on_class_folders_with_an_unlabelled_split(tmp_path):
    cfg = _tiny("ccgan")
    root = write_class_folders(tmp_path / "d", "target")
    images, _ = _digits("target", "train", 12)
    os.makedirs(tmp_path / "d" / "extra")
    for i, x in enumerate(images):  # a flat folder of unlabelled images
        Image.fromarray(x).save(tmp_path / "d" / "extra" / f"{i}.jpg")
    cfg.data.domain.update(kind="folder", path=root, name="")
    cfg.data.unlabeled_split = "extra"
    cfg.data.labels_per_class = 2
    ev, info = _train(cfg, tmp_path / "wd")
    assert 0.0 <= ev["eval/test_accuracy"] <= 1.0 and np.isfinite(ev["eval/hole_psnr"])
    assert info["labeled"]["examples"] == 20 and info["unlabeled"]["examples"] == 12
    assert info["domain_test"]["examples"] == 20


@pytest.mark.slow  # three stages, three compiles (~50 s)
def test_cycada_trains_all_stages_on_an_npz_source_and_a_folder_target(tmp_path):
    cfg = _tiny("cycada", steps=1)
    cfg.data.source_domain.update(kind="npz", path=write_npz(tmp_path / "src", "source"))
    cfg.data.target_domain.update(
        kind="folder", path=write_class_folders(tmp_path / "tgt", "target")
    )
    ev, info = _train(cfg, tmp_path / "wd")
    _check_accuracies(ev, info)
    assert 0.0 <= ev["eval/pixel_only_accuracy"] <= 1.0


def _seg_config(name, tmp_path):
    cfg = _tiny(name)
    if name == "cycada":
        cfg = _tiny(name, steps=1, variant="seg,runlocal")
    cfg.data.num_classes = 19
    cfg.data.source_domain.update(
        kind="folder", path=write_gta5(tmp_path / "gta5"), label_map="cityscapes19"
    )
    cfg.data.target_domain.update(
        kind="folder", path=write_cityscapes(tmp_path / "cityscapes"), label_map="cityscapes19"
    )
    return cfg


def test_gta_seg_trains_on_gta5_and_cityscapes_folders(tmp_path):
    cfg = _seg_config("gta_seg", tmp_path)
    ev, info = _train(cfg, tmp_path / "wd")
    for k in ("eval/miou", "eval/source_only_miou", "eval/source_miou"):
        assert 0.0 <= ev[k] <= 1.0, k
    assert "eval/iou/road" in ev and "eval/iou/car" in ev  # the 19 Cityscapes names
    # GTA5 has one split: every 10th frame is held out as its test split, out of training.
    assert info["source"]["examples"] == 24 - 2 and info["source_domain_test"]["examples"] == 2
    assert info["target_domain_test"]["examples"] == 8  # Cityscapes' val split


@pytest.mark.slow
def test_cycada_segmentation_trains_on_gta5_and_cityscapes_folders(tmp_path):
    cfg = _seg_config("cycada", tmp_path)
    ev, _ = _train(cfg, tmp_path / "wd")
    for k in ("eval/miou", "eval/source_only_miou", "eval/pixel_only_miou"):
        assert 0.0 <= ev[k] <= 1.0, k


@pytest.mark.slow
@pytest.mark.parametrize("method", ["pixelda", "gta", "cycada"])
def test_classification_methods_train_on_a_folder_source_and_an_npz_target(method, tmp_path):
    cfg = _tiny(method, steps=1 if method == "cycada" else 2)
    cfg.data.source_domain.update(
        kind="folder", path=write_class_folders(tmp_path / "src", "source", gray=True)
    )
    cfg.data.target_domain.update(kind="npz", path=write_npz(tmp_path / "tgt", "target"))
    ev, info = _train(cfg, tmp_path / "wd")
    _check_accuracies(ev, info)


@pytest.mark.slow
def test_ccgan_trains_on_one_npz_file_with_a_held_out_test_split(tmp_path):
    images, labels = _digits("target", "train", 50)
    np.savez(tmp_path / "all.npz", images=images, labels=labels)
    cfg = _tiny("ccgan")
    cfg.data.domain.update(kind="npz", path=str(tmp_path / "all.npz"), name="")
    ev, info = _train(cfg, tmp_path / "wd")
    assert 0.0 <= ev["eval/test_accuracy"] <= 1.0
    assert info["domain_test"]["examples"] == 5 and info["unlabeled"]["examples"] == 45


# ---------------------------------------------------------------------------
# The npz path adds nothing of its own
# ---------------------------------------------------------------------------


def _cli(args, workdir):
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="2", PYTHONPATH=ROOT)
    proc = subprocess.run(
        [sys.executable, "train.py", f"--workdir={workdir}", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_pixelda_on_npz_files_of_the_embedded_arrays_matches_embedded_bitwise(tmp_path):
    """The embedded digits written to npz files and read back: the same batches in the same
    order, so train.py logs bit-identical losses and evaluations."""
    cfg = load_config("pixelda", "runlocal")
    for role in ("source", "target"):
        folder = tmp_path / role
        folder.mkdir()
        for split in ("train", "test"):
            num = cfg.data.num_train if split == "train" else cfg.data.num_test
            d = domains.embedded_arrays("classify", role, split, num, cfg.data.seed, 32)
            np.savez(folder / f"{split}.npz", images=d["image"], labels=d["label"])
    common = ["--config=configs/pixelda.py:runlocal", "--config.log_every_steps=1"]
    embedded = _cli(common, tmp_path / "embedded")
    npz = _cli(
        common
        + [
            f"--config.data.{role}_domain.{k}={v}"
            for role in ("source", "target")
            for k, v in (("kind", "npz"), ("path", tmp_path / role))
        ],
        tmp_path / "npz",
    )
    drop = ("perf/", "time")  # wall-clock numbers
    strip = lambda lines: [  # noqa: E731
        {k: v for k, v in x.items() if not k.startswith(drop)} for x in lines
    ]
    assert len(embedded) == len(npz) >= cfg.num_train_steps
    assert strip(embedded) == strip(npz)
    assert any("eval/target_accuracy" in x for x in embedded)
    assert any("loss/G" in x or any(k.startswith("loss/") for k in x) for x in embedded)


# ---------------------------------------------------------------------------
# Bad input: one line, before any training step, nothing in the workdir
# ---------------------------------------------------------------------------


def _classify_data(tmp_path, **source):
    src = write_class_folders(tmp_path / "src", "source", splits=(("train", 20), ("test", 10)))
    tgt = write_npz(tmp_path / "tgt", "target", splits=(("train", 10), ("test", 10)))
    return tasks.data_block(
        "classify",
        source_domain=dict(kind="folder", path=src, **source),
        target_domain=dict(kind="npz", path=tgt),
    )


def _check(data, task="classify", size=32):
    tasks.make(task, types.SimpleNamespace(data=data, image_size=size)).check()


def test_a_missing_path_is_named(tmp_path):
    data = _classify_data(tmp_path)
    data.target_domain.path = str(tmp_path / "nowhere")
    with pytest.raises(
        FileNotFoundError, match=r"data.target_domain: npz path not found: .*nowhere"
    ):
        _check(data)
    data.target_domain.update(kind="folder")
    with pytest.raises(FileNotFoundError, match="dataset folder not found: .*nowhere"):
        _check(data)


def test_an_empty_class_folder_is_named(tmp_path):
    data = _classify_data(tmp_path)
    os.makedirs(tmp_path / "src" / "train" / "c_empty")
    with pytest.raises(ValueError, match=r"empty class folder .*train/c_empty"):
        _check(data)


def test_a_class_in_test_but_not_in_train(tmp_path):
    data = _classify_data(tmp_path)
    os.rename(tmp_path / "src" / "train" / "c9", tmp_path / "c9_moved")
    with pytest.raises(ValueError, match=r"classes \['c9'\] of .*test are not in its training"):
        _check(data)


def test_source_and_target_with_different_class_sets(tmp_path):
    data = _classify_data(tmp_path)
    tgt = write_class_folders(tmp_path / "tgt2", "target", splits=(("train", 20), ("test", 10)))
    os.rename(tmp_path / "tgt2" / "test" / "c3", tmp_path / "tgt2" / "test" / "three")
    os.rename(tmp_path / "tgt2" / "train" / "c3", tmp_path / "tgt2" / "train" / "three")
    data.target_domain.update(kind="folder", path=tgt)
    with pytest.raises(ValueError, match="the domains have different class sets"):
        _check(data)


def test_a_class_count_other_than_num_classes(tmp_path):
    data = _classify_data(tmp_path)
    data.num_classes = 12
    with pytest.raises(ValueError, match="has 10 classes .* data.num_classes=12"):
        _check(data)


def test_npz_labels_outside_num_classes(tmp_path):
    data = _classify_data(tmp_path)
    images, labels = _digits("target", "test", 10)
    labels[3] = 10
    np.savez(tmp_path / "tgt" / "test.npz", images=images, labels=labels)
    with pytest.raises(ValueError, match=r"tgt/test.npz: labels \[10\] outside \[0, 10\)"):
        _check(data)


def test_a_corrupt_image_is_named(tmp_path):
    data = _classify_data(tmp_path)
    files = sorted((tmp_path / "src" / "train" / "c4").iterdir())
    files[0].write_bytes(files[0].read_bytes()[:60])  # truncated
    with pytest.raises(ValueError, match=rf"cannot decode image file {files[0]}"):
        _check(data)
    data.validate = "off"  # (then the loader names it when it reaches it)
    _check(data)


def test_a_missing_label_png_is_named(tmp_path):
    root = write_gta5(tmp_path / "gta5", n=12)
    os.remove(tmp_path / "gta5" / "labels" / "00004.png")
    data = tasks.data_block(
        "segment",
        num_classes=19,
        source_domain=dict(kind="folder", path=root, label_map="cityscapes19"),
        target_domain=dict(kind="folder", path=write_cityscapes(tmp_path / "cs")),
    )
    with pytest.raises(FileNotFoundError, match=r"no label file .*labels/00004.png for image"):
        _check(data, "segment")


def test_label_values_outside_num_classes_that_are_not_ignore_index(tmp_path):
    root = write_gta5(tmp_path / "gta5", n=12)
    data = tasks.data_block(
        "segment",
        num_classes=19,
        source_domain=dict(kind="folder", path=root),  # ids, but no label_map to map them
        target_domain=dict(kind="folder", path=write_cityscapes(tmp_path / "cs")),
    )
    data.target_domain.label_map = "cityscapes19"
    with pytest.raises(
        ValueError,
        match=r"gta5/labels/\d+\.png\): label values \[.*\] outside \[0, 19\) that are not ignore_index=255",
    ):
        _check(data, "segment")


def test_cityscapes_images_without_labels_in_the_test_split(tmp_path):
    root = write_cityscapes(tmp_path / "cs")
    os.remove(next((tmp_path / "cs" / "gtFine" / "val" / "aachen").iterdir()))
    data = tasks.data_block(
        "segment",
        num_classes=19,
        source_domain=dict(kind="folder", path=write_gta5(tmp_path / "gta5", n=12)),
        target_domain=dict(kind="folder", path=root, label_map="cityscapes19"),
    )
    data.source_domain.label_map = "cityscapes19"
    with pytest.raises(FileNotFoundError, match=r"data.target_domain, test split: no label file"):
        _check(data, "segment")


def test_bad_input_fails_before_training_and_writes_nothing(tmp_path):
    cfg = _tiny("pixelda")
    cfg.data.source_domain.update(kind="npz", path=write_npz(tmp_path / "src", "source"))
    cfg.data.target_domain.update(kind="folder", path=str(tmp_path / "missing"))
    workdir = tmp_path / "wd"
    with pytest.raises(FileNotFoundError, match="data.target_domain: dataset folder not found"):
        trainer.train(cfg, str(workdir), mesh=parallel.make_mesh(2))
    assert not workdir.exists()


def test_a_flat_unlabelled_target_needs_the_oracle_off(tmp_path):
    data = _classify_data(tmp_path)
    root = tmp_path / "flat"
    images, _ = _digits("target", "train", 6)
    for i, x in enumerate(images):  # ROOT/train/*.png: unlabelled
        os.makedirs(root / "train", exist_ok=True)
        Image.fromarray(x).save(root / "train" / f"{i}.png")
    write_class_folders(root, "target", splits=(("test", 10),))
    data.target_domain.update(kind="folder", path=str(root))
    config = types.SimpleNamespace(data=data, image_size=32)
    tasks.make("classify", config).check()  # an unlabelled target trains the method
    assert len(tasks.make("classify", config).train_streams()["target"]) == 6
    with pytest.raises(ValueError, match="target oracle .* --config.train_oracle=False"):
        tasks.make("classify", config, oracle=True).check()


def test_a_one_file_npz_holds_out_every_tenth_example_as_its_test_split(tmp_path):
    images, labels = _digits("source", "train", 30)
    np.savez(tmp_path / "all.npz", images=images, labels=labels)
    data = tasks.data_block(
        "classify",
        source_domain=dict(kind="npz", path=str(tmp_path / "all.npz")),
        target_domain=dict(kind="npz", path=str(tmp_path / "all.npz")),
        num_train=0,
        num_test=0,
    )
    task = tasks.Classification(data, 32)
    train = task.train_streams()["source"].arrays
    test = task.test_split("source")
    assert len(train["image"]) == 27 and len(test["image"]) == 3
    np.testing.assert_array_equal(test["label"], labels[9::10])
    train_rows = {x.tobytes() for x in train["image"]}
    assert not any(x.tobytes() in train_rows for x in images[9::10])
    assert "label" not in task.train_streams()["target"].arrays  # target labels never train
