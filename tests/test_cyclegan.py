"""CycleGAN: networks as in the paper, the image pool, a loss that falls, the CLI end to end."""

import json
import os
import shutil
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, assert_loss_terms, load_config
from PIL import Image

from ganda_jax import engine
from ganda_jax.methods import cyclegan
from ganda_jax.nets.layers import PatchDiscriminator, ResnetGenerator
from ganda_jax.train import loop, parallel


def test_resnet_generator_shapes_and_range():
    g = ResnetGenerator(ngf=4, n_blocks=2)
    x = jnp.linspace(-1, 1, 2 * 32 * 32 * 3).reshape(2, 32, 32, 3)
    params = jax.jit(g.init)(jax.random.PRNGKey(0), x)
    y = jax.jit(g.apply)(params, x)
    assert y.shape == x.shape
    assert float(jnp.max(jnp.abs(y))) <= 1.0
    # 9 blocks at ngf=64 is the paper's 256px generator: 11.378M parameters (official count).
    shapes = jax.eval_shape(
        ResnetGenerator(ngf=64, n_blocks=9).init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))
    )
    assert sum(np.prod(s.shape) for s in jax.tree.leaves(shapes)) == 11_378_179


def test_patchgan_is_70x70_with_30x30_output_at_256():
    d = PatchDiscriminator(ndf=4)
    x = jnp.zeros((1, 256, 256, 3))
    params = d.init(jax.random.PRNGKey(0), x)
    assert d.apply(params, x).shape == (1, 30, 30, 1)
    # Receptive field: the input pixels that influence one output logit (without
    # instance norm, whose statistics couple every pixel of the image).
    d = PatchDiscriminator(ndf=4, norm="none")
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 128, 128, 3))
    params = d.init(jax.random.PRNGKey(0), x)
    grad = jax.grad(lambda x: d.apply(params, x)[0, 6, 6, 0])(x)
    rows = np.nonzero(np.abs(np.asarray(grad[0])).sum(axis=(1, 2)))[0]
    cols = np.nonzero(np.abs(np.asarray(grad[0])).sum(axis=(0, 2)))[0]
    assert rows.max() - rows.min() + 1 == 70 and cols.max() - cols.min() + 1 == 70
    # 2.765M parameters for the paper's ndf=64 discriminator (official count).
    shapes = jax.eval_shape(PatchDiscriminator(ndf=64).init, jax.random.PRNGKey(0), x)
    assert sum(np.prod(s.shape) for s in jax.tree.leaves(shapes)) == 2_764_737


def test_image_pool_matches_reference_semantics():
    query = jax.jit(cyclegan.image_pool_query, static_argnames="pool_size")
    size = 3
    pool = jnp.zeros((size, 1, 1, 1))
    count = jnp.zeros((), jnp.int32)
    images = jnp.arange(1.0, 3.0).reshape(2, 1, 1, 1)  # 1, 2
    out, pool, count = query(
        pool=pool, count=count, images=images, rng=jax.random.PRNGKey(0), pool_size=size
    )
    # Filling: images come back unchanged and are stored.
    np.testing.assert_array_equal(out, images)
    assert int(count) == 2 and list(np.ravel(pool)) == [1, 2, 0]
    history = {1.0, 2.0}
    swaps = 0
    for step in range(30):
        new = jnp.full((2, 1, 1, 1), 100.0 + 2 * step) + jnp.arange(2.0).reshape(2, 1, 1, 1)
        before = set(np.ravel(pool).tolist())
        out, pool, count = query(
            pool=pool, count=count, images=new, rng=jax.random.PRNGKey(step + 1), pool_size=size
        )
        assert int(count) == size
        for o, n in zip(np.ravel(out), np.ravel(new)):
            # Either the incoming image or one that was in the pool (an old one, or the
            # first image of this same batch, inserted a moment earlier).
            assert o == n or o in before or o in np.ravel(new), (o, n)
            swaps += o != n
        history |= set(np.ravel(new).tolist())
        assert set(np.ravel(pool).tolist()) <= history
    assert 10 < swaps < 50  # about half of the 60 queries return a stored image
    # pool_size 0 disables the pool.
    out, _, _ = query(pool=pool, count=count, images=new, rng=jax.random.PRNGKey(0), pool_size=0)
    np.testing.assert_array_equal(out, new)


