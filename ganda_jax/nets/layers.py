"""Network building blocks shared by the methods (Flax linen, NHWC).

Every module takes ``dtype`` (the compute dtype, e.g. bfloat16) and keeps its
parameters in float32. Normalisation statistics are always computed in float32
so bfloat16 compute does not lose precision where it matters.

Initialisation follows the DCGAN/CycleGAN convention used by all six papers'
reference code: conv and dense weights ~ N(0, 0.02), biases 0, norm scales
~ N(1, 0.02).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ganda_jax.nets.cpu_conv import conv_general_dilated, conv_transpose

Dtype = Any

conv_init = nn.initializers.normal(stddev=0.02)

# ``nn.Conv(..., **FAST)``: the convolution with fast gradients on CPU (ganda_jax.nets.cpu_conv).
FAST = {"conv_general_dilated": conv_general_dilated}


def scale_init(key, shape, dtype=jnp.float32):
    """N(1, 0.02), the reference init for affine norm scales."""
    return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


def reflect_pad(x: jax.Array, pad: int) -> jax.Array:
    """Reflection padding of the two spatial axes of an NHWC tensor."""
    return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")


class InstanceNorm(nn.Module):
    """Instance normalisation over H, W per sample and channel.

    ``affine=False`` matches PyTorch's ``InstanceNorm2d`` default used by
    CycleGAN (no learned scale or shift, no running statistics).
    """

    affine: bool = False
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=(1, 2), keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=(1, 2), keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        if self.affine:
            c = x.shape[-1]
            y = y * self.param("scale", scale_init, (c,)) + self.param(
                "bias", nn.initializers.zeros, (c,)
            )
        return y.astype(self.dtype)


class BatchNorm(nn.Module):
    """BatchNorm with the standard eps=1e-5 (not the 0.8 of some references).

    Under ``jax.jit`` on a batch sharded over the mesh the statistics are global
    (XLA inserts the cross-device reduction). Statistics and normalisation in float32.
    """

    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        # The inner module keeps flax's parameter and statistics names and nesting.
        y = _BatchNormCore(self.momentum, self.epsilon, name="BatchNorm_0")(
            x.astype(jnp.float32), train=train
        )
        return y.astype(self.dtype)


class _BatchNormCore(nn.Module):
    """``flax.linen.BatchNorm``'s arithmetic (fast variance ``E[x^2] - E[x]^2`` clipped at 0,
    ``y = (x - mean) * rsqrt(var + eps) * scale + bias``, running averages with
    ``momentum``), written out: with flax's module, XLA could not merge two identical
    forward passes of a network in one program (one without and one under autodiff), which
    PixelDA's D and G/T phases are."""

    momentum: float
    epsilon: float

    @nn.compact
    def __call__(self, x, *, train: bool):
        c, axes = x.shape[-1], tuple(range(x.ndim - 1))
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        if train:
            mean = jnp.mean(x, axes)
            var = jnp.maximum(0.0, jnp.mean(jnp.square(x), axes) - jnp.square(mean))
            if not self.is_initializing():
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        else:
            mean, var = ra_mean.value, ra_var.value
        mul = jax.lax.rsqrt(var + self.epsilon) * self.param("scale", scale_init, (c,))
        return (x - mean) * mul + self.param("bias", nn.initializers.zeros, (c,))


def max_pool(x: jax.Array, window: int) -> jax.Array:
    """``nn.max_pool(x, (window, window), strides=(window, window))`` (non-overlapping,
    'VALID') as a reshape and a max: the same values, and a gradient that is a compare and a
    select (XLA:CPU's reduce-window gradient packs values with iota indices; in GTA's step
    it took 1.5 of 3.3 s). At an exact tie the gradient is shared equally between the tied
    inputs instead of going to one of them."""
    n, h, w, c = x.shape
    h, w = h // window, w // window
    x = x[:, : h * window, : w * window]
    return x.reshape(n, h, window, w, window, c).max(axis=(2, 4))


def make_norm(kind: str, dtype: Dtype):
    """Factory for a norm layer applied as ``norm(x)`` ('instance' | 'none')."""
    if kind == "instance":
        return InstanceNorm(dtype=dtype)
    if kind == "none":
        return lambda x: x
    raise ValueError(f"unknown norm {kind!r}; expected 'instance' or 'none'")


class Conv(nn.Module):
    """Conv with N(0, 0.02) init and optional reflect padding."""

    features: int
    kernel: int
    stride: int = 1
    padding: int | str = 0
    reflect: bool = False
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        pad = self.padding
        if self.reflect and isinstance(pad, int) and pad > 0:
            x = reflect_pad(x, pad)
            pad = 0
        if isinstance(pad, int):
            pad = ((pad, pad), (pad, pad))
        return nn.Conv(
            self.features,
            (self.kernel, self.kernel),
            strides=(self.stride, self.stride),
            padding=pad,
            use_bias=self.use_bias,
            kernel_init=conv_init,
            dtype=self.dtype,
            **FAST,
        )(x.astype(self.dtype))


