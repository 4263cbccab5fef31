"""Segmentation DA data (ganda_jax.data.tasks.Segmentation) and mIoU evaluation (ganda_jax.metrics.seg_eval)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ganda_jax.data import domains, pipeline, seg, synthetic, tasks
from ganda_jax.metrics import seg_eval
from ganda_jax.train import parallel


def _data(**kw):
    return tasks.data_block("segment", **{"num_train": 16, "num_test": 6, **kw})


def _task(size=32, **kw):
    return tasks.Segmentation(_data(**kw), size)


def test_train_streams_hide_target_labels_and_hold_class_maps():
    task = _task()
    streams = task.train_streams()
    assert set(streams) == {"source", "target"}
    assert streams["source"].fields == ("image", "label")
    assert streams["target"].fields == ("image",)
    src = streams["source"].arrays
    assert src["image"].shape == (16, 32, 32, 3) and src["image"].dtype == np.uint8
    assert src["label"].shape == (16, 32, 32) and src["label"].dtype == np.uint8
    assert set(np.unique(src["label"])) <= set(range(synthetic.NUM_SEG_CLASSES))
    # Through the loader: per-pixel labels survive batching, the target batch has no labels.
    loader = pipeline.Loader(streams, global_batch_size=4, seed=0, num_threads=0, prefetch=0)
    batch = loader.batch(3)
    assert batch["source"]["label"].shape == (4, 32, 32)
    assert set(batch["target"]) == {"image"}
    ex = task.example_batch(4)
    for stream in ("source", "target"):
        for k, v in ex[stream].items():
            assert v.shape == batch[stream][k].shape and v.dtype == batch[stream][k].dtype


def test_embedded_data_is_deterministic_and_splits_are_disjoint():
    a = _task().train_streams()["source"].arrays
    test_a = _task().test_split("target")
    domains.embedded_arrays.cache_clear()
    b = _task().train_streams()["source"].arrays
    test_b = _task().test_split("target")
    for k in ("image", "label"):
        np.testing.assert_array_equal(a[k], b[k])
        np.testing.assert_array_equal(test_a[k], test_b[k])
    assert test_a["image"].shape == (6, 32, 32, 3) and test_a["label"].dtype == np.int32
    train_tgt = _task().train_streams()["target"].arrays["image"]
    assert not np.array_equal(train_tgt[:6], test_a["image"])
    # Another seed gives other scenes.
    other = _task(seed=1).train_streams()["source"].arrays["label"]
    assert not np.array_equal(other, a["label"])


def test_joint_flip_keeps_image_and_label_aligned():
    task = _task(flip=True)
    src = task.train_streams()["source"]
    transform = task.train_transforms()["source"]
    assert _task().train_transforms() == {"source": None, "target": None}  # embedded, no flip
    ex = src[0]
    flipped = 0
    for k in range(8):
        out = transform(ex, np.random.default_rng(k))
        if np.array_equal(out["image"], ex["image"][:, ::-1]):
            np.testing.assert_array_equal(out["label"], ex["label"][:, ::-1])
            flipped += 1
        else:
            np.testing.assert_array_equal(out["image"], ex["image"])
            np.testing.assert_array_equal(out["label"], ex["label"])
    assert 0 < flipped < 8


def test_transform_maps_ids_resizes_labels_nearest_and_crops():
    to19 = dict(num_classes=19, ignore_index=255, label_map="cityscapes19")
    # A 4x8 label image of Cityscapes label ids: road (7) left half, car (26) right, void (0).
    label = np.full((4, 8, 1), 7, np.uint8)
    label[:, 4:] = 26
    label[1, 3] = 0
    image = np.zeros((4, 8, 3), np.uint8)
    out = seg.joint_transform(
        {"image": image, "label": label},
        None,
        image_size=2,
        label_fn=lambda x: seg.to_class_map(x, **to19),
        train=False,
    )
    # Shorter side 4 -> 2 (nearest: source rows 1, 3 and columns 1, 3, 5, 7), then the
    # central 2x2 crop = source columns 3 and 5; never a blend of two class ids.
    assert out["image"].shape == (2, 2, 3) and out["label"].dtype == np.uint8
    np.testing.assert_array_equal(out["label"], [[255, 13], [0, 13]])
    np.testing.assert_array_equal(
        seg.to_class_map(np.array([[0, 7], [33, 34]]), **to19), [[255, 0], [18, 255]]
    )
    with pytest.raises(ValueError, match="outside"):
        seg.to_class_map(np.array([[0, 7]]), num_classes=5, ignore_index=255)


def test_config_checks():
    with pytest.raises(ValueError, match="num_classes=5"):
        _task(num_classes=19).train_streams()
    with pytest.raises(ValueError, match="needs a dataset name"):
        _task(source_domain=dict(kind="tfds")).train_streams()
    with pytest.raises(ValueError, match="no domain"):
        _task().test_split("train")
    assert _task().class_names() == synthetic.SEG_CLASS_NAMES


def _encoded_split():
    """3 images 2x2, the prediction of the 'encoded' segmenter hidden in the red channel."""
    labels = np.array([[[0, 0], [1, 255]], [[2, 2], [1, 0]], [[255, 255], [2, 1]]], np.int32)
    preds = np.array([[[0, 1], [1, 2]], [[2, 0], [1, 0]], [[1, 1], [2, 1]]], np.int32)
    image = np.zeros((3, 2, 2, 3), np.uint8)
    image[..., 0] = 100 * preds
    return {"image": image, "label": labels}, preds


def test_miou_matches_a_hand_computed_confusion_matrix():
    split, preds = _encoded_split()

    def logits_fn(scale, x):
        pred = jnp.round((x[..., 0] + 1.0) * 127.5 / 100.0).astype(jnp.int32)
        return {
            "encoded": scale * jax.nn.one_hot(pred, 3),
            "always_0": jnp.zeros(x.shape[:3] + (3,)).at[..., 0].set(1.0),
        }

    fn = seg_eval.make_segment_fn(logits_fn, num_classes=3, ignore_index=255)
    # 2 devices, batches of 2: the last batch is padded and its padding dropped.
    scores = seg_eval.miou(fn, jnp.float32(5.0), split, mesh=parallel.make_mesh(2), batch_size=2)

    # Counted (label, pred) pairs, the two 255 pixels left out:
    #   image 0: (0,0) (0,1) (1,1); image 1: (2,2) (2,0) (1,1) (0,0); image 2: (2,2) (1,1).
    cm = np.array([[2, 1, 0], [0, 3, 0], [1, 0, 2]])
    counted = np.zeros((3, 3), int)
    for y, p in zip(split["label"].ravel(), preds.ravel()):
        if y != 255:
            counted[y, p] += 1
    np.testing.assert_array_equal(counted, cm)
    np.testing.assert_array_equal(scores["encoded"]["confusion"], cm)
    # IoU_0 = 2 / (3 + 3 - 2), IoU_1 = 3 / (3 + 4 - 3), IoU_2 = 2 / (3 + 2 - 2).
    np.testing.assert_allclose(scores["encoded"]["iou"], [0.5, 0.75, 2 / 3])
    assert scores["encoded"]["miou"] == pytest.approx((0.5 + 0.75 + 2 / 3) / 3)
    assert scores["encoded"]["pixel_accuracy"] == pytest.approx(7 / 9)
    # Everything predicted 0: IoU_0 = 3 / 9, the others 0.
    assert scores["always_0"]["miou"] == pytest.approx(1 / 9)
    assert scores["always_0"]["pixel_accuracy"] == pytest.approx(3 / 9)

    flat = seg_eval.metric_dict(
        {"miou": 0.5, "pixel_accuracy": 0.9, "iou": np.array([0.25, np.nan, 1.0])},
        prefix="eval/source_only_",
        class_names=("a", "b", "c"),
    )
    assert flat == {
        "eval/source_only_miou": 0.5,
        "eval/source_only_pixel_accuracy": 0.9,
        "eval/source_only_iou/a": 0.25,
        "eval/source_only_iou/c": 1.0,
    }
