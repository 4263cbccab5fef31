"""GTA for segmentation: network shapes, every loss against numpy, phase isolation, and a tiny
training run through trainer.train (metrics, eval on the target test split, checkpoints, resume)."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import equal_trees, load_config

from ganda_jax import engine
from ganda_jax.data import pipeline, tasks
from ganda_jax.methods import gta_seg
from ganda_jax.train import parallel, trainer

STEPS = 10


def _config():
    cfg = load_config("gta_seg", "runlocal")
    cfg.num_train_steps = STEPS
    cfg.log_every_steps = 1  # one metrics line per step
    cfg.checkpoint_every_steps = 4
    for group in cfg.optimizer.values():
        group.learning_rate = 2e-3
    return cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Trains 2 steps, stops (as if interrupted), then resumes to the end (the resumed call's
    compilation is a hit in the session's persistent compilation cache, see conftest)."""
    workdir = tmp_path_factory.mktemp("gta_seg")
    cfg, mesh = _config(), parallel.make_mesh(2)
    after_two = jax.device_get(trainer.train(cfg, str(workdir), max_steps=2, mesh=mesh))
    final = jax.device_get(trainer.train(cfg, str(workdir), mesh=mesh))
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {"workdir": workdir, "after_two": after_two, "final": final, "lines": lines}


def _inputs(method, step=2, void=True):
    cfg = method.config
    loader = pipeline.Loader(
        method.train_streams(), global_batch_size=cfg.batch_size, seed=0, num_threads=0, prefetch=0
    )
    host = loader.batch(step)
    if void:  # some void pixels, which no loss may count
        host["source"]["label"][:, :5, :7] = 255
    return engine.PhaseInputs(
        batch=method.prepare(jax.tree.map(jnp.asarray, host)),
        rng=jax.random.PRNGKey(7),
        step=jnp.int32(step),
        model_state={},
        extra={},
        carry={},
        draws={},  # GTA-seg draws nothing per step (dropout keys come from each phase's rng)
    )


