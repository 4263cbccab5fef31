"""CC-GAN: holes, network shapes, losses against hand-computed values, the supervised-only
baseline, phase isolation, semi-supervised data, and a tiny run that evaluates, checkpoints
and resumes exactly."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import equal_trees, load_config

from ganda_jax import engine
from ganda_jax.data import tasks
from ganda_jax.methods import ccgan
from ganda_jax.metrics import image_metrics
from ganda_jax.train import checkpointing, loop, parallel, trainer


def _tiny_config():
    cfg = load_config("ccgan", "runlocal")
    for group in cfg.optimizer.values():
        group.learning_rate = 2e-3  # so that 20 steps visibly lower the cross-entropies
    return cfg


@pytest.fixture(scope="module")
def mesh():
    return parallel.make_mesh(2)


@pytest.fixture(scope="module")
def run(mesh):
    return loop.Run(_tiny_config(), mesh=mesh)


@pytest.fixture(scope="module")
def history(run):
    """States after 2 steps (every Adam moment non-zero) and 4 steps, and 20 steps' metrics."""
    state = run.init_state()
    out = {"init_stats": jax.device_get(state.model_state), "metrics": []}
    for s in range(20):
        state, m = run.step_fn(state, run.global_batch(s))
        out["metrics"].append({k: float(v) for k, v in m.items()})
        if s in (1, 3):
            out["after_two" if s == 1 else "after_four"] = jax.device_get(state)
    out["final"] = jax.device_get(state)
    return out


def _inputs(run, state, step=2):
    batch = run.method.prepare(run.global_batch(step))
    return engine.make_inputs(run.method, batch, state, jax.random.PRNGKey(7))


def _softplus(x):
    return np.logaddexp(0.0, np.asarray(x, np.float64))


def _hand_ce(logits, labels):
    logits = np.asarray(logits, np.float64)
    m = logits.max(-1, keepdims=True)
    log_softmax = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    return -log_softmax[np.arange(len(labels)), np.asarray(labels)].mean()


def test_holes_are_squares_anywhere_in_the_image():
    size, hole = 12, 5

    @jax.jit
    def draw(key):
        corners = ccgan.hole_corners(key, 4000, size, hole)
        return corners, ccgan.hole_mask(corners, size, hole)

    corners, mask = (np.asarray(a) for a in draw(jax.random.PRNGKey(0)))
    assert corners.dtype == np.int32 and mask.shape == (4000, size, size, 1)
    # Every position 0..size-hole, both borders included (the reference never reaches the last).
    assert set(np.unique(corners)) == set(range(size - hole + 1))
    for (y, x), m in zip(corners[:50], mask[:50, ..., 0]):
        expected = np.zeros((size, size), np.float32)
        expected[y : y + hole, x : x + hole] = 1
        np.testing.assert_array_equal(m, expected)
    x = np.arange(2 * size * size * 3, dtype=np.float32).reshape(2, size, size, 3)
    crops = np.asarray(ccgan.crop_holes(jnp.asarray(x), jnp.asarray(corners[:2]), hole))
    for i, (y0, x0) in enumerate(corners[:2]):
        np.testing.assert_array_equal(crops[i], x[i, y0 : y0 + hole, x0 : x0 + hole])
    np.testing.assert_allclose(
        np.asarray(ccgan.downsample(jnp.asarray(x), 4)),
        x.reshape(2, 3, 4, 3, 4, 3).mean(axis=(2, 4)),
        rtol=1e-6,
    )


