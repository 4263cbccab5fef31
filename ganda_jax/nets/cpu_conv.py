"""2-D convolutions (regular and transposed) that stay on XLA:CPU's fast paths.

On GPU and TPU these are ``lax.conv_general_dilated`` / ``lax.conv_transpose``
unchanged. On the CPU backend XLA hands most NHWC convolutions to fast kernels
(YNNPACK fusions in jax 0.10), but a whole-step profile of every method
(``benchmarks/profile_step.py``) found shapes that fall to a generic loop at a few
GFLOP/s and took up to nine tenths of a training step:

* a convolution whose output is smaller than its kernel (PatchGAN's 4x4 convs
  on 4x4 or 3x3 maps at 32x32 input): XLA computes its input gradient with the
  operands swapped, off the fast path (PixelDA: three such gradients took 2.7 s
  of a 6.0 s step). Here it is a GEMM over the patch matrix (im2col), whose
  gradients are GEMMs and pads;
* a transposed convolution (an input-dilated convolution, every upsampling
  generator): here it is the ``s*s`` sub-pixel stride-1 convolutions of the
  input with the kernel's taps of each output phase, interleaved (no
  multiplications by the dilation's zeros, ``s*s`` times fewer FLOPs), each
  through these rules;
* a strided convolution's input gradient, which autodiff makes an input-dilated
  convolution: the same sub-pixel path, in a custom VJP (inputs of >= 16 channels);
  at batches up to 4 its weight gradient too (a kernel-dilated convolution, 2x slow
  there) is stride-1 weight gradients, one per input phase;
* a convolution with an unpadded side (YNNPACK's forward without padding was slow):
  padded there by ``stride`` and cropped, in the forward only (:func:`_pad_and_crop`).

These rewrites compute the same sums as XLA (tests check values and gradients
against ``lax``). Optionally (``GANDA_CPU_CONV_GRADS=1``), the weight gradient of
other convolutions is one GEMM per kernel tap: that was 4x faster than XLA's on
the CPU of earlier sessions and is slower than XLA's YNNPACK path on an AVX-512
Zen 4, so it stays opt-in (``benchmarks/RESULTS.md``).

Separately, :func:`compiler_options` (passed to ``jax.jit`` by the trainer and the
benchmarks) has XLA:CPU run convolutions on its own Eigen kernels rather than YNNPACK's,
whose gradient convolutions were about half as fast on this project's CPU.

Layouts other than NHWC/HWIO, dilated kernels and grouped convolutions fall
through to ``lax``. :func:`conv_general_dilated` has ``lax.conv_general_dilated``'s
signature, so it plugs into ``flax.linen.Conv(..., conv_general_dilated=...)``;
:func:`conv_transpose` is ``lax.conv_transpose(..., transpose_kernel=False)``,
what ``flax.linen.ConvTranspose`` computes (``layers.ConvTranspose`` uses it).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax import lax

# Opt-in (``GANDA_CPU_CONV_GRADS=1``, or True here before tracing): the per-tap weight gradient.
CPU_GRADIENTS = os.environ.get("GANDA_CPU_CONV_GRADS", "0") == "1"
# The two CPU rewrites above (on by default; False here before tracing gives XLA's own
# convolutions, which is how benchmarks/throughput.py --xla-convs measures their effect).
CPU_REWRITES = os.environ.get("GANDA_CPU_CONV_REWRITES", "1") == "1"

# XLA:CPU gives every standalone convolution to YNNPACK by default (jax 0.10); on this
# project's 2-core Zen 4 its gradient convolutions ran at about half the rate of XLA's own
# (Eigen) convolutions: one 3x3 64->64 conv, forward and both gradients, 175 -> 104 ms
# (benchmarks/conv_backward.py); whole steps 1.1-1.4x faster at six of the eight reference
# settings, DiscoGAN even, CycleGAN at 256 px batch 1 0.83x (Eigen is slower on batch-1
# maps; benchmarks/RESULTS.md). XLA takes the choice per program, so training programs
# compile with YNNPACK for dots and reductions only (:func:`compiler_options`);
# ``GANDA_CPU_YNN_CONVS=1`` (or True here before compiling) keeps XLA's default.
CPU_YNN_CONVS = os.environ.get("GANDA_CPU_YNN_CONVS", "0") == "1"
_YNN_OPTION = "xla_cpu_experimental_ynn_fusion_type"
_YNN_WITHOUT_CONVS = ",".join(
    "LIBRARY_FUSION_TYPE_" + t for t in ("DOT", "INDIVIDUAL_DOT", "REDUCE")
)  # XLA's default list (jax 0.10) less INDIVIDUAL_CONVOLUTION

_NHWC = lax.ConvDimensionNumbers(
    lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2)
)


def compiler_options() -> dict[str, str]:
    """``jax.jit(..., compiler_options=...)`` for a training program: on CPU, XLA's
    convolutions instead of YNNPACK's (see ``CPU_YNN_CONVS``); elsewhere nothing. Nothing
    either when the user's ``XLA_FLAGS`` choose YNN fusions themselves, or when this jaxlib
    does not know the option."""
    if (
        jax.default_backend() != "cpu"
        or CPU_YNN_CONVS
        or _YNN_OPTION in os.environ.get("XLA_FLAGS", "")
        or not _knows_ynn_option()
    ):
        return {}
    return {_YNN_OPTION: _YNN_WITHOUT_CONVS}


def init_compiler_options() -> dict[str, str]:
    """``jax.jit(..., compiler_options=...)`` for a one-off program such as the state's
    initialisation: on CPU, LLVM at optimisation level 1. An initialiser is hundreds of small
    threefry fusions that LLVM's default level spends most of its time on (CycleGAN's tiny
    runlocal init: 29 s -> 7 s to compile), while the program runs once. Its values are
    bit-identical to the default level's (checked on jax 0.10 for the
    runlocal init of every method, CyCADA in its pixel stage)."""
    return {"xla_backend_optimization_level": "1"} if jax.default_backend() == "cpu" else {}


@functools.cache
def _knows_ynn_option() -> bool:
    try:
        options = {_YNN_OPTION: _YNN_WITHOUT_CONVS}
        jax.jit(lambda x: x + 1, compiler_options=options).lower(jnp.zeros(())).compile()
    except Exception:  # another jaxlib: its own defaults, no error for the user
        return False
    return True


def _is_nhwc(dimension_numbers, ndim) -> bool:
    if ndim != 4 or dimension_numbers is None:
        return False
    if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
        return dimension_numbers == _NHWC
    return tuple(dimension_numbers) == ("NHWC", "HWIO", "NHWC")


def _ones(x) -> bool:
    return all(int(d) == 1 for d in (x or (1, 1)))


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
    """``lax.conv_general_dilated``, rewritten on CPU where XLA would leave its fast paths."""
    plain = (
        jax.default_backend() == "cpu"
        and (CPU_REWRITES or CPU_GRADIENTS)
        and _is_nhwc(dimension_numbers, jnp.ndim(lhs))
        and feature_group_count == 1
        and batch_group_count == 1
        and preferred_element_type is None
        and _ones(rhs_dilation)
        and (_ones(lhs_dilation) or not isinstance(padding, str))  # lax pads dilated shapes
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
    dilation = tuple(int(d) for d in (lhs_dilation or (1, 1)))
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    if not _ones(dilation):
        if not CPU_REWRITES or not _ones(strides):
            return lax.conv_general_dilated(
                lhs, rhs, strides, pads, lhs_dilation=dilation, dimension_numbers=_NHWC,
                precision=precision,
            )  # fmt: skip
        return _subpixel(lhs, rhs, dilation, pads, precision)
    return _conv(lhs, rhs, strides, pads, precision)


def conv_transpose(x, w, strides, padding, precision=None):
    """``lax.conv_transpose(x, w, strides, padding, transpose_kernel=False)`` for NHWC/HWIO
    (what ``flax.linen.ConvTranspose`` computes): the input dilated by ``strides``, padded,
    correlated with ``w``; on CPU as sub-pixel convolutions (see the module docstring)."""
    strides = tuple(int(s) for s in strides)
    if isinstance(padding, str):
        padding = [_transpose_padding(k, s, padding) for k, s in zip(w.shape[:2], strides)]
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    return conv_general_dilated(
        x, w, (1, 1), pads, lhs_dilation=strides, dimension_numbers=_NHWC, precision=precision
    )


def _transpose_padding(k: int, s: int, padding: str) -> tuple[int, int]:
    """``lax.conv_transpose``'s padding of the dilated input for 'SAME' / 'VALID'."""
    if padding == "SAME":
        total = k + s - 2
        lo = k - 1 if s > k - 1 else -(-total // 2)
    elif padding == "VALID":
        total = k + s - 2 + max(k - s, 0)
        lo = k - 1
    else:
        raise ValueError(f"padding must be 'SAME', 'VALID' or pairs, got {padding!r}")
    return lo, total - lo


def _out_size(size: int, k: int, s: int, lo: int, hi: int) -> int:
    return (size + lo + hi - k) // s + 1


def _conv(x, w, strides, pads, precision, crop=True):
    """A plain strided convolution on CPU: GEMM form when the output is smaller than the
    kernel (XLA's input gradient would leave the fast path), else XLA's (or the opt-in
    per-tap weight gradient). ``crop=False``: no :func:`_pad_and_crop` (its backward)."""
    kh, kw = w.shape[:2]
    ho = _out_size(x.shape[1], kh, strides[0], *pads[0])
    wo = _out_size(x.shape[2], kw, strides[1], *pads[1])
    if CPU_REWRITES and (ho < kh or wo < kw):
        return _conv_gemm(x, w, strides, pads, precision)
    if CPU_REWRITES and crop and min(kh, kw) >= 3 and any(p == 0 for pair in pads for p in pair):
        return _pad_and_crop(x, w, strides, pads, precision)
    if CPU_REWRITES and max(strides) > 1 and x.shape[-1] >= 16:  # (3-channel inputs: slower)
        return _strided(x, w, strides, pads, precision)
    if CPU_GRADIENTS:
        return _conv_tap_grads(x, w, strides, pads, precision)
    return _forward(x, w, strides, pads, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _pad_and_crop(x, w, strides, pads, precision):
    """A side with no zero padding gets ``stride`` rows of it, and the one extra output row
    this makes there is cropped: the same sums. XLA:CPU's YNNPACK convolution without
    padding ran 2-20x slower than the same convolution with it (CycleGAN's reflect-padded
    7x7 64->3 output conv: 273 -> 13 ms forward on 2 cores). Only the forward: the gradients
    are those of the unpadded convolution, which were faster with either kernel set (the
    padded form's weight gradient convolves with a zero-padded dY: CycleGAN's residual conv
    at 256 px, forward and both gradients, 111 -> 74 ms with XLA's Eigen kernels, its 7x7
    64->3 conv 346 -> 122 ms; ``benchmarks/RESULTS.md``). Only for kernels of 3 taps or
    more: for 2x2 and 1xN kernels (the sub-pixel convolutions) the padded form's weight
    gradient left the fast path (93 -> 906 ms)."""
    grown = tuple(
        (lo or s, hi or s) for (lo, hi), s in zip(pads, strides)
    )  # a zero side grows by s
    y = _conv(x, w, strides, grown, precision)
    (t, b), (left, right) = [(int(lo == 0), int(hi == 0)) for lo, hi in pads]
    return y[:, t : y.shape[1] - b, left : y.shape[2] - right]


def _pad_and_crop_fwd(x, w, strides, pads, precision):
    return _pad_and_crop(x, w, strides, pads, precision), (x, w)


def _pad_and_crop_bwd(strides, pads, precision, residuals, dy):
    x, w = residuals
    _, vjp = jax.vjp(lambda x, w: _conv(x, w, strides, pads, precision, crop=False), x, w)
    return vjp(dy)


_pad_and_crop.defvjp(_pad_and_crop_fwd, _pad_and_crop_bwd)


def _forward(x, w, strides, pads, precision):
    return lax.conv_general_dilated(
        x, w, strides, pads, dimension_numbers=_NHWC, precision=precision
    )


def _forward_saving_inputs(x, w, strides, pads, precision):
    """The forward rule of both custom VJPs below: XLA's convolution, residuals ``(x, w)``."""
    return _forward(x, w, strides, pads, precision), (x, w)


def _taps(x, kh, kw, strides, pads, out_hw):
    """The ``kh * kw`` shifted, strided views of the padded input, one per kernel tap."""
    (sh, sw), ((pt, pb), (pl, pr)) = strides, pads
    n, _, _, c = x.shape
    ho, wo = out_hw
    # Negative padding (a crop) is a slice; positive is zero padding.
    xp = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))
    return [
        lax.slice(
            xp, (0, i, j, 0), (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c), (1, sh, sw, 1)
        )
        for i in range(kh)
        for j in range(kw)
    ]


