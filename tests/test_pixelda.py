"""PixelDA: network shapes, logits into the cross-entropy, loss weighting, phase isolation,
BatchNorm statistics, a tiny training run, evaluation against the source-only baseline."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config

from ganda_jax import engine
from ganda_jax.data import tasks
from ganda_jax.methods import pixelda
from ganda_jax.metrics import classify_eval
from ganda_jax.train import loop, parallel, trainer


def _tiny_config():
    cfg = load_config("pixelda", "runlocal")
    cfg.batch_size = 8
    cfg.num_train_steps = 20
    for group in cfg.optimizer.values():
        group.learning_rate = 2e-3
    return cfg


@pytest.fixture(scope="module")
def run():
    return loop.Run(_tiny_config(), mesh=parallel.make_mesh(1))


@pytest.fixture(scope="module")
def history(run):
    """State after 2 steps (every Adam moment non-zero) and the metrics of 20 steps."""
    state = run.init_state()
    init_stats = jax.device_get(state.model_state)
    metrics, after_two = [], None
    for s in range(run.config.num_train_steps):
        state, m = run.step_fn(state, run.global_batch(s))
        metrics.append({k: float(v) for k, v in m.items()})
        if s == 1:
            after_two = jax.device_get(state)
    return {"init_stats": init_stats, "after_two": after_two, "metrics": metrics, "final": state}


def _inputs(run, state, step=2):
    batch = run.method.prepare(run.global_batch(step))
    return engine.make_inputs(run.method, batch, state, jax.random.PRNGKey(7))


def test_batchnorm_is_flaxs_and_lets_xla_merge_gs_two_forward_passes():
    """layers.BatchNorm computes what flax's BatchNorm computes (values, running statistics,
    eval mode, same variable tree); and written out, it lets XLA compute G's forward pass
    once when a step has it twice, once plain (the D phase's fakes) and once under autodiff
    (the G/T phase), as PixelDA's step does with one z (flax's module kept both)."""
    import flax.linen as nn

    from ganda_jax.nets import layers

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((6, 5, 4, 3)) * 2 + 1, jnp.float32)
    flax_bn = nn.BatchNorm(momentum=0.9, epsilon=1e-5, scale_init=layers.scale_init)
    variables = layers.BatchNorm().init(jax.random.PRNGKey(0), x, train=True)
    inner = variables["params"]["BatchNorm_0"]
    ours = {
        "params": {"BatchNorm_0": {"scale": inner["scale"] + 0.1, "bias": inner["bias"] - 0.2}},
        "batch_stats": {"BatchNorm_0": {"mean": jnp.full(3, 0.3), "var": jnp.full(3, 2.0)}},
    }
    theirs = {k: v["BatchNorm_0"] for k, v in ours.items()}  # flax's, without our wrapper
    y, new = layers.BatchNorm().apply(ours, x, train=True, mutable=["batch_stats"])
    y_ref, new_ref = flax_bn.apply(theirs, x, use_running_average=False, mutable=["batch_stats"])
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
    for k in ("mean", "var"):
        np.testing.assert_allclose(
            new["batch_stats"]["BatchNorm_0"][k], new_ref["batch_stats"][k], rtol=1e-6
        )
    np.testing.assert_allclose(
        layers.BatchNorm().apply(ours, x, train=False),
        flax_bn.apply(theirs, x, use_running_average=True),
        rtol=1e-6,
        atol=1e-6,
    )

    g = pixelda.Generator(features=8, n_blocks=2)
    xs, z = x[:, :4, :4], jnp.asarray(rng.uniform(-1, 1, (6, 10)), jnp.float32)
    gv = g.init(jax.random.PRNGKey(1), xs, z, train=False)

    def forward(params):
        out, _ = g.apply({**gv, "params": params}, xs, z, train=True, mutable=["batch_stats"])
        return out

    def both(params):  # D's fakes, then G's loss and gradient on the same forward pass
        fakes = jax.lax.stop_gradient(forward(params))
        loss, grads = jax.value_and_grad(lambda p: jnp.sum(jnp.sin(forward(p))))(params)
        return jnp.sum(fakes) + loss, grads

    def one(params):  # the same gradient work without the plain pass
        return jax.value_and_grad(lambda p: jnp.sum(jnp.sin(forward(p))))(params)

    count = lambda f: jax.jit(f).lower(gv["params"]).compile().as_text().count(" convolution(")  # noqa: E731
    assert count(both) == count(one)


def test_network_shapes():
    x = jnp.linspace(-1, 1, 2 * 32 * 32 * 3).reshape(2, 32, 32, 3)
    z = jnp.linspace(-1, 1, 20).reshape(2, 10)
    g = pixelda.Generator(features=4, n_blocks=2)
    t = pixelda.Classifier(features=(4, 4), hidden=(8,))
    method = pixelda.PixelDA(load_config("pixelda", "runlocal"))

    @jax.jit
    def forward(key):
        variables = g.init(key, x, z, train=False)
        y, new = g.apply(variables, x, z, train=True, mutable=["batch_stats"])
        logits = t.apply(t.init(key, x), x)
        patches = method.discriminate({"D": method.D.init(key, x)["params"]}, x)
        return variables, y, new, logits, patches

    variables, y, new, logits, patches = forward(jax.random.PRNGKey(0))
    assert y.shape == x.shape and float(jnp.max(jnp.abs(y))) <= 1.0
    assert jax.tree.structure(new["batch_stats"]) == jax.tree.structure(variables["batch_stats"])
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    # The PatchGAN gives a 2x2 map of logits on 32x32 images (like the reference's).
    assert patches.shape == (2, 2, 2, 1)
    # The paper's (DANN/DSN) MNIST classifier at 32x32: 359,290 parameters.
    shapes = jax.eval_shape(pixelda.Classifier().init, jax.random.PRNGKey(0), x)
    assert sum(np.prod(s.shape) for s in jax.tree.leaves(shapes)) == 359_290


def test_task_loss_takes_logits_and_total_is_the_weighted_sum(run, history):
    cfg = _tiny_config()
    cfg.loss.discriminator_weight, cfg.loss.style_weight, cfg.loss.task_weight = 0.5, 0.3, 0.7
    method = pixelda.PixelDA(cfg)
    state = history["after_two"]
    params = dict(state.params)
    # Large logits: a true CE far above log(1 + 9e) = 3.24, the most a softmax fed to a
    # cross-entropy (the PyTorch-GAN reference's bug) can ever give with 10 classes.
    last = max(k for k in params["T"] if k.startswith("Dense"))
    params["T"] = {**params["T"], last: jax.tree.map(lambda w: 100.0 * w, params["T"][last])}
    inp = _inputs(run, state)
    loss, aux = jax.jit(method.generator_task_loss)(params, inp)
    m = aux.metrics

    x_s, y_s = np.asarray(inp.batch["source"]), np.asarray(inp.batch["label"])
    z = inp.draws["z"]
    fake = method.generate(params, state.model_state, x_s, z, train=True)[0]

    def hand_ce(logits):
        logits = np.asarray(logits, np.float64)
        m = logits.max(-1, keepdims=True)
        log_softmax = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
        return -log_softmax[np.arange(len(y_s)), y_s].mean()

    np.testing.assert_allclose(
        m["T/source_ce"], hand_ce(method.task_logits(params, x_s)), rtol=1e-4
    )
    np.testing.assert_allclose(
        m["T/transferred_ce"], hand_ce(method.task_logits(params, fake)), rtol=1e-4
    )
    assert float(m["T/source_ce"]) > 3.3
    expected = 0.3 * m["G/style"] + 0.7 * (m["T/source_ce"] + m["T/transferred_ce"])
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-5)

    loss_d, aux_d = jax.jit(method.discriminator_loss)(params, inp)
    np.testing.assert_allclose(float(loss_d), 0.5 * float(aux_d.metrics["D/adv"]), rtol=1e-6)


def test_phases_follow_the_papers_order(run):
    """The order of updates (phase isolation, finite losses and resume are checked for every
    method in ``test_methods.py``)."""
    assert [(p.name, p.players) for p in engine.phases(run.method)] == [
        ("D", ("D",)),
        ("GT", ("G", "T")),
        ("source_only", ("T_src",)),
        ("oracle", ("T_oracle",)),
    ]


def test_batchnorm_statistics_update(history):
    before = history["init_stats"]["G"]["batch_stats"]
    after = jax.device_get(history["final"].model_state["G"]["batch_stats"])
    assert jax.tree.structure(before) == jax.tree.structure(after)
    for b, a in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        assert np.all(np.isfinite(a)) and not np.array_equal(a, b)


def test_tiny_training_moves_every_loss_and_stays_finite(history):
    ms = history["metrics"]
    assert all(np.isfinite(v) for m in ms for v in m.values())
    for k in (
        "loss/D",
        "loss/GT",
        "loss/source_only",
        "G/style",
        "T/source_ce",
        "T/transferred_ce",
    ):
        assert np.std([m[k] for m in ms]) > 1e-4, k
    for k in ("T/source_ce", "source_only/ce"):  # the classifiers learn the source task
        assert np.mean([m[k] for m in ms[-4:]]) < np.mean([m[k] for m in ms[:4]]), k


def test_classifier_accuracy_counts_every_example_once():
    split = {"image": np.zeros((13, 4, 4, 3), np.uint8), "label": np.arange(13) % 3}
    fn = classify_eval.make_accuracy_fn(
        lambda params, x: {"always_1": jnp.tile(params, (x.shape[0], 1))}
    )
    acc = classify_eval.accuracies(
        fn, jnp.array([0.0, 1.0, 0.0]), split, mesh=parallel.make_mesh(2), batch_size=4
    )
    assert acc == {"always_1": pytest.approx(4 / 13)}


def test_da_data_hides_target_labels_and_checks_the_config():
    cfg = load_config("pixelda", "runlocal")
    streams = tasks.Classification(cfg.data, 32).train_streams()
    assert set(streams["source"].fields) == {"image", "label"}
    assert streams["target"].fields == ("image",)
    test = tasks.Classification(cfg.data, 32).test_split("target")
    assert test["image"].shape == (16, 32, 32, 3) and test["label"].dtype == np.int32
    with pytest.raises(ValueError, match="image_size=32"):
        tasks.Classification(cfg.data, 64).train_streams()
    cfg.data.target_domain.update(kind="tfds", name="")
    with pytest.raises(ValueError, match="data.target_domain: kind='tfds' needs a dataset name"):
        tasks.Classification(cfg.data, 32).train_streams()


def test_training_writes_target_and_source_only_accuracy(tmp_path):
    cfg = load_config("pixelda", "runlocal")
    trainer.train(cfg, str(tmp_path), mesh=parallel.make_mesh(2))
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [line for line in lines if "eval/target_accuracy" in line]
    assert evals and evals[-1]["step"] == cfg.num_train_steps
    for k in (
        "eval/target_accuracy",
        "eval/source_only_accuracy",
        "eval/source_accuracy",
        "eval/source_only_source_accuracy",
    ):
        assert 0.0 <= evals[-1][k] <= 1.0, k
    assert any("source_only/ce" in line and "T/transferred_ce" in line for line in lines)
    assert list((tmp_path / "samples").iterdir())
