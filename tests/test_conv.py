"""ganda_jax.nets.cpu_conv: its CPU rewrites (GEMM form, sub-pixel transposed convolutions, padding
added and cropped, the opt-in per-tap weight gradient) compute what lax computes, values and
gradients; other cases fall through to lax."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import equal_trees, load_config
from jax import lax

from ganda_jax import engine
from ganda_jax.nets import cpu_conv, layers
from ganda_jax.train import loop, parallel

DN = ("NHWC", "HWIO", "NHWC")


def _sin_loss(fn):
    return lambda x, w: jnp.sum(jnp.sin(fn(x, w)))


def _assert_same(fn, ref, x, w, tol=1e-5):
    """Values and both gradients of ``fn`` (jitted) equal ``ref``'s (lax, unjitted) to float32
    rounding: sums in another order differ by ~1e-7 of their terms' scale."""
    close = lambda a, b, msg: np.testing.assert_allclose(  # noqa: E731
        a, b, rtol=tol, atol=tol * float(jnp.max(jnp.abs(b))), err_msg=msg
    )
    y, y_ref = jax.jit(fn)(x, w), ref(x, w)
    assert y.shape == y_ref.shape
    close(y, y_ref, "value")
    got = jax.jit(jax.grad(_sin_loss(fn), (0, 1)))(x, w)
    want = jax.grad(_sin_loss(ref), (0, 1))(x, w)
    for name, g, r in zip(("input", "weight"), got, want):
        close(g, r, name)


def _hlo(fn, *args) -> str:
    return jax.jit(jax.grad(_sin_loss(fn), (0, 1))).lower(*args).as_text()


def _conv_windows(fn, *args, field):
    """The ``field`` ('pad' or 'lhs_dilate') numbers of every convolution ``fn`` lowers to."""
    text = jax.jit(fn).lower(*args).as_text()
    return [
        [int(v) for v in re.findall(r"-?\d+", m)]
        for m in re.findall(field + r" = (\[[\[\]\d, -]*\])", text)
    ]


def _random(shape_x, shape_w, seed):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(shape_x), jnp.float32)
    return x, jnp.asarray(rng.standard_normal(shape_w), jnp.float32)


@pytest.mark.parametrize(
    "size,kernel,stride,padding",
    [
        (4, 4, 1, ((1, 1), (1, 1))),  # PatchGAN's C512 on a 4x4 map: output 3x3 < kernel
        (3, 4, 1, ((1, 1), (1, 1))),  # its last conv: 2x2 output
        (5, 4, 2, ((1, 1), (1, 1))),  # stride 2, 2x2 output
        (5, 5, 1, "VALID"),  # GTA's F on a 5x5 map: 1x1 output
    ],
)
def test_small_output_conv_is_a_gemm(size, kernel, stride, padding):
    x, w = _random((2, size, size + 1, 3), (kernel, kernel, 3, 5), size + kernel)
    fn = lambda x, w: cpu_conv.conv_general_dilated(  # noqa: E731
        x, w, (stride, stride), padding, dimension_numbers=DN
    )
    ref = lambda x, w: lax.conv_general_dilated(  # noqa: E731
        x, w, (stride, stride), padding, dimension_numbers=DN
    )
    _assert_same(fn, ref, x, w)
    assert "convolution" not in _hlo(fn, x, w)  # the GEMM form ran, not XLA's convolution


@pytest.mark.parametrize(
    "kernel,stride,padding",
    [
        (3, 1, "VALID"),  # CycleGAN's reflect-padded convs
        (7, 1, ((0, 0), (0, 0))),
        (3, 2, "VALID"),
        (5, 3, ((0, 2), (1, 0))),  # zero on some sides only
    ],
)
def test_unpadded_conv_gets_padding_and_a_crop(kernel, stride, padding):
    x, w = _random((2, 20, 21, 3), (kernel, kernel, 3, 4), kernel * 10 + stride)
    fn = lambda x, w: cpu_conv.conv_general_dilated(  # noqa: E731
        x, w, (stride, stride), padding, dimension_numbers=DN
    )
    ref = lambda x, w: lax.conv_general_dilated(  # noqa: E731
        x, w, (stride, stride), padding, dimension_numbers=DN
    )
    _assert_same(fn, ref, x, w)
    pads = _conv_windows(fn, x, w, field="pad")
    assert pads and all(p > 0 for pad in pads for p in pad)  # every side padded now
    # Only the forward is padded: the gradient program's other convolutions are lax's
    # gradients of the unpadded convolution (whose weight gradient does not convolve with a
    # zero-padded dY, slow with XLA:CPU's Eigen kernels).
    grads = lambda fn: jax.grad(_sin_loss(fn), (0, 1))  # noqa: E731
    ref_backward = _conv_windows(grads(ref), x, w, field="pad")
    ref_backward.remove(_conv_windows(ref, x, w, field="pad")[0])
    assert sorted(_conv_windows(grads(fn), x, w, field="pad")) == sorted(pads + ref_backward)