@pytest.mark.parametrize("lambda_identity", [0.5, 0.0])
def test_losses_equal_the_paper_formula_with_each_network_applied_alone(lambda_identity):
    # The step batches same-network applications (G_AB on a and b, D_A on real and fake);
    # instance norm is per sample, so every term must equal one network call per input.
    cfg = load_config("cyclegan", "runlocal")
    cfg.loss.lambda_identity = lambda_identity
    method = cyclegan.CycleGAN(cfg)
    r = np.random.default_rng(0)
    raw = {d: {"image": r.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)} for d in "AB"}
    batch = method.prepare(raw)
    params, model_state, extra = method.init(jax.random.PRNGKey(0), batch)
    inp = engine.PhaseInputs(
        batch, jax.random.PRNGKey(1), jnp.zeros((), jnp.int32), model_state, extra, {}, {}
    )
    a, b = np.asarray(batch["A"], np.float64), np.asarray(batch["B"], np.float64)
    G = lambda name, x: np.asarray(method.G.apply({"params": params[name]}, x), np.float64)
    D = lambda name, x: np.asarray(method.D.apply({"params": params[name]}, x), np.float64)
    fake_b, fake_a = G("G_AB", batch["A"]), G("G_BA", batch["B"])
    rec_a, rec_b = G("G_BA", fake_b.astype(np.float32)), G("G_AB", fake_a.astype(np.float32))
    l1 = lambda x, y: np.abs(x - y).mean()
    terms = {  # LSGAN for G: mean((D(G(x)) - 1)^2); cycle and identity: L1
        "G/adv_AtoB": ((D("D_B", fake_b.astype(np.float32)) - 1) ** 2).mean(),
        "G/adv_BtoA": ((D("D_A", fake_a.astype(np.float32)) - 1) ** 2).mean(),
        "G/cycle_A": l1(rec_a, a),
        "G/cycle_B": l1(rec_b, b),
    }
    expected = (
        terms["G/adv_AtoB"] + terms["G/adv_BtoA"] + 10 * (terms["G/cycle_A"] + terms["G/cycle_B"])
    )
    if lambda_identity:
        terms["G/identity_A"] = l1(G("G_BA", batch["A"]), a)
        terms["G/identity_B"] = l1(G("G_AB", batch["B"]), b)
        expected += lambda_identity * 10 * (terms["G/identity_A"] + terms["G/identity_B"])
    loss, aux = method.generator_loss(params, inp)
    assert_loss_terms(loss, aux, terms, expected)
    np.testing.assert_allclose(aux.carry["fake_B"], fake_b, atol=1e-5)
    np.testing.assert_allclose(aux.carry["fake_A"], fake_a, atol=1e-5)

    # D phase (pool of 4 still filling: it returns the carried fakes themselves).
    carry = {"fake_A": aux.carry["fake_A"] + 0.1, "fake_B": aux.carry["fake_B"] - 0.1}
    _, d_aux = method.discriminator_loss(params, inp._replace(carry=carry))
    lsgan_d = lambda real, fake: 0.5 * (((real - 1) ** 2).mean() + (fake**2).mean())
    d_a = lsgan_d(D("D_A", batch["A"]), D("D_A", carry["fake_A"]))
    d_b = lsgan_d(D("D_B", batch["B"]), D("D_B", carry["fake_B"]))
    np.testing.assert_allclose(float(d_aux.metrics["D/A"]), d_a, rtol=1e-5)
    np.testing.assert_allclose(float(d_aux.metrics["D/B"]), d_b, rtol=1e-5)


def test_training_reduces_cycle_loss():
    cfg = load_config("cyclegan", "runlocal")
    cfg.batch_size = 4
    cfg.model.ngf, cfg.model.ndf = 8, 8
    cfg.num_train_steps = 40
    for group in ("G", "D"):
        cfg.optimizer[group].learning_rate = 1e-3
    run = loop.Run(cfg, mesh=parallel.make_mesh(1))
    state = run.init_state()
    history = []
    for s in range(40):
        state, m = run.step_fn(state, run.global_batch(s))
        history.append({k: float(v) for k, v in m.items()})
    cyc = [h["G/cycle_A"] + h["G/cycle_B"] for h in history]
    assert all(np.isfinite(v) for h in history for v in h.values())
    assert np.mean(cyc[-5:]) < 0.7 * np.mean(cyc[:5]), cyc
    assert np.std([h["loss/D"] for h in history]) > 0  # the discriminators train too


def _run(args, extra_env=(), **kw):
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="2", PYTHONPATH=ROOT, **dict(extra_env))
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        **kw,
    )