def test_network_shapes():
    cfg = _config()
    method = gta_seg.GTASeg(cfg)
    k = cfg.data.num_classes
    x = jnp.zeros((2, 32, 32, 3))
    params = jax.eval_shape(method.init, jax.random.PRNGKey(0), {"source": x})[0]

    def forward(params, x):
        emb = method.embed(params, x)
        return (
            emb,
            method.segment(params, x),
            method.generate(params, emb, (32, 32)),
            method.discriminate(params, x),
        )

    emb, logits, image, (dom, cls) = jax.eval_shape(forward, params, x)
    # Three VGG stages at 32 px: pool_1 16x16, pool_2 8x8, fc7 on pool_3 4x4.
    assert [e.shape for e in emb] == [(2, 16, 16, 4), (2, 8, 8, 4), (2, 4, 4, 8)]
    assert logits.shape == (2, 32, 32, k) and logits.dtype == jnp.float32
    assert image.shape == (2, 32, 32, 3)
    # D: per-pixel 4-way domain logits and K-way class logits at stride 8.
    assert dom.shape == (2, 4, 4, 4) and cls.shape == (2, 4, 4, k)
    # The paper variant's F is VGG-16 up to fc7: 134,260,544 parameters (VGG-16's 138,357,544
    # minus the 1000-way fc8).
    paper = gta_seg.GTASeg(load_config("gta_seg", "paper"))
    init_f = functools.partial(paper.F.init, train=False)
    f = jax.eval_shape(init_f, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    assert sum(np.prod(s.shape) for s in jax.tree.leaves(f)) == 134_260_544


def _log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    m = logits.max(-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


def _ce(logits, labels, ignore=255):
    """Mean cross-entropy over the non-void entries, from logits (float64 numpy)."""
    labels = np.broadcast_to(labels, np.shape(logits)[:-1])
    valid = labels != ignore
    nll = -np.take_along_axis(_log_softmax(logits), np.where(valid, labels, 0)[..., None], -1)
    return nll[..., 0][valid].mean()


@pytest.fixture(scope="module")
def phases_run(trained):
    """Every phase's loss and aux from the state after 2 steps, in one compilation.

    Dropout off (so the networks can be re-run outside the losses, deterministically) and
    distinct loss weights; C's logits scaled by 1000.
    """
    cfg = _config()
    cfg.model.g_dropout = cfg.model.d_dropout = 0.0
    w = {"seg_weight": 0.9, "aux_D": 0.7, "adv_G": 0.3, "aux_G": 0.6, "rec": 1.7, "adv_F": 0.2}
    cfg.loss.update(w, aux_F=0.4)
    method = gta_seg.GTASeg(cfg)
    state = trained["after_two"]
    params = dict(state.params)
    # Large logits, so that a softmax applied before the cross-entropy would change it a lot.
    params["C"] = jax.tree.map(lambda p: 1000.0 * p, params["C"])
    inp = _inputs(method)

    @jax.jit
    def everything(params, inp):
        out = {phase.name: phase.loss_fn(params, inp) for phase in engine.phases(method)}
        xs, xt = inp.batch["source"], inp.batch["target"]
        gs = method.generate(params, method.embed(params, xs), xs.shape[1:3])
        gt = method.generate(params, method.embed(params, xt), xt.shape[1:3])
        raw = {
            "g_s": gs,
            "g_t": gt,
            **{
                k: method.discriminate(params, v)
                for k, v in {"xs": xs, "xt": xt, "gs": gs, "gt": gt}.items()
            },
            "logits": method.segment(params, xs),
            "logits_src": method.segment(
                {**params, "F": params["F_src"], "C": params["C_src"]}, xs
            ),
            "logits_oracle": method.segment(
                {**params, "F": params["F_oracle"], "C": params["C_oracle"]},
                inp.batch["oracle_image"],
            ),
        }
        return out, raw

    out, raw = jax.device_get(everything(params, inp))
    return {
        "method": method,
        "params": params,
        "batch": jax.device_get(inp.batch),
        "out": out,
        "raw": raw,
    }


def test_every_loss_matches_numpy(phases_run):
    out, raw, b = phases_run["out"], phases_run["raw"], phases_run["batch"]
    y = b["label"]
    assert (y == 255).any()
    s = y.shape[1] // raw["xs"][1].shape[1]  # D's stride: 8
    y_small = y[:, s // 2 :: s, s // 2 :: s]
    assert y_small.shape == raw["xs"][1].shape[:3]
    dom = {k: raw[k][0] for k in ("xs", "xt", "gs", "gt")}
    cls = {k: raw[k][1] for k in ("xs", "gs")}

    d_terms = [_ce(dom["xs"], 0), _ce(dom["gs"], 1), _ce(dom["xt"], 2), _ce(dom["gt"], 3)]
    loss_d, aux_d = out["D"]
    names = ("D/src_real_ce", "D/src_fake_ce", "D/tgt_real_ce", "D/tgt_fake_ce")
    np.testing.assert_allclose([aux_d.metrics[k] for k in names], d_terms, rtol=2e-4)
    expected_d = sum(d_terms) + 0.7 * _ce(cls["xs"], y_small)
    np.testing.assert_allclose(loss_d, expected_d, rtol=2e-4)

    rec = np.abs(raw["g_s"] - b["source"]).mean() + np.abs(raw["g_t"] - b["target"]).mean()
    expected_g = (
        0.3 * (_ce(dom["gs"], 0) + _ce(dom["gt"], 2)) + 0.6 * _ce(cls["gs"], y_small) + 1.7 * rec
    )
    np.testing.assert_allclose(out["G"][0], expected_g, rtol=2e-4)

    seg_ce = _ce(raw["logits"], y)
    assert np.ptp(raw["logits"], axis=-1).mean() > 10.0  # logits, not probabilities
    np.testing.assert_allclose(out["F"][1].metrics["F/seg_ce"], seg_ce, rtol=2e-4)
    # Cross-domain: fake-source judged real-target (2), fake-target real-source (0).
    expected_f = (
        0.9 * seg_ce + 0.2 * (_ce(dom["gs"], 2) + _ce(dom["gt"], 0)) + 0.4 * _ce(cls["gs"], y_small)
    )
    np.testing.assert_allclose(out["F"][0], expected_f, rtol=2e-4)
    np.testing.assert_allclose(out["source_only"][0], 0.9 * _ce(raw["logits_src"], y), rtol=2e-4)
    # The oracle: the same loss on labelled target images (never the method's source batch).
    y_t = b["oracle_label"]
    assert not np.array_equal(b["oracle_image"], b["source"])
    np.testing.assert_allclose(out["oracle"][0], 0.9 * _ce(raw["logits_oracle"], y_t), rtol=2e-4)


def test_phases_follow_the_papers_order(phases_run):
    """The order of updates (phase isolation, finite losses and resume are checked for every
    method in ``test_methods.py``)."""
    assert [(p.name, p.players) for p in engine.phases(phases_run["method"])] == [
        ("D", ("D",)),
        ("G", ("G",)),
        ("F", ("F", "C")),
        ("source_only", ("F_src", "C_src")),
        ("oracle", ("F_oracle", "C_oracle")),
    ]


def test_training_moves_every_loss_evaluates_checkpoints_and_resumes(trained):
    lines, workdir = trained["lines"], trained["workdir"]
    train = [line for line in lines if "loss/D" in line]
    # Steps 1-2 from the first call, 3-10 from the resumed one: nothing re-run, nothing skipped.
    assert [line["step"] for line in train] == list(range(1, STEPS + 1))
    assert int(trained["final"].step) == STEPS
    assert not equal_trees(trained["final"].params, trained["after_two"].params)
    keys = [k for k in train[0] if "/" in k and not k.startswith(("perf/", "lr/", "guard/"))]
    for k in (
        "D/aux_ce",
        "G/rec_src_l1",
        "F/adv_src_ce",
        "F/seg_ce",
        "source_only/seg_ce",
        "oracle/seg_ce",
        "loss/F",
    ):
        assert k in keys, k
    for k in keys:
        values = [line[k] for line in train]
        assert all(np.isfinite(values)), k
        assert np.std(values) > 1e-5, f"{k} never moved"
    # the supervised terms go down
    for k in ("F/seg_ce", "source_only/seg_ce", "oracle/seg_ce", "G/rec_src_l1"):
        first, last = (np.mean([line[k] for line in part]) for part in (train[:3], train[-3:]))
        assert last < first, k

    evals = [line for line in lines if "eval/miou" in line]
    assert len(evals) == 1 and evals[0]["step"] == STEPS
    ev = evals[0]
    for k in (
        "eval/miou",
        "eval/pixel_accuracy",
        "eval/source_only_miou",
        "eval/source_only_pixel_accuracy",
        "eval/source_miou",
        "eval/source_only_source_miou",
        "eval/oracle_miou",
        "eval/oracle_pixel_accuracy",
    ):
        assert 0.0 <= ev[k] <= 1.0, k
    assert ev["eval/adaptation_gain"] == pytest.approx(
        ev["eval/miou"] - ev["eval/source_only_miou"]
    )
    gap = ev["eval/oracle_miou"] - ev["eval/source_only_miou"]
    if gap > 1e-9:  # gap_closed is only defined when the oracle beats source only
        assert ev["eval/gap_closed"] == pytest.approx(
            (ev["eval/miou"] - ev["eval/source_only_miou"]) / gap
        )
    else:
        assert "eval/gap_closed" not in ev
    per_class = [k for k in ev if k.startswith("eval/iou/")]
    assert per_class and all(
        k.split("/")[-1] in tasks.make("segment", _config()).class_names() for k in per_class
    )
    assert any(k.startswith("eval/source_only_iou/") for k in ev)
    assert any(k.startswith("eval/oracle_iou/") for k in ev)

    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] == STEPS
    samples = sorted(p.name for p in (workdir / "samples").iterdir())
    assert any(s.startswith("target_recon_masks") for s in samples), samples


def test_tfds_variant_needs_a_prepared_source():
    cfg = load_config("gta_seg", "tfds")
    assert cfg.data.num_classes == 19 and cfg.data.source_domain.label_map == "cityscapes19"
    with pytest.raises(ValueError, match="data.source_domain: kind='tfds' needs a dataset name"):
        tasks.make("segment", cfg).train_streams()