@pytest.mark.parametrize(
    "size,kernel,stride,padding",
    [
        (16, 4, 2, ((1, 1), (1, 1))),  # PatchGAN / DCGAN downsampling
        (15, 4, 2, ((1, 1), (1, 1))),  # an input row the output never reads
        (17, 3, 2, "SAME"),  # CycleGAN's
        (19, 5, 3, ((2, 1), (0, 2))),  # (an output >= the kernel: not the GEMM form)
    ],
)
@pytest.mark.parametrize("batch", [2, 8])
def test_strided_conv_gradients_are_subpixel_and_per_phase(size, kernel, stride, padding, batch):
    # 16 input channels: the rewrite is for >= 16 (3-channel input gradients were slower).
    x, w = _random((batch, size, size + 2, 16), (kernel, kernel, 16, 5), size + 3 * kernel)
    fn = lambda x, w: cpu_conv.conv_general_dilated(  # noqa: E731
        x, w, (stride, stride), padding, dimension_numbers=DN
    )
    ref = lambda x, w: lax.conv_general_dilated(  # noqa: E731
        x, w, (stride, stride), padding, dimension_numbers=DN
    )
    _assert_same(fn, ref, x, w)
    grad = jax.grad(_sin_loss(fn), (0, 1))
    assert all(d == 1 for dil in _conv_windows(grad, x, w, field="lhs_dilate") for d in dil)
    # The weight gradient: stride-1 ones per input phase at batch <= 4, else XLA's
    # (a kernel-dilated convolution).
    windows = _conv_windows(grad, x, w, field="rhs_dilate")
    kernel_dilated = [d for d in windows if max(d) > 1]
    assert windows and all(len(d) == 2 for d in windows)
    assert bool(kernel_dilated) == (batch > cpu_conv._PHASE_WEIGHT_GRAD_MAX_BATCH)


@pytest.mark.parametrize(
    "size,kernel,stride,padding",
    [
        (1, 2, 1, ((1, 1), (1, 1))),  # GTA's first layer (a stride-1 transposed conv)
        (2, 4, 2, ((2, 2), (2, 2))),  # PyTorch ConvTranspose2d(4, 2, 1): DCGAN, U-Net
        (5, 4, 2, ((2, 2), (2, 2))),
        (7, 3, 2, "SAME"),  # CycleGAN's upsampling
        (6, 4, 2, "SAME"),  # CC-GAN's
        (5, 3, 2, "VALID"),
        (4, 4, 2, "VALID"),
        (5, 5, 3, "SAME"),
        (6, 3, 2, ((1, 2), (2, 1))),
        (3, 1, 2, "SAME"),  # phases that no kernel tap reaches: zeros
    ],
)
def test_transposed_conv_equals_lax(size, kernel, stride, padding):
    x, w = _random((2, size, size + 1, 3), (kernel, kernel, 3, 5), size * 7 + kernel)
    fn = lambda x, w: cpu_conv.conv_transpose(x, w, (stride, stride), padding)  # noqa: E731
    ref = lambda x, w: lax.conv_transpose(  # noqa: E731
        x, w, (stride, stride), padding, dimension_numbers=DN
    )
    _assert_same(fn, ref, x, w)
    if stride > 1:  # sub-pixel convolutions: no input dilation left in the program
        assert all(d == 1 for dil in _conv_windows(fn, x, w, field="lhs_dilate") for d in dil)


def test_rewrites_off_is_lax(monkeypatch):
    monkeypatch.setattr(cpu_conv, "CPU_REWRITES", False)
    x, w = _random((2, 5, 5, 3), (4, 4, 3, 5), 0)
    fn = lambda x, w: cpu_conv.conv_transpose(x, w, (2, 2), "SAME")  # noqa: E731
    assert _conv_windows(fn, x, w, field="lhs_dilate") == [[2, 2]]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=(4, 4), strides=(2, 2), padding=((2, 2), (2, 2))),
        dict(kernel_size=(3, 3), strides=(2, 2), padding="SAME", use_bias=False),
    ],
)
def test_conv_transpose_module_equals_flax(kwargs):
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 5, 5, 3)), jnp.float32)
    ours, theirs = layers.ConvTranspose(7, **kwargs), nn.ConvTranspose(7, **kwargs)
    params = ours.init(jax.random.PRNGKey(0), x)
    # Same parameter names and shapes, so checkpoints of either load into the other.
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(
        jnp.shape, theirs.init(jax.random.PRNGKey(0), x)
    )
    if "bias" in params["params"]:
        params = {"params": {**params["params"], "bias": jnp.arange(7.0)}}
    np.testing.assert_allclose(ours.apply(params, x), theirs.apply(params, x), rtol=1e-5, atol=1e-5)