def test_train_cli_end_to_end_then_translate(tmp_path):
    workdir = tmp_path / "wd"
    train = ["train.py", "--config=configs/cyclegan.py:runlocal", f"--workdir={workdir}"]
    # Without the test session's cache directory: the run's own, workdir/compilation_cache.
    proc = _run(train, extra_env={"JAX_COMPILATION_CACHE_DIR": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 4
    assert any(n.startswith("jit_train_step") for n in os.listdir(workdir / "compilation_cache"))
    # Quiet by default: the trainer's progress and evaluation lines, no library INFO chatter.
    assert "step 4/4" in proc.stderr and "eval @ 4" in proc.stderr
    assert "checkpoint_manager.py" not in proc.stderr, proc.stderr[-3000:]
    # A resume (from step 2) loads its training step from there instead of compiling it;
    # --verbose shows Orbax's INFO lines too.
    shutil.rmtree(workdir / "checkpoints" / "4")
    env = {"JAX_COMPILATION_CACHE_DIR": "", "JAX_LOG_COMPILES": "1"}
    proc = _run([*train, "--verbose"], extra_env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checkpoint_manager.py" in proc.stderr
    assert "Resumed from" in proc.stderr and "at step 2" in proc.stderr
    assert "Persistent compilation cache hit for 'jit_train_step'" in proc.stderr
    evals = [l for l in lines if "eval/psnr_AtoB" in l]
    assert evals and {"eval/psnr_BtoA", "eval/psnr_identity_AtoB"} <= set(evals[-1])
    assert any("loss/G" in l and "lr/G" in l and "perf/images_per_sec" in l for l in lines)
    assert sorted(p.name for p in (workdir / "samples").iterdir())  # PNG grids
    assert os.listdir(workdir / "tensorboard")
    assert "4" in os.listdir(workdir / "checkpoints")

    # Translate a folder: every image, names kept, more images than one batch.
    src, dst = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    rng = np.random.default_rng(0)
    names = [f"img_{i:02d}.png" for i in range(5)]
    for n in names:
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(src / n)
    proc = _run(
        [
            "-m",
            "ganda_jax.cli.translate",
            f"--workdir={workdir}",
            f"--input={src}",
            f"--output={dst}",
            "--direction=BtoA",
            "--batch_size=2",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(dst)) == names
    assert Image.open(dst / names[0]).size == (32, 32)


def test_unknown_config_key_is_an_error(tmp_path):
    proc = _run(
        [
            "train.py",
            "--config=configs/cyclegan.py:runlocal",
            "--config.no_such_key=1",
            f"--workdir={tmp_path}",
        ]
    )
    assert proc.returncode != 0
    assert "no_such_key" in proc.stderr


def test_unknown_variant_is_an_error():
    with pytest.raises(ValueError, match="unknown config variant"):
        load_config("cyclegan", "runlokal")


@pytest.mark.slow  # compiling bf16 on XLA:CPU takes ~70 s: CI's slow pass
def test_bfloat16_compute_keeps_float32_params_and_losses():
    cfg = load_config("cyclegan", "runlocal")
    cfg.dtype = "bfloat16"
    run = loop.Run(cfg, mesh=parallel.make_mesh(2))
    state = run.init_state()
    fake = run.method.generate(state.params, jnp.zeros((1, 32, 32, 3)), "AtoB")
    for s in range(2):
        state, metrics = run.step_fn(state, run.global_batch(s))
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    assert all(v.dtype == jnp.float32 and np.isfinite(float(v)) for v in metrics.values())
    # The generator really computes in bfloat16 (its last conv output is bf16 before the cast).
    jaxpr = str(
        jax.make_jaxpr(lambda p: run.method.G.apply({"params": p}, jnp.zeros((1, 32, 32, 3))))(
            state.params["G_AB"]
        )
    )
    assert "bf16" in jaxpr and fake.dtype == jnp.float32


def test_remat_recomputes_activations_with_the_same_gradients():
    # model.remat stores each network application's input instead of its activations: the
    # same parameters and gradients, and a backward pass that keeps far less. (Every call
    # site of the method applies method.G / method.D, so one G and one D application show it.)
    cfg = load_config("cyclegan", "runlocal")
    plain = cyclegan.CycleGAN(cfg)
    cfg.model.remat = True
    remat = cyclegan.CycleGAN(cfg)
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, 32, 32, 3), minval=-1, maxval=1)
    init = lambda m: {  # noqa: E731
        "G": m.G.init(jax.random.PRNGKey(1), x)["params"],
        "D": m.D.init(jax.random.PRNGKey(2), x)["params"],
    }
    shapes = jax.eval_shape(lambda: init(plain))  # the same tree either way (checkpoints fit both)
    chex.assert_trees_all_equal_shapes_and_dtypes(shapes, jax.eval_shape(lambda: init(remat)))
    r = np.random.default_rng(0)  # (random values: no init program to compile)
    params = jax.tree.map(lambda s: jnp.asarray(0.1 * r.standard_normal(s.shape), s.dtype), shapes)

    def loss(method):  # D(G(x)) with gradients to both, as in CycleGAN's phases
        def fn(p):
            fake = method.G.apply({"params": p["G"]}, x)
            return jnp.mean((method.D.apply({"params": p["D"]}, fake) - 1) ** 2)

        return fn

    results = [jax.jit(jax.value_and_grad(loss(m)))(params) for m in (plain, remat)]
    # (atol: the biases before instance norm, whose gradients are zero up to rounding)
    chex.assert_trees_all_close(*results, rtol=1e-5, atol=1e-5)

    def residual_bytes(method):  # what the VJP keeps for the backward pass
        res = jax.eval_shape(lambda p: jax.vjp(loss(method), p)[1], params)
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(res))

    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    stored, stored_remat = residual_bytes(plain), residual_bytes(remat)
    assert stored > 5 * param_bytes  # mostly activations ...
    assert stored_remat < 2 * param_bytes + 3 * x.nbytes  # ... against params + inputs
