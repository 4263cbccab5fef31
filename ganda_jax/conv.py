"""A 2-D convolution with gradients that XLA:CPU computes quickly.

XLA:CPU runs a forward convolution about as fast as PyTorch's oneDNN, but the
weight-gradient convolution its autodiff emits takes a slow path: it ran at a
tenth of the forward FLOP rate (``benchmarks/conv_backward.py``), while the
input gradient runs about as fast as the forward pass. On the CPU
backend, when enabled (``GANDA_CPU_CONV_GRADS=1``), :func:`conv_general_dilated` has a custom VJP that keeps XLA's
input gradient and computes the weight gradient as one GEMM per kernel tap,
``dW[i, j] = X_ij^T dY``, where ``X_ij`` is the padded input shifted by
``(i, j)`` and strided like the output (im2col without materialising the patch
matrix), which XLA:CPU runs at GEMM speed.

Other backends (GPU, TPU) and other convolutions (dilation, groups, layouts
other than NHWC/HWIO) use ``lax.conv_general_dilated`` unchanged. The signature
is ``lax.conv_general_dilated``'s, so it plugs into ``flax.linen.Conv(...,
conv_general_dilated=conv_general_dilated)``.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax import lax

# Opt-in (``GANDA_CPU_CONV_GRADS=1``, or True here before tracing): the per-tap GEMMs make
# bigger programs, and for the tiny models of the test suite the extra compile time outweighs
# the faster steps (a clean CI run took 22.5 min instead of about 13); at reference sizes the
# steps are up to 2.2x faster (benchmarks/RESULTS.md).
CPU_GRADIENTS = os.environ.get("GANDA_CPU_CONV_GRADS", "0") == "1"

_NHWC = lax.ConvDimensionNumbers(
    lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2)
)


def _is_nhwc(dimension_numbers, ndim) -> bool:
    if ndim != 4 or dimension_numbers is None:
        return False
    if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
        return dimension_numbers == _NHWC
    return tuple(dimension_numbers) == ("NHWC", "HWIO", "NHWC")


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    batch_group_count=1,
    precision=None,
    preferred_element_type=None,
):
    """``lax.conv_general_dilated``, with the fast CPU gradients where they apply."""
    plain = (
        CPU_GRADIENTS
        and jax.default_backend() == "cpu"
        and _is_nhwc(dimension_numbers, jnp.ndim(lhs))
        and feature_group_count == 1
        and batch_group_count == 1
        and preferred_element_type is None
        and all(d == 1 for d in (lhs_dilation or (1, 1)))
        and all(d == 1 for d in (rhs_dilation or (1, 1)))
    )
    if not plain:
        return lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count,
            batch_group_count=batch_group_count,
            precision=precision,
            preferred_element_type=preferred_element_type,
        )
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _conv(lhs, rhs, strides, pads, precision)


def _forward(x, w, strides, pads, precision):
    return lax.conv_general_dilated(
        x, w, strides, pads, dimension_numbers=_NHWC, precision=precision
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, w, strides, pads, precision):
    return _forward(x, w, strides, pads, precision)


def _conv_fwd(x, w, strides, pads, precision):
    return _forward(x, w, strides, pads, precision), (x, w)


def _conv_bwd(strides, pads, precision, residuals, dy):
    x, w = residuals
    return _input_grad(dy, w, x.shape, strides, pads, precision), _weight_grad(
        x, dy, w.shape, strides, pads, precision
    )


_conv.defvjp(_conv_fwd, _conv_bwd)


def _weight_grad(x, dy, w_shape, strides, pads, precision):
    """``dW[i, j] = sum_{n,h,w} x_pad[n, h*s + i, w*s + j, :]^T dy[n, h, w, :]``."""
    kh, kw, cin, cout = w_shape
    n, ho, wo, _ = dy.shape
    (sh, sw), ((pt, pb), (pl, pr)) = strides, pads
    # Negative padding (a crop) is a slice; positive is zero padding.
    xp = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))
    rows = dy.reshape(n * ho * wo, cout)
    taps = []
    for i in range(kh):
        for j in range(kw):
            patch = lax.slice(
                xp,
                (0, i, j, 0),
                (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, cin),
                (1, sh, sw, 1),
            )
            taps.append(
                lax.dot_general(
                    patch.reshape(n * ho * wo, cin),
                    rows,
                    (((0,), (0,)), ((), ())),
                    precision=precision,
                    preferred_element_type=jnp.float32,
                )
            )
    return jnp.stack(taps).reshape(kh, kw, cin, cout).astype(dy.dtype)


def _input_grad(dy, w, x_shape, strides, pads, precision):
    """XLA's own input gradient (a convolution of dY with the flipped kernel: fast already)."""
    _, vjp = jax.vjp(
        lambda x: _forward(x, w, strides, pads, precision), jnp.zeros(x_shape, dy.dtype)
    )
    return vjp(dy)[0]
