"""Tests for ganda_jax.losses against hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ganda_jax import losses


def close(actual, expected, tol=1e-6):
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=tol, atol=tol)


def softplus(v):
    return math.log1p(math.exp(v))


# Small concrete discriminator outputs used throughout.
REAL = jnp.array([[1.0, 0.0], [2.0, -1.0]])  # mean 0.5
FAKE = jnp.array([0.5, -0.5, 0.0])  # mean 0.0


# ---------------------------------------------------------------- building blocks


def test_least_squares():
    # (1-1)^2 + (0-1)^2 + (2-1)^2 + (-1-1)^2 = 0 + 1 + 1 + 4 = 6 -> /4
    close(losses.least_squares(predictions=REAL, target=1.0), 1.5)
    close(
        losses.least_squares(predictions=jnp.array([1.0, 3.0]), target=jnp.array([0.0, 1.0])), 2.5
    )


def test_sigmoid_bce():
    # label 1, logit 2: softplus(2) - 2 = log(1 + e^-2)
    close(losses.sigmoid_bce(logits=jnp.array([2.0]), labels=1.0), math.log1p(math.exp(-2.0)))
    # label 0, logit 2: softplus(2) = log(1 + e^2)
    close(losses.sigmoid_bce(logits=jnp.array([2.0]), labels=0.0), math.log1p(math.exp(2.0)))
    # logit 0 -> log 2 whatever the label; soft label 0.5 with logit 2: softplus(2) - 1
    close(losses.sigmoid_bce(logits=jnp.zeros((2, 3)), labels=1.0), math.log(2.0))
    close(losses.sigmoid_bce(logits=jnp.array([2.0]), labels=0.5), softplus(2.0) - 1.0)


def test_sigmoid_bce_extreme_logits_finite_values_and_grads():
    logits = jnp.array([100.0, -100.0, 0.0])
    for label in (0.0, 1.0):
        value, grad = jax.value_and_grad(
            lambda l, label=label: losses.sigmoid_bce(logits=l, labels=label)
        )(logits)
        assert np.isfinite(value)
        assert np.all(np.isfinite(grad))
    # label 1: per-element [~0, 100, log 2] -> mean
    close(
        losses.sigmoid_bce(logits=logits, labels=1.0), (0.0 + 100.0 + math.log(2.0)) / 3, tol=1e-5
    )
    # gradient of mean(softplus(l) - l*y) is (sigmoid(l) - y) / n
    grad = jax.grad(lambda l: losses.sigmoid_bce(logits=l, labels=1.0))(logits)
    close(grad, np.array([0.0, -1.0, -0.5]) / 3, tol=1e-6)


def test_gan_losses_extreme_logits_grads_finite():
    real = jnp.array([100.0, -100.0])
    fake = jnp.array([-100.0, 100.0])
    for loss_type in losses.GAN_LOSS_TYPES:
        gd = jax.grad(
            lambda r, f, loss_type=loss_type: losses.gan_discriminator_loss(
                real_logits=r, fake_logits=f, loss_type=loss_type
            ),
            argnums=(0, 1),
        )(real, fake)
        gg = jax.grad(
            lambda f, loss_type=loss_type: losses.gan_generator_loss(
                fake_logits=f, loss_type=loss_type
            )
        )(fake)
        assert all(np.all(np.isfinite(g)) for g in gd), loss_type
        assert np.all(np.isfinite(gg)), loss_type


def test_hinge():
    # relu(1 - [1, 0, 2, -1]) = [0, 1, 0, 2] -> 0.75; relu(1 + [.5, -.5, 0]) = [1.5, .5, 1] -> 1
    close(losses.hinge_d(real_logits=REAL, fake_logits=FAKE), 1.75)
    close(losses.hinge_g(fake_logits=jnp.array([1.0, 2.0])), -1.5)


# ---------------------------------------------------------------- adversarial


def test_lsgan():
    # D: 0.5 * (1.5 + mean([.25, .25, 0])) = 0.5 * (1.5 + 1/6)
    close(
        losses.gan_discriminator_loss(real_logits=REAL, fake_logits=FAKE, loss_type="lsgan"),
        0.5 * (1.5 + 1 / 6),
    )
    # G: mean([(.5-1)^2, (-.5-1)^2, (0-1)^2]) = (0.25 + 2.25 + 1) / 3, no 0.5 factor
    close(losses.gan_generator_loss(fake_logits=FAKE, loss_type="lsgan"), 3.5 / 3)
    # Perfect D -> 0; perfect G -> 0.
    close(
        losses.gan_discriminator_loss(
            real_logits=jnp.ones(3), fake_logits=jnp.zeros(3), loss_type="lsgan"
        ),
        0.0,
    )
    close(losses.gan_generator_loss(fake_logits=jnp.ones((2, 4, 4, 1)), loss_type="lsgan"), 0.0)


@pytest.mark.parametrize("loss_type", ["nsgan", "bce", "vanilla"])
def test_nsgan(loss_type):
    real = jnp.array([2.0])
    fake = jnp.array([-1.0, 3.0])
    # D: softplus(-2) + mean(softplus(-1), softplus(3))
    expected_d = softplus(-2.0) + (softplus(-1.0) + softplus(3.0)) / 2
    close(
        losses.gan_discriminator_loss(real_logits=real, fake_logits=fake, loss_type=loss_type),
        expected_d,
    )
    # G (non-saturating): mean(softplus(1), softplus(-3))
    expected_g = (softplus(1.0) + softplus(-3.0)) / 2
    close(losses.gan_generator_loss(fake_logits=fake, loss_type=loss_type), expected_g)


def test_hinge_and_wgan_types():
    close(
        losses.gan_discriminator_loss(real_logits=REAL, fake_logits=FAKE, loss_type="hinge"), 1.75
    )
    close(losses.gan_generator_loss(fake_logits=FAKE + 1.0, loss_type="hinge"), -1.0)
    # wgan D: mean(fake) - mean(real) = 0 - 0.5
    close(losses.gan_discriminator_loss(real_logits=REAL, fake_logits=FAKE, loss_type="wgan"), -0.5)
    close(losses.gan_generator_loss(fake_logits=REAL, loss_type="wgan"), -0.5)


def test_unknown_loss_type_raises():
    with pytest.raises(ValueError, match="lsgan"):
        losses.gan_discriminator_loss(real_logits=REAL, fake_logits=FAKE, loss_type="ls-gan")
    with pytest.raises(ValueError, match="nsgan"):
        losses.gan_generator_loss(fake_logits=FAKE, loss_type="wasserstein")


def test_patchgan_shapes_and_jit():
    real = jnp.full((2, 4, 4, 1), 1.0)
    fake = jnp.full((2, 4, 4, 1), 0.5)
    fn = jax.jit(losses.gan_discriminator_loss, static_argnames="loss_type")
    out = fn(real_logits=real, fake_logits=fake, loss_type="lsgan")
    assert out.shape == ()
    close(out, 0.5 * 0.25)


@pytest.mark.parametrize("loss_type", losses.GAN_LOSS_TYPES)
def test_bf16_inputs_give_f32(loss_type):
    real = REAL.astype(jnp.bfloat16)
    fake = FAKE.astype(jnp.bfloat16)
    d = losses.gan_discriminator_loss(real_logits=real, fake_logits=fake, loss_type=loss_type)
    g = losses.gan_generator_loss(fake_logits=fake, loss_type=loss_type)
    assert d.dtype == jnp.float32 and g.dtype == jnp.float32
    # These particular values are exact in bf16, so results match the f32 ones.
    close(d, losses.gan_discriminator_loss(real_logits=REAL, fake_logits=FAKE, loss_type=loss_type))


def test_bf16_other_losses_give_f32():
    x = jnp.ones((2, 3), jnp.bfloat16)
    y = jnp.zeros((2, 3), jnp.bfloat16)
    logits = jnp.array([[2.0, 0.0]], jnp.bfloat16)
    labels = jnp.array([0])
    outs = [
        losses.l1(x=x, y=y),
        losses.l2(x=x, y=y),
        losses.cycle_loss(real=x, reconstructed=y),
        losses.identity_loss(real=x, same=y, distance="mse"),
        losses.masked_l2(x=x, y=y, mask=jnp.ones((2, 1), jnp.bfloat16)),
        losses.least_squares(predictions=x, target=1.0),
        losses.sigmoid_bce(logits=x, labels=1.0),
        losses.softmax_cross_entropy(logits=logits, labels=labels),
        losses.accuracy(logits=logits, labels=labels),
    ]
    for out in outs:
        assert out.dtype == jnp.float32 and out.shape == ()


def test_bf16_mean_is_accurate():
    # 4096 bf16 values of 1 + 2^-7 (exact in bf16); the f32 mean is exact too.
    x = jnp.full((1, 64, 64, 1), 1.0 + 2.0**-7, jnp.bfloat16)
    close(losses.l1(x=x, y=jnp.zeros_like(x)), 1.0 + 2.0**-7)


# ---------------------------------------------------------------- reconstruction


def test_l1_l2_mse():
    x = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    y = jnp.array([[1.0, 0.0], [4.0, 1.0]])
    # |diff| = [0, 2, 1, 3]; diff^2 = [0, 4, 1, 9]
    close(losses.l1(x=x, y=y), 1.5)
    close(losses.l2(x=x, y=y), 3.5)
    close(losses.mse(x=x, y=y), 3.5)
    close(losses.l1(x=x, y=1.0), 1.5)  # broadcast: |[0, 1, 2, 3]|


def test_cycle_and_identity():
    real = jnp.array([1.0, -1.0, 0.5, 0.0])
    rec = jnp.array([0.5, -1.0, 0.0, 1.0])
    # diff = [.5, 0, .5, 1]: l1 = 2/4, l2 = (.25 + .25 + 1)/4
    close(losses.cycle_loss(real=real, reconstructed=rec), 0.5)
    close(losses.cycle_loss(real=real, reconstructed=rec, distance="l2"), 0.375)
    close(losses.identity_loss(real=real, same=rec), 0.5)
    close(losses.identity_loss(real=real, same=rec, distance="mse"), 0.375)
    with pytest.raises(ValueError, match="l1"):
        losses.cycle_loss(real=real, reconstructed=rec, distance="l3")


def test_masked_l2_counts_channels():
    # x - y per pixel (B=1, H=1, W=2, C=3): pixel 0 diff 1 in all channels,
    # pixel 1 diff 2 in all channels. Mask selects pixel 1 only.
    x = jnp.array([[[[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]]])
    y = jnp.zeros_like(x)
    mask = jnp.array([[[[0.0], [1.0]]]])  # [1, 1, 2, 1]
    # sum(mask * diff^2) = 3 * 4 = 12; normaliser = 3 channels * 1 pixel -> 4
    close(losses.masked_l2(x=x, y=y, mask=mask), 4.0)
    # Mask without channel axis [B, H, W] is equivalent.
    close(losses.masked_l2(x=x, y=y, mask=mask[..., 0]), 4.0)
    # Full mask = plain MSE: (3*1 + 3*4) / 6
    close(losses.masked_l2(x=x, y=y, mask=jnp.ones((1, 1, 2, 1))), 2.5)
    # Empty mask -> 0, not nan.
    close(losses.masked_l2(x=x, y=y, mask=jnp.zeros((1, 1, 2, 1))), 0.0)


# ---------------------------------------------------------------- classification


def test_softmax_cross_entropy_classification():
    # logits [[2, 0]], label 0 -> -log(e^2 / (e^2 + 1)) = log(1 + e^-2)
    close(
        losses.softmax_cross_entropy(logits=jnp.array([[2.0, 0.0]]), labels=jnp.array([0])),
        math.log1p(math.exp(-2.0)),
    )
    # Two rows: label 1 for [2, 0] -> log(1 + e^2); uniform 3 classes -> log 3
    logits = jnp.array([[2.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    expected = (math.log(math.exp(2) + 2) - 0.0 + math.log(3.0)) / 2
    close(
        losses.softmax_cross_entropy(logits=logits, labels=jnp.array([1, 2]), num_classes=3),
        expected,
    )


def test_softmax_cross_entropy_per_pixel_mask_and_ignore():
    # [B=1, H=1, W=3, C=2]
    logits = jnp.array([[[[2.0, 0.0], [0.0, 0.0], [0.0, 3.0]]]])
    ce0 = math.log1p(math.exp(-2.0))  # pixel 0, label 0
    ce1 = math.log(2.0)  # pixel 1, any label
    ce2 = math.log1p(math.exp(3.0))  # pixel 2, label 0
    labels = jnp.array([[[0, 1, 0]]])
    close(losses.softmax_cross_entropy(logits=logits, labels=labels), (ce0 + ce1 + ce2) / 3)
    mask = jnp.array([[[1.0, 1.0, 0.0]]])
    close(losses.softmax_cross_entropy(logits=logits, labels=labels, mask=mask), (ce0 + ce1) / 2)
    close(
        losses.softmax_cross_entropy(logits=logits, labels=labels, mask=mask[..., None]),
        (ce0 + ce1) / 2,
    )
    for ignore in (255, -1):
        ignored = jnp.array([[[0, ignore, 0]]])
        close(
            losses.softmax_cross_entropy(logits=logits, labels=ignored, ignore_index=ignore),
            (ce0 + ce2) / 2,
        )
        grad = jax.grad(
            lambda l, y=ignored, i=ignore: losses.softmax_cross_entropy(
                logits=l, labels=y, ignore_index=i
            )
        )(logits)
        assert np.all(np.isfinite(grad))
        close(grad[0, 0, 1], [0.0, 0.0])  # ignored pixel gets no gradient
    # Nothing valid -> 0.
    close(
        losses.softmax_cross_entropy(
            logits=logits, labels=jnp.full((1, 1, 3), 255), ignore_index=255
        ),
        0.0,
    )


def test_softmax_cross_entropy_shape_checks():
    with pytest.raises(ValueError, match="num_classes"):
        losses.softmax_cross_entropy(
            logits=jnp.zeros((2, 3)), labels=jnp.zeros((2,), jnp.int32), num_classes=4
        )
    with pytest.raises(ValueError, match="one-hot"):
        losses.softmax_cross_entropy(logits=jnp.zeros((2, 3)), labels=jnp.zeros((2, 3), jnp.int32))


def test_accuracy():
    logits = jnp.array([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0]])
    labels = jnp.array([0, 1, 1, 1])  # 3 of 4 correct
    close(losses.accuracy(logits=logits, labels=labels), 0.75)
    close(losses.accuracy(logits=logits, labels=labels, mask=jnp.array([1, 1, 0, 0])), 1.0)
    close(losses.accuracy(logits=logits, labels=jnp.array([0, 255, 1, 1]), ignore_index=255), 2 / 3)
    # per-pixel [1, 2, 2, 2]
    pix = logits.reshape(1, 2, 2, 2)
    close(losses.accuracy(logits=pix, labels=labels.reshape(1, 2, 2)), 0.75)