def test_max_pool_equals_flax():
    # Distinct values (no ties): the same maxima and the same gradient as nn.max_pool.
    x = jnp.asarray(np.random.default_rng(4).permutation(2 * 9 * 10 * 3), jnp.float32)
    x = x.reshape(2, 9, 10, 3) / 100.0
    for window in (2, 3):
        ref = lambda x: nn.max_pool(x, (window, window), strides=(window, window))  # noqa: E731
        mine = lambda x: layers.max_pool(x, window)  # noqa: E731
        np.testing.assert_array_equal(mine(x), ref(x))
        np.testing.assert_array_equal(
            jax.grad(lambda x: jnp.sum(jnp.sin(mine(x))))(x),
            jax.grad(lambda x: jnp.sum(jnp.sin(ref(x))))(x),
        )


@pytest.fixture
def cpu_gradients(monkeypatch):
    monkeypatch.setattr(cpu_conv, "CPU_GRADIENTS", True)  # opt-in (GANDA_CPU_CONV_GRADS=1)
    monkeypatch.setattr(cpu_conv, "CPU_REWRITES", False)  # the per-tap rule alone


@pytest.mark.usefixtures("cpu_gradients")
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
        lambda x, w: cpu_conv.conv_general_dilated(
            x, w, (stride, stride), padding, dimension_numbers=DN
        )
    )(x, w)
    np.testing.assert_array_equal(y, ref_y)
    ref = jax.grad(loss(lax.conv_general_dilated), (0, 1))(x, w)
    got = jax.jit(jax.grad(loss(cpu_conv.conv_general_dilated), (0, 1)))(x, w)
    for name, r, g in zip(("input", "weight"), ref, got):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5, err_msg=name)
    # The custom rule is what ran (not XLA's): its weight gradient is a sum of per-tap dots.
    hlo = jax.jit(jax.grad(loss(cpu_conv.conv_general_dilated), 1)).lower(x, w).as_text()
    assert hlo.count("dot_general") >= kernel * kernel


@pytest.mark.usefixtures("cpu_gradients")
def test_bfloat16_weight_gradient_is_accumulated_in_float32():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 16, 16, 8)), jnp.bfloat16)
    w = jnp.asarray(0.1 * rng.standard_normal((3, 3, 8, 8)), jnp.bfloat16)
    f = lambda fn: (
        lambda w: jnp.sum(fn(x, w, (1, 1), "SAME", dimension_numbers=DN).astype(jnp.float32) ** 2)
    )  # noqa: E731
    got = jax.grad(f(cpu_conv.conv_general_dilated))(w)
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


@pytest.mark.usefixtures("cpu_gradients")
def test_dilated_grouped_and_other_layouts_fall_through_to_xla():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((1, 8, 8, 4)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 2, 4)), jnp.float32)
    y = cpu_conv.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=DN, feature_group_count=2
    )
    ref = lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=DN, feature_group_count=2
    )
    np.testing.assert_array_equal(y, ref)
    hlo = (
        jax.jit(
            jax.grad(
                lambda w: jnp.sum(
                    cpu_conv.conv_general_dilated(
                        x, w, (1, 1), "SAME", dimension_numbers=DN, feature_group_count=2
                    )
                )
            )
        )
        .lower(w)
        .as_text()
    )
    assert "dot_general" not in hlo  # XLA's own transpose (a convolution), not the custom rule


def _convolutions_in_ynn_fusions(compiled_text: str) -> tuple[int, int]:
    """(convolutions inside YNNPACK fusions, all convolutions) of a compiled CPU program."""
    comps = dict(re.findall(r"\n%(\S+) \([^\n]*\{\n(.*?)\n\}", compiled_text, re.S))
    ynn = re.findall(r"calls=%([^,\s]+)[^\n]*__ynn_fusion", compiled_text)
    return sum(comps[c].count(" convolution(") for c in ynn), compiled_text.count(" convolution(")


