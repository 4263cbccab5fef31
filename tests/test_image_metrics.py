"""Tests for ganda_jax.metrics.image_metrics against hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ganda_jax.metrics import image_metrics as im


def close(actual, expected, tol=1e-5):
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=tol, atol=tol)


# ---------------------------------------------------------------- PSNR


@pytest.mark.parametrize("lib", [np, jnp])
def test_psnr_hand_computed(lib):
    x = lib.zeros((2, 2, 2, 1), lib.float32)
    # image 0: all diffs 0.5 -> mse 0.25 -> 10 log10(4 / 0.25) = 10 log10(16)
    # image 1: one pixel of 4 differs by 2 -> mse 1 -> 10 log10(4)
    y = np.zeros((2, 2, 2, 1), np.float32)
    y[0] = 0.5
    y[1, 0, 0, 0] = 2.0
    y = lib.asarray(y)
    per = im.psnr_per_image(x=x, y=y)
    assert per.shape == (2,) and per.dtype == np.float32
    close(per, [10 * math.log10(16), 10 * math.log10(4)])
    close(im.psnr(x=x, y=y), (10 * math.log10(16) + 10 * math.log10(4)) / 2)
    assert isinstance(per, jax.Array) == (lib is jnp)


def test_psnr_uint8_no_wraparound():
    x = np.zeros((1, 2, 2, 3), np.uint8)
    y = np.full((1, 2, 2, 3), 255, np.uint8)
    # mse = 255^2 -> 0 dB (a wrapping uint8 subtraction would give 1^2).
    close(im.psnr(x=y, y=x, data_range=255), 0.0)
    y[...] = 0
    y[0, 0, 0, 0] = 10  # mse = 100 / 12
    close(im.psnr(x=x, y=y, data_range=255), 10 * math.log10(255**2 / (100 / 12)))


def test_psnr_identical_images_finite():
    x = jnp.ones((3, 4, 4, 3))
    out = im.psnr_per_image(x=x, y=x)
    close(out, [10 * math.log10(4 / im.MSE_FLOOR)] * 3, tol=1e-4)
    assert np.all(np.isfinite(out))


def test_psnr_jit_and_shape_errors():
    x = jnp.zeros((2, 4, 4, 3))
    y = jnp.full((2, 4, 4, 3), 1.0)
    close(jax.jit(lambda a, b: im.psnr(x=a, y=b))(x, y), 10 * math.log10(4.0))
    with pytest.raises(ValueError):
        im.psnr(x=x, y=y[:1])


# ---------------------------------------------------------------- uint8


@pytest.mark.parametrize("lib", [np, jnp])
def test_to_uint8(lib):
    x = lib.asarray([-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, -3.0], lib.float32)
    # (x + 1) * 127.5 = [0, 63.75, 127.5, 191.25, 255, 318.75, -255]
    # round half-to-even 127.5 -> 128; clip to [0, 255].
    out = im.to_uint8(x)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(out), [0, 64, 128, 191, 255, 255, 0])
    assert im.to_uint8(x.astype(lib.uint8)).dtype == np.uint8  # passthrough


def test_to_uint8_bf16_and_roundtrip():
    u = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(im.to_uint8(im.from_uint8(u)), u)
    np.testing.assert_array_equal(np.asarray(im.to_uint8(im.from_uint8(jnp.asarray(u)))), u)
    assert im.to_uint8(jnp.array([0.0], jnp.bfloat16)).dtype == jnp.uint8


def test_from_uint8():
    u = np.array([0, 51, 255], np.uint8)
    out = im.from_uint8(u)
    assert out.dtype == np.float32
    close(out, [-1.0, 51 / 127.5 - 1.0, 1.0])
    assert im.from_uint8(jnp.asarray(u), jnp.bfloat16).dtype == jnp.bfloat16


# ---------------------------------------------------------------- segmentation

# labels / preds over 6 pixels, 3 classes, plus one void (255) pixel.
LABELS = np.array([[0, 0, 1, 1, 2, 255, 1]])
PREDS = np.array([[0, 1, 1, 1, 0, 2, 1]])
# rows = label, cols = pred:
#   label 0: pred 0, pred 1          -> [1, 1, 0]
#   label 1: pred 1 x3               -> [0, 3, 0]
#   label 2: pred 0                  -> [1, 0, 0]
CM = np.array([[1, 1, 0], [0, 3, 0], [1, 0, 0]])


@pytest.mark.parametrize("lib", [np, jnp])
def test_confusion_matrix(lib):
    cm = im.confusion_matrix(preds=lib.asarray(PREDS), labels=lib.asarray(LABELS), num_classes=3)
    np.testing.assert_array_equal(np.asarray(cm), CM)
    assert np.issubdtype(np.asarray(cm).dtype, np.integer)
    # Mask out the 4th pixel (label 1, pred 1).
    mask = lib.asarray([[1, 1, 1, 0, 1, 1, 1]])
    cm = im.confusion_matrix(
        preds=lib.asarray(PREDS), labels=lib.asarray(LABELS), num_classes=3, mask=mask
    )
    np.testing.assert_array_equal(np.asarray(cm), CM - np.array([[0, 0, 0], [0, 1, 0], [0, 0, 0]]))


def test_confusion_matrix_jit():
    fn = jax.jit(im.confusion_matrix, static_argnames="num_classes")
    cm = fn(preds=jnp.asarray(PREDS), labels=jnp.asarray(LABELS), num_classes=3)
    np.testing.assert_array_equal(np.asarray(cm), CM)


@pytest.mark.parametrize("lib", [np, jnp])
def test_iou_miou_pixel_accuracy(lib):
    cm = lib.asarray(CM)
    # IoU_0 = 1 / (2 + 2 - 1) = 1/3; IoU_1 = 3 / (3 + 4 - 3) = 3/4; IoU_2 = 0 / (1 + 0 - 0) = 0
    close(im.iou_per_class_from_confusion(cm), [1 / 3, 3 / 4, 0.0])
    close(im.miou_from_confusion(cm), (1 / 3 + 3 / 4 + 0.0) / 3)
    close(im.pixel_accuracy_from_confusion(cm), 4 / 6)


def test_miou_skips_absent_classes():
    # Class 2 appears in neither labels nor predictions -> skipped, not IoU 0.
    cm = np.array([[2, 0, 0], [1, 1, 0], [0, 0, 0]])
    iou = im.iou_per_class_from_confusion(cm)
    close(iou[:2], [2 / 3, 1 / 2])
    assert np.isnan(iou[2])
    close(im.miou_from_confusion(cm), (2 / 3 + 1 / 2) / 2)
    close(im.miou_from_confusion(jnp.asarray(cm)), (2 / 3 + 1 / 2) / 2)
    # Empty matrix -> nan.
    assert np.isnan(im.miou_from_confusion(np.zeros((3, 3), np.int64)))
    assert np.isnan(im.pixel_accuracy_from_confusion(np.zeros((3, 3), np.int64)))