def test_flat_random_draws_keep_their_distributions():
    class Drop(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            return ccgan.dropout(self, x, 0.25, train=train)

    @jax.jit
    def draw(key):
        w = ccgan.conv_init(key, (4, 4, 16, 32))
        x = jnp.ones((8, 16, 16, 4))
        return w, Drop().apply({}, x, True, rngs={"dropout": key}), Drop().apply({}, x, False)

    w, dropped, kept = (np.asarray(a) for a in draw(jax.random.PRNGKey(3)))
    assert w.shape == (4, 4, 16, 32) and abs(w.std() - 0.02) < 0.001 and abs(w.mean()) < 0.001
    # Inverted dropout: a quarter zeroed, the rest scaled by 1/0.75; identity at evaluation.
    assert abs((dropped == 0).mean() - 0.25) < 0.02
    np.testing.assert_allclose(dropped[dropped != 0], 1 / 0.75, rtol=1e-6)
    np.testing.assert_array_equal(kept, 1.0)


def test_network_shapes():
    x = jnp.zeros((2, 32, 32, 3))
    mask = ccgan.hole_mask(jnp.array([[0, 0], [16, 8]], jnp.int32), 32, 16)
    g = ccgan.ContextEncoder(ngf=4, n_down=3)
    d = ccgan.Discriminator(features=(4, 8), convs_per_stage=2, num_classes=7, dropout=0.5)
    key = jax.random.PRNGKey(0)

    def forward(low):
        variables = g.init(key, x, mask, low, train=False)
        y, new = g.apply(variables, x, mask, low, train=True, mutable=["batch_stats"])
        return variables, y, new

    kernels = {}
    for name, low in (("plain", None), ("lowres", ccgan.downsample(x, 4))):
        variables, y, new = jax.eval_shape(forward, low)  # shapes only: nothing is compiled
        assert y.shape == x.shape and y.dtype == jnp.float32
        assert jax.tree.structure(new["batch_stats"]) == jax.tree.structure(
            variables["batch_stats"]
        )
        kernels[name] = variables["params"]["Conv_2"]["kernel"].shape
    # The low-resolution image enters after two downsamplings (8 px): 3 more input channels.
    assert kernels["lowres"][2] == kernels["plain"][2] + 3
    params = jax.eval_shape(lambda: d.init(key, x, train=False))
    for train in (True, False):
        adv, logits = jax.eval_shape(
            lambda p, t=train: d.apply(p, x, train=t, rngs={"dropout": key}), params
        )
        assert adv.shape == (2,) and logits.shape == (2, 7) and logits.dtype == jnp.float32
    with pytest.raises(ValueError, match="matches no encoder level"):
        jax.eval_shape(lambda: g.init(key, x, mask, ccgan.downsample(x, 16), train=False))
    cfg = load_config("ccgan", "runlocal")
    cfg.model.lowres_factor = 8  # n_down=2 reaches 8 px only at factor 4
    with pytest.raises(ValueError, match="lowres_factor"):
        ccgan.CCGAN(cfg)


def test_losses_match_a_hand_computation(run, history):
    cfg = _tiny_config()
    cfg.model.dropout_D = 0.0  # deterministic D, so the test can recompute its outputs
    cfg.loss.d_adv_weight, cfg.loss.class_weight = 0.5, 0.7
    cfg.loss.adv_weight, cfg.loss.rec_weight = 0.3, 0.9
    method = ccgan.CCGAN(cfg)
    state = history["after_two"]
    params = dict(state.params)
    # Large class logits: a true CE far above log(1 + 9e) = 3.24, the most a softmax fed to a
    # cross-entropy (the double-softmax bug) can give with 10 classes.
    head = dict(params["D"]["Dense_1"], bias=jnp.linspace(-20.0, 20.0, 10))
    params["D"] = {**params["D"], "Dense_1": head}
    inp = _inputs(run, state)
    x_u, y = np.asarray(inp.batch["unlabeled"]), np.asarray(inp.batch["label"])

    @jax.jit
    def compute(params, inp):
        loss_d, aux_d = method.discriminator_loss(params, inp)
        # The G phase in-fills the D phase's holes (the step's draws, from the D phase's rng).
        loss_g, aux_g = method.generator_loss(params, inp)
        corners = method.holes(jax.random.split(inp.rng)[0], x_u.shape[0])
        filled, out, mask, _ = method.inpaint(
            params, inp.model_state["G"], inp.batch["unlabeled"], corners, train=True
        )
        return {
            "loss_d": loss_d,
            "m_d": aux_d.metrics,
            "loss_g": loss_g,
            "m_g": aux_g.metrics,
            "corners": corners,
            "carried_corners": inp.draws["corners"],
            "filled": filled,
            "out": out,
            "mask": mask,
            "real_adv": method.discriminate(params, inp.batch["unlabeled"])[0],
            "fake_adv": method.discriminate(params, filled)[0],
            "class_logits": method.discriminate(params, inp.batch["labeled"])[1],
        }

    r = jax.device_get(compute(params, inp))
    np.testing.assert_array_equal(r["carried_corners"], r["corners"])
    bce = _softplus(-r["real_adv"]).mean() + _softplus(r["fake_adv"]).mean()
    ce = _hand_ce(r["class_logits"], y)
    assert ce > 3.3
    np.testing.assert_allclose(r["m_d"]["D/adv"], bce, rtol=1e-5)
    np.testing.assert_allclose(r["m_d"]["D/class_ce"], ce, rtol=1e-5)
    np.testing.assert_allclose(r["loss_d"], 0.5 * bce + 0.7 * ce, rtol=1e-5)

    filled, out, mask, s = r["filled"], r["out"], r["mask"], cfg.model.hole_size
    assert mask.sum() == len(x_u) * s * s
    # The in-filled image is the real context with G's pixels in the hole only.
    np.testing.assert_array_equal(filled * (1 - mask), x_u * (1 - mask))
    np.testing.assert_allclose(filled * mask, out * mask, rtol=1e-6)
    rec = np.mean(
        [
            np.mean((out[i, y0 : y0 + s, x0 : x0 + s] - x_u[i, y0 : y0 + s, x0 : x0 + s]) ** 2)
            for i, (y0, x0) in enumerate(r["corners"])
        ]
    )
    adv = _softplus(-r["fake_adv"]).mean()
    np.testing.assert_allclose(r["m_g"]["G/masked_l2"], rec, rtol=1e-5)
    np.testing.assert_allclose(r["m_g"]["G/adv"], adv, rtol=1e-5)
    np.testing.assert_allclose(r["loss_g"], 0.3 * adv + 0.9 * rec, rtol=1e-5)


def test_baseline_is_the_discriminator_without_unlabelled_data(run, history):
    """D_sup's update is D's with the adversarial term switched off: same data, same loss."""
    state = history["after_two"]
    params = {**state.params, "D_sup": state.params["D"]}
    inp = _inputs(run, state)
    methods, baseline = {}, {}
    for w in (0.0, 1.0):
        cfg = _tiny_config()  # a method keeps its config: one each
        cfg.model.dropout_D, cfg.loss.d_adv_weight = 0.0, w
        methods[w] = ccgan.CCGAN(cfg)
        baseline[w] = {ph.name: ph for ph in engine.phases(methods[w])}["supervised_only"]

    @jax.jit
    def gradients(p):
        return {
            w: (
                jax.grad(lambda d, m=m: m.discriminator_loss({**p, "D": d}, inp)[0])(p["D"]),
                jax.grad(lambda d, w=w: baseline[w].loss_fn({**p, "D_sup": d}, inp)[0])(p["D_sup"]),
            )
            for w, m in methods.items()
        }

    grads = gradients(params)
    g_d, g_sup = grads[0.0]
    for a, b in zip(jax.tree.leaves(g_d), jax.tree.leaves(g_sup)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
    g_d, g_sup = grads[1.0]  # control: with the adversarial term the gradients differ
    assert not all(
        np.allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
        for a, b in zip(jax.tree.leaves(g_d), jax.tree.leaves(g_sup))
    )
    # Same initial weights: the baseline differs only by what it is trained on.
    init = run.init_state()
    assert equal_trees(init.params["D"], init.params["D_sup"])


def test_phases_follow_the_papers_order(run):
    """The order of updates (phase isolation, finite losses and resume are checked for every
    method in ``test_methods.py``)."""
    assert [(p.name, p.players) for p in engine.phases(run.method)] == [
        ("D", ("D",)),
        ("G", ("G",)),
        ("supervised_only", ("D_sup",)),
    ]


def test_tiny_training_moves_every_loss_and_stays_finite(history):
    ms = history["metrics"]
    assert all(np.isfinite(v) for m in ms for v in m.values())
    for k in (
        "loss/D",
        "loss/G",
        "loss/supervised_only",
        "D/adv",
        "D/class_ce",
        "G/adv",
        "G/masked_l2",
    ):
        assert np.std([m[k] for m in ms]) > 1e-4, k
    for k in ("D/class_ce", "supervised_only/class_ce"):  # both class heads learn the labelled set
        assert np.mean([m[k] for m in ms[-4:]]) < np.mean([m[k] for m in ms[:4]]), k
    before = history["init_stats"]["G"]["batch_stats"]
    after = history["final"].model_state["G"]["batch_stats"]
    for b, a in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        assert np.all(np.isfinite(a)) and not np.array_equal(a, b)


def test_semi_supervised_data_hides_labels_and_checks_the_config():
    cfg = load_config("ccgan", "runlocal")
    cfg.data.labels_per_class = 2
    streams = tasks.SemiSupervised(cfg.data, 32).train_streams()
    assert streams["unlabeled"].fields == ("image",)
    labeled = streams["labeled"].arrays
    assert np.bincount(labeled["label"], minlength=10).tolist() == [2] * 10
    unlabeled = streams["unlabeled"].arrays["image"]
    assert len(unlabeled) == cfg.data.num_train
    # The labelled images are training images (the unlabelled pool), not test images.
    flat = {img.tobytes() for img in unlabeled}
    assert all(img.tobytes() in flat for img in labeled["image"])
    test = tasks.SemiSupervised(cfg.data, 32).test_split("domain")
    assert test["image"].shape == (16, 32, 32, 3) and test["label"].dtype == np.int32
    assert not any(img.tobytes() in flat for img in test["image"])
    # Deterministic and balanced; too few examples of a class is an error.
    labels = np.arange(30) % 3
    idx = tasks.labeled_indices(labels, 4, 3, seed=0)
    np.testing.assert_array_equal(idx, tasks.labeled_indices(labels, 4, 3, seed=0))
    assert np.bincount(labels[idx]).tolist() == [4, 4, 4]
    with pytest.raises(ValueError, match="fewer examples"):
        tasks.labeled_indices(labels, 11, 3, seed=0)
    with pytest.raises(ValueError, match="image_size=32"):
        tasks.SemiSupervised(cfg.data, 64).train_streams()
    cfg.data.domain.update(kind="tfds", name="")
    with pytest.raises(ValueError, match="needs a dataset name"):
        tasks.SemiSupervised(cfg.data, 32).train_streams()


def test_training_evaluates_checkpoints_and_resumes_exactly(tmp_path, run, history, mesh):
    cfg = _tiny_config()
    # An interrupted run: the fixture's state after 2 steps, checkpointed as the trainer does.
    ckpt = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), save_every=2, async_save=False)
    ckpt.save(2, history["after_two"], run.meta(2), force=True)
    ckpt.close()
    final = trainer.train(cfg, str(tmp_path), mesh=mesh)  # resumes at step 2
    assert int(final.step) == cfg.num_train_steps == 4
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [2, 4]
    # Bit for bit what the uninterrupted fixture run reached at step 4.
    assert equal_trees(jax.device_get(final.params), history["after_four"].params)
    assert equal_trees(jax.device_get(final.opt_state), history["after_four"].opt_state)
    assert equal_trees(jax.device_get(final.model_state), history["after_four"].model_state)

    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "loss/D" in line] == [4]
    evals = [line for line in lines if "eval/test_accuracy" in line]
    assert len(evals) == 1 and evals[0]["step"] == 4
    e = evals[0]
    for k in ("eval/test_accuracy", "eval/supervised_only_accuracy"):
        assert 0.0 <= e[k] <= 1.0, k
    np.testing.assert_allclose(
        e["eval/ssl_gain"], e["eval/test_accuracy"] - e["eval/supervised_only_accuracy"]
    )
    assert e["eval/masked_l2"] > 0 and np.isfinite(e["eval/hole_psnr"])

    # The mean-colour baseline, recomputed here from the test split and the fixed eval holes.
    method = ccgan.CCGAN(cfg)
    test = method.data.test_split("domain")
    x = image_metrics.from_uint8(test["image"], np.float64)
    s, l2, psnr = cfg.model.hole_size, [], []
    for img, (y0, x0) in zip(x, method.eval_holes(len(x))):
        hole = np.zeros(img.shape[:2], bool)
        hole[y0 : y0 + s, x0 : x0 + s] = True
        err = np.mean((img[~hole].mean(0) - img[hole]) ** 2)
        l2.append(err)
        psnr.append(10 * np.log10(4.0 / err))
    np.testing.assert_allclose(e["eval/mean_fill_masked_l2"], np.mean(l2), rtol=1e-4)
    np.testing.assert_allclose(e["eval/mean_fill_hole_psnr"], np.mean(psnr), rtol=1e-4)
    assert list((tmp_path / "samples").iterdir())
