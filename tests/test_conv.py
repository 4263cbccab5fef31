"""ganda_jax.conv: the CPU convolution gradients equal XLA's; other cases fall through."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from ganda_jax import conv

DN = ("NHWC", "HWIO", "NHWC")


@pytest.fixture(autouse=True)
def cpu_gradients(monkeypatch):
    monkeypatch.setattr(conv, "CPU_GRADIENTS", True)  # opt-in (GANDA_CPU_CONV_GRADS=1)


@pytest.mark.parametrize(
    "kernel,stride,padding",
    [
        (3, 1, "SAME"),
        (3, 1, ((1, 1), (1, 1))),
        (4, 2, ((1, 1), (1, 1))),  # PatchGAN / DCGAN downsampling
        (4, 1, ((2, 1), (1, 2))),  # asymmetric (DiscoGAN's last layer)
        (7, 1, "VALID"),
        (5, 2, "SAME"),
        (1, 1, "VALID"),
    ],
)
def test_gradients_equal_xla(kernel, stride, padding):
    rng = np.random.default_rng(kernel * 10 + stride)
    x = jnp.asarray(rng.standard_normal((2, 9, 10, 3)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((kernel, kernel, 3, 5)), jnp.float32)

    def loss(fn):
        return lambda x, w: jnp.sum(
            jnp.sin(fn(x, w, (stride, stride), padding, dimension_numbers=DN))
        )

    ref_y = lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=DN)
    y = jax.jit(
        lambda x, w: conv.conv_general_dilated(
            x, w, (stride, stride), padding, dimension_numbers=DN
        )
    )(x, w)
    np.testing.assert_array_equal(y, ref_y)
    ref = jax.grad(loss(lax.conv_general_dilated), (0, 1))(x, w)
    got = jax.jit(jax.grad(loss(conv.conv_general_dilated), (0, 1)))(x, w)
    for name, r, g in zip(("input", "weight"), ref, got):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5, err_msg=name)
    # The custom rule is what ran (not XLA's): its weight gradient is a sum of per-tap dots.
    hlo = jax.jit(jax.grad(loss(conv.conv_general_dilated), 1)).lower(x, w).as_text()
    assert hlo.count("dot_general") >= kernel * kernel


def test_bfloat16_weight_gradient_is_accumulated_in_float32():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 16, 16, 8)), jnp.bfloat16)
    w = jnp.asarray(0.1 * rng.standard_normal((3, 3, 8, 8)), jnp.bfloat16)
    f = lambda fn: (
        lambda w: jnp.sum(fn(x, w, (1, 1), "SAME", dimension_numbers=DN).astype(jnp.float32) ** 2)
    )  # noqa: E731
    got = jax.grad(f(conv.conv_general_dilated))(w)
    ref = jax.grad(
        lambda w: jnp.sum(
            lax.conv_general_dilated(x.astype(jnp.float32), w, (1, 1), "SAME", dimension_numbers=DN)
            ** 2
        )
    )(w.astype(jnp.float32))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(got, np.float32), ref, rtol=0.05, atol=0.05 * float(jnp.abs(ref).max())
    )


def test_dilated_grouped_and_other_layouts_fall_through_to_xla():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((1, 8, 8, 4)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 2, 4)), jnp.float32)
    y = conv.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN, feature_group_count=2)
    ref = lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=DN, feature_group_count=2
    )
    np.testing.assert_array_equal(y, ref)
    hlo = (
        jax.jit(
            jax.grad(
                lambda w: jnp.sum(
                    conv.conv_general_dilated(
                        x, w, (1, 1), "SAME", dimension_numbers=DN, feature_group_count=2
                    )
                )
            )
        )
        .lower(w)
        .as_text()
    )
    assert "dot_general" not in hlo  # XLA's own transpose (a convolution), not the custom rule