def _conv_gemm(x, w, strides, pads, precision):
    """``y = im2col(x) @ W``: the patch matrix [N, Ho, Wo, kh*kw*Cin] times the kernel
    reshaped [kh*kw*Cin, Cout]; autodiff makes both gradients GEMMs (and pads)."""
    kh, kw, cin, cout = w.shape
    ho = _out_size(x.shape[1], kh, strides[0], *pads[0])
    wo = _out_size(x.shape[2], kw, strides[1], *pads[1])
    patches = jnp.concatenate(_taps(x, kh, kw, strides, pads, (ho, wo)), axis=-1)
    return lax.dot_general(
        patches, w.reshape(kh * kw * cin, cout), (((3,), (0,)), ((), ())), precision=precision
    )


def _subpixel(x, w, dilation, pads, precision):
    """The input-dilated (transposed) convolution as ``s_h * s_w`` stride-1 convolutions.

    With ``xd`` the input dilated by ``s`` and padded by ``lo`` in front,
    ``out[y] = sum_i xd[y + i] w[i]`` and ``xd[lo + s*h] = x[h]``, so output phase
    ``a`` (``y = s*m + a``) only sees the taps ``i = r + s*t`` with ``r = (lo - a) mod s``:
    ``out[s*m + a] = sum_t x[m + d + t] w[r + s*t]``, ``d = (a + r - lo) / s``, a plain
    correlation of ``x`` with every ``s``-th tap. The phases are interleaved back.
    """
    n, h, wd, _ = x.shape
    kh, kw, _, cout = w.shape
    sizes = [
        (size - 1) * s + 1 + lo + hi - k + 1
        for size, s, (lo, hi), k in zip((h, wd), dilation, pads, (kh, kw))
    ]
    if min(sizes) <= 0:
        raise ValueError(f"transposed convolution with an empty output ({sizes})")

    def phase_plan(size, s, lo, k, out):
        """Per output phase a: (first tap r, input offset d, outputs m, padding)."""
        plans = []
        for a in range(s):
            r = (lo - a) % s
            d = (a + r - lo) // s
            m = -(-(out - a) // s)  # outputs y = s*m + a < out
            taps = len(range(r, k, s))
            if m <= 0:
                plans.append(None)
            elif taps == 0:
                plans.append((r, d, m, None))  # no tap reaches this phase: zeros
            else:
                # correlate x (length size) over positions m + d + t, t < taps
                plans.append((r, d, m, (-d, (m - 1 + d + taps - 1) - (size - 1))))
        return plans

    plan_h = phase_plan(h, dilation[0], pads[0][0], kh, sizes[0])
    plan_w = phase_plan(wd, dilation[1], pads[1][0], kw, sizes[1])
    mh = max(p[2] for p in plan_h if p)  # phases have m or m - 1 outputs: pad to mh, crop
    mw = max(p[2] for p in plan_w if p)
    rows = []
    for ph in plan_h:
        cols = []
        for pw in plan_w:
            if ph is None or pw is None or ph[3] is None or pw[3] is None:
                y = jnp.zeros((n, mh, mw, cout), x.dtype)
            else:
                sub = w[ph[0] :: dilation[0], pw[0] :: dilation[1]]
                y = _conv(x, sub, (1, 1), (ph[3], pw[3]), precision)
                y = jnp.pad(y, ((0, 0), (0, mh - ph[2]), (0, mw - pw[2]), (0, 0)))
            cols.append(y)
        rows.append(jnp.stack(cols, axis=3))  # [n, mh, mw, s_w, c]
    out = jnp.stack(rows, axis=2)  # [n, mh, s_h, mw, s_w, c]
    out = out.reshape(n, mh * dilation[0], mw * dilation[1], cout)
    return out[:, : sizes[0], : sizes[1]]


# --- a strided convolution's input gradient, as sub-pixel convolutions ---------------------


# At batches up to this, a strided convolution's weight gradient is the sum over input phases
# (:func:`_phase_weight_grad`): 1.1-2.6x faster than XLA's on CycleGAN's and PatchGAN's
# stride-2 convs at batch 1-4, 0.6-0.9x at 8-100 (benchmarks/RESULTS.md).
_PHASE_WEIGHT_GRAD_MAX_BATCH = 4


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _strided(x, w, strides, pads, precision):
    """XLA's strided convolution; the input gradient (which autodiff makes an input-dilated
    convolution, off XLA:CPU's fast path: 13% of CC-GAN's step) is the same transposed
    convolution through :func:`_subpixel` (1.5-2x faster on PatchGAN's 4x4 stride-2 convs);
    the weight gradient is XLA's (a kernel-dilated convolution) or, at small batches,
    :func:`_phase_weight_grad`."""
    return _forward(x, w, strides, pads, precision)


def _strided_bwd(strides, pads, precision, residuals, dy):
    x, w = residuals
    # lax's transpose rule: dy dilated by the stride, padded k - lo - 1 in front and to the
    # input's size behind, correlated with the flipped kernel (in and out swapped).
    vjp_pads = []
    for size, k, s, (lo, _), out in zip(x.shape[1:3], w.shape[:2], strides, pads, dy.shape[1:3]):
        before = k - lo - 1
        vjp_pads.append((before, size + k - 1 - ((out - 1) * s + 1) - before))
    w_t = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
    dx = _subpixel(dy, w_t, strides, tuple(vjp_pads), precision)
    if x.shape[0] <= _PHASE_WEIGHT_GRAD_MAX_BATCH:
        dw = _phase_weight_grad(x, dy, w.shape, strides, pads, precision)
        return dx.astype(x.dtype), dw.astype(w.dtype)
    _, vjp_w = jax.vjp(lambda w: _forward(x, w, strides, pads, precision), w)
    return dx.astype(x.dtype), vjp_w(dy)[0]


def _phase_weight_grad(x, dy, w_shape, strides, pads, precision):
    """A strided convolution's weight gradient as stride-1 ones, one per input phase.

    With ``x_p`` the padded input, ``y[m] = sum_i x_p[s*m + i] w[i]``; for the taps
    ``i = s*t + a`` of phase ``a`` this is ``sum_t x_a[m + t] w[s*t + a]`` with
    ``x_a[k] = x_p[s*k + a]``: a stride-1 convolution of the phase's rows with every
    ``s``-th tap. So ``dW[a::s]`` is the stride-1 weight gradient of ``x_a`` against ``dY``
    (``x_a`` cut to the rows that output reaches), the same sums as XLA's.
    """
    kh, kw, cin, cout = w_shape
    (sh, sw), ((top, _), (left, _)) = strides, pads
    n, h, wd, _ = x.shape
    ho, wo = dy.shape[1:3]
    # Padded so that every phase has ho - 1 + ceil(k / s) rows (a negative side is a crop).
    hp, wp = sh * (ho - 1 + -(-kh // sh)), sw * (wo - 1 + -(-kw // sw))
    xp = lax.pad(
        x,
        jnp.zeros((), x.dtype),
        ((0, 0, 0), (top, hp - h - top, 0), (left, wp - wd - left, 0), (0, 0, 0)),
    )
    phases = xp.reshape(n, hp // sh, sh, wp // sw, sw, cin)
    dw = jnp.zeros(w_shape, dy.dtype)
    for a in range(min(sh, kh)):
        for b in range(min(sw, kw)):
            kt, ku = len(range(a, kh, sh)), len(range(b, kw, sw))
            x_ab = phases[:, : ho + kt - 1, a, : wo + ku - 1, b]
            _, vjp = jax.vjp(
                lambda v, x_ab=x_ab: _forward(x_ab, v, (1, 1), ((0, 0), (0, 0)), precision),
                jnp.zeros((kt, ku, cin, cout), dy.dtype),
            )
            dw = dw.at[a::sh, b::sw].set(vjp(dy)[0])
    return dw


_strided.defvjp(_forward_saving_inputs, _strided_bwd)


# --- the opt-in per-tap weight gradient --------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_tap_grads(x, w, strides, pads, precision):
    return _forward(x, w, strides, pads, precision)


def _conv_bwd(strides, pads, precision, residuals, dy):
    x, w = residuals
    return _input_grad(dy, w, x.shape, strides, pads, precision), _weight_grad(
        x, dy, w.shape, strides, pads, precision
    )


_conv_tap_grads.defvjp(_forward_saving_inputs, _conv_bwd)


def _weight_grad(x, dy, w_shape, strides, pads, precision):
    """``dW[i, j] = sum_{n,h,w} x_pad[n, h*s + i, w*s + j, :]^T dy[n, h, w, :]``."""
    kh, kw, cin, cout = w_shape
    n, ho, wo, _ = dy.shape
    rows = dy.reshape(n * ho * wo, cout)
    taps = [
        lax.dot_general(
            patch.reshape(n * ho * wo, cin),
            rows,
            (((0,), (0,)), ((), ())),
            precision=precision,
            preferred_element_type=jnp.float32,
        )
        for patch in _taps(x, kh, kw, strides, pads, (ho, wo))
    ]
    return jnp.stack(taps).reshape(kh, kw, cin, cout).astype(dy.dtype)


def _input_grad(dy, w, x_shape, strides, pads, precision):
    """XLA's own input gradient (a convolution of dY with the flipped kernel: fast already)."""
    _, vjp = jax.vjp(
        lambda x: _forward(x, w, strides, pads, precision), jnp.zeros(x_shape, dy.dtype)
    )
    return vjp(dy)[0]