class ConvTranspose(nn.Module):
    """``flax.linen.ConvTranspose`` (same parameters, same values) through
    :func:`ganda_jax.nets.cpu_conv.conv_transpose`, which stays on XLA:CPU's fast paths.

    ``padding`` is 'SAME', 'VALID' or per-axis pairs for the dilated input, as in
    ``lax.conv_transpose``: PyTorch's ``ConvTranspose2d(k, s, p)`` is ``k - 1 - p`` per side.
    """

    features: int
    kernel_size: Sequence[int]
    strides: Sequence[int] = (1, 1)
    padding: str | Sequence[tuple[int, int]] = "SAME"
    use_bias: bool = True
    kernel_init: Any = conv_init
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param(
            "kernel", self.kernel_init, (*self.kernel_size, x.shape[-1], self.features)
        )
        y = conv_transpose(
            x.astype(self.dtype), kernel.astype(self.dtype), self.strides, self.padding
        )
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
        return y


class ResnetBlock(nn.Module):
    """CycleGAN residual block: [pad-conv3-norm-relu-pad-conv3-norm] + x."""

    features: int
    norm: str = "instance"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        y = Conv(self.features, 3, padding=1, reflect=True, dtype=self.dtype)(x)
        y = nn.relu(make_norm(self.norm, self.dtype)(y))
        y = Conv(self.features, 3, padding=1, reflect=True, dtype=self.dtype)(y)
        y = make_norm(self.norm, self.dtype)(y)
        return x + y


class ResnetGenerator(nn.Module):
    """The CycleGAN ResNet generator (Johnson et al. 2016 as used by Zhu et al.).

    c7s1-ngf, d(2ngf), d(4ngf), n_blocks x R(4ngf), u(2ngf), u(ngf), c7s1-3, tanh.
    Reflect padding for the 7x7 and residual convs; stride-2 convs down,
    stride-2 transposed convs up (output 2x input, like PyTorch's
    ``ConvTranspose2d(k=3, s=2, p=1, output_padding=1)``).
    """

    ngf: int = 64
    n_blocks: int = 9
    out_channels: int = 3
    norm: str = "instance"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        norm = lambda: make_norm(self.norm, self.dtype)  # noqa: E731
        h = Conv(self.ngf, 7, padding=3, reflect=True, dtype=self.dtype)(x)
        h = nn.relu(norm()(h))
        for mult in (2, 4):
            h = Conv(self.ngf * mult, 3, stride=2, padding=1, dtype=self.dtype)(h)
            h = nn.relu(norm()(h))
        for _ in range(self.n_blocks):
            h = ResnetBlock(self.ngf * 4, norm=self.norm, dtype=self.dtype)(h)
        for mult in (2, 1):
            h = ConvTranspose(
                self.ngf * mult,
                (3, 3),
                strides=(2, 2),
                padding="SAME",
                kernel_init=conv_init,
                dtype=self.dtype,
            )(h)
            h = nn.relu(norm()(h))
        h = Conv(self.out_channels, 7, padding=3, reflect=True, dtype=self.dtype)(h)
        return jnp.tanh(h)


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (Isola et al. 2017); n_layers=3 gives 70x70 patches.

    C64 (no norm) - C128 - C256 - C512 (stride 1) - conv to 1 logit per patch,
    4x4 kernels, padding 1, LeakyReLU 0.2. Returns raw scores [B, h, w, 1] in
    float32 (no sigmoid: the loss decides).
    """

    ndf: int = 64
    n_layers: int = 3
    norm: str = "instance"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = Conv(self.ndf, 4, stride=2, padding=1, dtype=self.dtype)(x)
        h = nn.leaky_relu(h, 0.2)
        mult = 1
        for n in range(1, self.n_layers + 1):
            mult = min(2**n, 8)
            stride = 2 if n < self.n_layers else 1
            h = Conv(self.ndf * mult, 4, stride=stride, padding=1, dtype=self.dtype)(h)
            h = nn.leaky_relu(make_norm(self.norm, self.dtype)(h), 0.2)
        h = Conv(1, 4, padding=1, dtype=self.dtype)(h)
        return h.astype(jnp.float32)


def count_params(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


def receptive_field(kernels_strides: Sequence[tuple[int, int]]) -> int:
    """Receptive field of a stack of (kernel, stride) convs (for docs/tests)."""
    rf, jump = 1, 1
    for k, s in kernels_strides:
        rf += (k - 1) * jump
        jump *= s
    return rf
