"""DiscoGAN: the reference U-Net / PatchGAN, losses by hand, phase isolation, training, paired data."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_loss_terms, load_config
from PIL import Image

from ganda_jax import engine
from ganda_jax.cli import translate
from ganda_jax.data import pipeline
from ganda_jax.methods import discogan
from ganda_jax.methods.discogan import PatchDiscriminator, UNetGenerator
from ganda_jax.metrics import image_metrics
from ganda_jax.train import loop, parallel, trainer


def _n_params(module, x):
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)
    return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))


def test_unet_generator_shapes_skips_dropout_and_reference_size():
    g = UNetGenerator(ngf=4)
    x = jnp.linspace(-1, 1, 2 * 64 * 64 * 3).reshape(2, 64, 64, 3)
    variables = g.init(jax.random.PRNGKey(0), x)
    y, inter = g.apply(variables, x, capture_intermediates=True)
    assert y.shape == x.shape and float(jnp.max(jnp.abs(y))) <= 1.0
    p = variables["params"]
    # 6 downs, 5 ups, one final conv, named as in the reference.
    assert sorted(p) == sorted(
        [f"down{i}" for i in range(1, 7)] + [f"up{i}" for i in range(1, 6)] + ["final"]
    )
    down_out = [p[f"down{i}"]["Conv_0"]["Conv_0"]["kernel"].shape[-1] for i in range(1, 7)]
    assert down_out == [4, 8, 16, 32, 32, 32]  # ngf x (1, 2, 4, 8, 8, 8)
    # Each up block (and the final conv) reads the previous up's output concatenated with
    # the encoder map of the same size: in = out(previous up) + out(mirrored down).
    up = [p[f"up{i}"]["ConvTranspose_0"]["kernel"].shape for i in range(1, 6)]
    assert [s[-1] for s in up] == [32, 32, 16, 8, 4]
    assert [s[-2] for s in up] == [32, 32 + 32, 32 + 32, 16 + 16, 8 + 8]
    assert p["final"]["Conv_0"]["kernel"].shape == (4, 4, 4 + 4, 3)
    # The up blocks' outputs (after the concatenation) double in size: 2x2 ... 32x32.
    for i, size in enumerate((2, 4, 8, 16, 32), start=1):
        (out,) = inter["intermediates"][f"up{i}"]["__call__"]
        assert out.shape == (2, size, size, 2 * up[i - 1][-1]), (i, out.shape)
    # Dropout: on in training mode (a key per call), off otherwise.
    y1 = g.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
    y2 = g.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
    assert not np.allclose(y1, y2) and np.array_equal(g.apply(variables, x), y)
    # The reference GeneratorUNet (ngf=64): 29,241,731 parameters, summed layer by layer
    # from PyTorch-GAN's models.py (6 Conv2d(k4) downs, 5 ConvTranspose2d(k4) ups, final conv).
    ref = sum(
        i * o * 16 + o
        for i, o in [(3, 64), (64, 128), (128, 256), (256, 512), (512, 512), (512, 512)]
    )
    ref += sum(
        i * o * 16 + o
        for i, o in [(512, 512), (1024, 512), (1024, 256), (512, 128), (256, 64), (128, 3)]
    )
    assert ref == 29_241_731 == _n_params(UNetGenerator(ngf=64), jnp.zeros((1, 64, 64, 3)))
    with pytest.raises(ValueError, match="multiple of 64"):
        g.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))


def test_patch_discriminator_shape_receptive_field_and_reference_size():
    d = PatchDiscriminator(ndf=4)
    x = jnp.zeros((2, 64, 64, 3))
    assert d.apply(d.init(jax.random.PRNGKey(0), x), x).shape == (2, 8, 8, 1)
    d = PatchDiscriminator(ndf=4, norm="none")  # instance norm couples every pixel
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 128, 128, 3))
    params = d.init(jax.random.PRNGKey(0), x)
    grad = np.abs(np.asarray(jax.grad(lambda x: d.apply(params, x)[0, 6, 6, 0])(x)[0]))
    rows, cols = np.nonzero(grad.sum(axis=(1, 2)))[0], np.nonzero(grad.sum(axis=(0, 2)))[0]
    assert rows.max() - rows.min() + 1 == 46 and cols.max() - cols.min() + 1 == 46
    ref = sum(i * o * 16 + o for i, o in [(3, 64), (64, 128), (128, 256), (256, 1)])
    assert ref == 662_977 == _n_params(PatchDiscriminator(ndf=64), jnp.zeros((1, 64, 64, 3)))


def _inputs(method, rng=0):
    r = np.random.default_rng(rng)
    raw = {d: {"image": r.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)} for d in "AB"}
    batch = method.prepare(raw)
    params, model_state, extra = method.init(jax.random.PRNGKey(rng), batch)
    inputs = engine.PhaseInputs(
        batch=batch,
        rng=jax.random.PRNGKey(7),
        step=jnp.zeros((), jnp.int32),
        model_state=model_state,
        extra=extra,
        carry={},
        draws={},
    )
    return params, inputs


@pytest.mark.parametrize(
    "gan, distance, lambda_recon, paired",
    [("nsgan", "l2", 1.0, False), ("lsgan", "l1", 10.0, True)],
)
def test_losses_equal_their_terms_computed_by_hand(gan, distance, lambda_recon, paired):
    cfg = load_config("discogan", "runlocal")
    cfg.model.dropout = 0.0  # deterministic generators, so the terms can be recomputed
    cfg.loss.gan, cfg.loss.recon_distance, cfg.loss.lambda_recon = gan, distance, lambda_recon
    cfg.loss.lambda_pixel = 3.0
    if paired:
        cfg.data.A.kind = cfg.data.B.kind = "npz"
        cfg.data.paired = True
    method = discogan.DiscoGAN(cfg)
    params, inp = _inputs(method)
    a, b = np.asarray(inp.batch["A"]), np.asarray(inp.batch["B"])
    G = lambda x, d: np.asarray(method.generate(params, x, d))
    D = lambda name, x: np.asarray(method.D.apply({"params": params[name]}, x), np.float64)
    fake_b, fake_a = G(a, "AtoB"), G(b, "BtoA")
    rec_a, rec_b = G(fake_b, "BtoA"), G(fake_a, "AtoB")
    softplus = lambda z: np.logaddexp(z, 0.0)
    if gan == "nsgan":  # the paper: -log D(G(x)) for G; -log D(x) - log(1 - D(G(x))) for D
        g_adv = lambda f: softplus(-f).mean()
        d_loss = lambda r, f: softplus(-r).mean() + softplus(f).mean()
    else:  # the PyTorch-GAN reference: MSE against 1 / 0, the D loss halved
        g_adv = lambda f: ((f - 1) ** 2).mean()
        d_loss = lambda r, f: 0.5 * (((r - 1) ** 2).mean() + (f**2).mean())
    dist = (
        (lambda x, y: np.abs(x - y).mean())
        if distance == "l1"
        else (lambda x, y: ((x - y) ** 2).mean())
    )
    terms = {
        "G/adv_AtoB": g_adv(D("D_B", fake_b)),
        "G/adv_BtoA": g_adv(D("D_A", fake_a)),
        "G/recon_A": dist(rec_a, a),
        "G/recon_B": dist(rec_b, b),
    }
    expected = sum(terms.values()) + (lambda_recon - 1) * (terms["G/recon_A"] + terms["G/recon_B"])
    if paired:
        terms["G/pixel_AtoB"] = np.abs(fake_b - b).mean()
        terms["G/pixel_BtoA"] = np.abs(fake_a - a).mean()
        expected += 3.0 * (terms["G/pixel_AtoB"] + terms["G/pixel_BtoA"])

    loss, aux = method.generator_loss(params, inp)
    assert_loss_terms(loss, aux, terms, expected)
    np.testing.assert_allclose(aux.carry["fake_B"], fake_b, atol=1e-6)

    # The D phase judges the carried fakes (made before the G update).
    carry = {"fake_A": fake_a + 0.1, "fake_B": fake_b - 0.1}
    d_total, d_aux = method.discriminator_loss(params, inp._replace(carry=carry))
    d_a = d_loss(D("D_A", a), D("D_A", carry["fake_A"]))
    d_b = d_loss(D("D_B", b), D("D_B", carry["fake_B"]))
    np.testing.assert_allclose(float(d_aux.metrics["D/A"]), d_a, rtol=1e-5)
    np.testing.assert_allclose(float(d_aux.metrics["D/B"]), d_b, rtol=1e-5)
    np.testing.assert_allclose(float(d_total), d_a + d_b, rtol=1e-5)


def test_generator_phase_uses_dropout_with_the_phase_key():
    method = discogan.DiscoGAN(load_config("discogan", "runlocal"))  # dropout 0.5
    params, inp = _inputs(method)
    _, aux1 = method.generator_loss(params, inp)
    _, aux2 = method.generator_loss(params, inp._replace(rng=jax.random.PRNGKey(8)))
    _, aux3 = method.generator_loss(params, inp)
    eval_b = method.generate(params, inp.batch["A"], "AtoB")
    assert not np.allclose(aux1.carry["fake_B"], eval_b)
    assert not np.allclose(aux1.carry["fake_B"], aux2.carry["fake_B"])
    assert np.array_equal(aux1.carry["fake_B"], aux3.carry["fake_B"])


def test_paired_true_on_unpaired_data_raises():
    for source in ("embedded", "tfds"):
        cfg = load_config("discogan", "runlocal")
        cfg.data.A.kind, cfg.data.paired = source, True
        with pytest.raises(ValueError, match="data.paired=True .* is unpaired"):
            loop.Run(cfg, mesh=parallel.make_mesh(1))


def _tiny_config():
    cfg = load_config("discogan", "runlocal")
    cfg.num_train_steps = 30
    cfg.log_every_steps = 1
    cfg.checkpoint_every_steps = 30
    for group in ("G", "D"):
        cfg.optimizer[group].learning_rate = 1e-3
    return cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """30 steps of runlocal through the real training loop (one compilation of the step)."""
    workdir = tmp_path_factory.mktemp("discogan")
    cfg = _tiny_config()
    state = trainer.train(cfg, str(workdir), mesh=parallel.make_mesh(1))
    return cfg, workdir, jax.device_get(state)


def test_tiny_training_moves_the_losses_evaluates_and_samples(trained):
    _, workdir, state = trained
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [l for l in lines if "loss/G" in l]
    assert [l["step"] for l in steps] == list(range(1, 31))
    for l in steps:
        assert all(v is not None and np.isfinite(v) for v in l.values()), l
    recon = [l["G/recon_A"] + l["G/recon_B"] for l in steps]
    assert np.mean(recon[-5:]) < 0.7 * np.mean(recon[:5]), recon
    for key in ("loss/D", "G/adv_AtoB", "G/adv_BtoA"):
        assert np.std([l[key] for l in steps]) > 1e-3, key
    (ev,) = [l for l in lines if "eval/psnr_AtoB" in l]
    assert {
        "eval/psnr_BtoA",
        "eval/psnr_identity_AtoB",
        "eval/psnr_identity_BtoA",
        "eval/psnr_mean_image_AtoB",
        "eval/psnr_mean_image_BtoA",
    } <= set(ev)
    assert sorted(p.name for p in (workdir / "samples").iterdir()) == [
        "AtoB_0000030.png",
        "BtoA_0000030.png",
    ]
    assert int(state.step) == 30


def test_translate_cli_works_for_discogan(trained, tmp_path):
    _, workdir, state = trained
    src, dst = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    rng = np.random.default_rng(0)
    names = [f"img_{i}.png" for i in range(3)]
    for n in names:
        Image.fromarray(rng.integers(0, 255, (70, 80, 3), dtype=np.uint8)).save(src / n)
    written = translate.translate_folder(
        str(workdir), str(src), str(dst), direction="AtoB", batch_size=2
    )
    assert sorted(p.split("/")[-1] for p in written) == names
    out = np.asarray(Image.open(dst / names[0]))
    # The translation is the trained G_AB with dropout off.
    image = pipeline.center_resize(np.asarray(Image.open(src / names[0])), size=64)
    method = discogan.DiscoGAN(trained[0])
    expected = image_metrics.to_uint8(
        method.generate(state.params, image_metrics.from_uint8(image[None], jnp.float32), "AtoB")
    )
    assert out.shape == (64, 64, 3)
    assert np.abs(out.astype(int) - np.asarray(expected[0]).astype(int)).max() <= 1


def test_paired_data_keeps_pairs_aligned(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    for d in "AB":  # B[i] == A[i], so aligned pairs stay equal through crop and flip
        np.savez(tmp_path / f"{d}.npz", images=images)
    cfg = load_config("discogan", "runlocal")
    cfg.data.paired = True
    cfg.data.A.update(kind="npz", path=str(tmp_path / "A.npz"))
    cfg.data.B.update(kind="npz", path=str(tmp_path / "B.npz"))
    cfg.data.load_size, cfg.data.flip = 72, True  # random crops and flips
    cfg.batch_size = 4
    run = loop.Run(cfg, mesh=parallel.make_mesh(1))
    assert set(run.method.train_streams()) == {"AB"}
    batch = run.loader.batch(0)
    a, b = batch["AB"]["A_image"], batch["AB"]["B_image"]
    assert a.shape == (4, 64, 64, 3) and np.array_equal(a, b)
    assert not any(np.array_equal(x, im) for x in a for im in images)  # resized, cropped
    prepared = run.method.prepare(run.global_batch(0))
    assert np.array_equal(prepared["A"], prepared["B"])
    run.abstract_state()  # the paired example batch has the layout init expects
    run.loader.close()
    # (The pixelwise terms of the G loss are checked by hand in the loss test above.)
    # Unequal A and B sets cannot be paired.
    np.savez(tmp_path / "B.npz", images=images[:5])
    with pytest.raises(ValueError, match="as many A as B"):
        discogan.DiscoGAN(cfg).train_streams()
    # Folders are paired by sorted file name, and the names must match.
    for d, names in (("A", ["x.png", "y.png"]), ("B", ["x.png", "z.png"])):
        (tmp_path / "f" / f"train{d}").mkdir(parents=True)
        for n in names:
            Image.fromarray(images[0]).save(tmp_path / "f" / f"train{d}" / n)
    cfg.data.A.update(kind="folder", path="")
    cfg.data.B.update(kind="folder", path="")
    cfg.data.path = str(tmp_path / "f")
    with pytest.raises(ValueError, match="y.png is paired with .*z.png"):
        discogan.DiscoGAN(cfg).train_streams()