def test_training_programs_compile_with_xla_convolutions_on_cpu(monkeypatch):
    # 32 channels: large enough that XLA's default gives all three convolutions of a
    # training step (forward, both gradients) to YNNPACK.
    x, w = _random((2, 16, 16, 32), (3, 3, 32, 32), 9)
    plain = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN)  # noqa: E731
    grads = jax.grad(_sin_loss(plain), (0, 1))
    default = jax.jit(grads).lower(x, w).compile()
    ours = jax.jit(grads, compiler_options=cpu_conv.compiler_options()).lower(x, w).compile()
    assert _convolutions_in_ynn_fusions(default.as_text()) == (3, 3)
    assert _convolutions_in_ynn_fusions(ours.as_text()) == (0, 3)
    for got, want in zip(ours(x, w), default(x, w)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))
    # Opt-outs: the switch, and XLA_FLAGS that choose YNN fusions themselves.
    monkeypatch.setattr(cpu_conv, "CPU_YNN_CONVS", True)
    assert cpu_conv.compiler_options() == {}
    monkeypatch.setattr(cpu_conv, "CPU_YNN_CONVS", False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=-reduce")
    assert cpu_conv.compiler_options() == {}


def test_trainer_compiles_its_step_with_these_options(monkeypatch):
    """Run's train step is compiled with cpu_conv.compiler_options(): an option XLA rejects
    makes its first call fail, so the options reach XLA."""
    cfg = load_config("cyclegan", "runlocal")
    cfg.batch_size = 2
    monkeypatch.setattr(
        cpu_conv, "compiler_options", lambda: {"xla_cpu_experimental_ynn_fusion_type": "NOT_A_TYPE"}
    )
    run = loop.Run(cfg, mesh=parallel.make_mesh(1))
    state = run.init_state()
    with pytest.raises(Exception, match="NOT_A_TYPE"):
        run.step_fn(state, run.global_batch(0))


def test_init_compiles_with_its_options_and_equals_the_default_levels_init(monkeypatch):
    """Run's state initialisation is compiled with cpu_conv.init_compiler_options() (LLVM
    level 1 on CPU, for compile time) and gives bit-identical values to the same program at
    XLA's default level; an option XLA rejects makes it fail, so the options reach XLA."""
    cfg = load_config("ccgan", "runlocal")
    cfg.batch_size = 2
    run = loop.Run(cfg, mesh=parallel.make_mesh(1))
    rng, batch = jax.random.PRNGKey(cfg.seed), run.global_batch(0)
    default = jax.jit(lambda r, b: engine.init_state(run.method, run.tx, r, b))(rng, batch)
    assert equal_trees(run.init_state(), default)
    monkeypatch.setattr(
        cpu_conv, "init_compiler_options", lambda: {"xla_backend_optimization_level": "x"}
    )
    with pytest.raises(Exception, match="xla_backend_optimization_level"):
        loop.Run(cfg, mesh=parallel.make_mesh(1)).init_state()


def test_conv_layers_benchmark_finds_every_distinct_layer(monkeypatch):
    """benchmarks/conv_layers.py finds a network's convolutions as it calls them: CycleGAN's
    generator (reflect-padded 7x7 in and out, two strided convs, one residual conv shape,
    two transposed convs) and PatchGAN's five, each once, with the padding XLA sees."""
    import os

    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import conv_layers

    cfg = load_config("cyclegan", "runlocal")
    size, ngf = cfg.image_size, cfg.model.ngf
    found = conv_layers.find_layers(cfg)
    gen = [f for f in found if f["name"].startswith("ResnetGenerator")]
    disc = [f for f in found if f["name"].startswith("PatchDiscriminator")]
    assert len(found) == len(gen) + len(disc) and len(disc) == cfg.model.n_layers_D + 2
    first, last = gen[0], gen[-1]
    assert first["shape"] == (size + 6, size + 6, 3) and first["kernel"] == (7, 7)
    assert first["padding"] == ((0, 0), (0, 0)) and first["features"] == ngf
    assert last["shape"] == (size + 6, size + 6, ngf) and last["features"] == 3
    assert [f["kind"] for f in gen].count("transpose") == 2
    residual = [f for f in gen if "ResnetBlock" in f["name"]]
    assert len(residual) == 1 and residual[0]["shape"][-1] == 4 * ngf  # all blocks alike
    # a transposed layer timed both ways: the programs run and agree on the output size
    up = next(f for f in gen if f["kind"] == "transpose")
    out_lax, t_lax = conv_layers.jax_time(up, 2, "lax", 1, {})
    out_ganda, t_ganda = conv_layers.jax_time(up, 2, "ganda", 1, {})
    assert out_lax == out_ganda == (2 * up["shape"][0], 2 * up["shape"][1])
    assert min(t_lax.values()) > 0 and min(t_ganda.values()) > 0
