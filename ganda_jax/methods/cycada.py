"""CyCADA (Hoffman, Tzeng, Park, Zhu, Isola, Saenko, Efros, Darrell; ICML 2018).

Cycle-consistent adversarial domain adaptation: translate the labelled source
images into the target style with a CycleGAN that must keep their semantics,
train the task network on the translated images, and align its features on
the target adversarially. With ``f`` a task network (digit classifier or
segmenter, returning logits), ``p(f, x) = argmax f(x)`` its predicted labels,
``L_task(f, X, Y) = CE(f(X), Y)`` and ``x_st = G_st(x_s)``:

    L_CyCADA = L_task(f_T, G_st(X_S), Y_S)
             + L_GAN(G_st, D_T, X_S, X_T) + L_GAN(G_ts, D_S, X_T, X_S)      (pixel level)
             + L_GAN(f_T, D_feat, f_T(G_st(X_S)), X_T)                      (feature level)
             + lambda_cyc L_cyc(G_st, G_ts, X_S, X_T)
             + lambda_sem L_sem(G_st, G_ts, X_S, X_T, f_S)

    L_cyc = E|G_ts(G_st(x_s)) - x_s|_1 + E|G_st(G_ts(x_t)) - x_t|_1
    L_sem = L_task(f_S, G_ts(X_T), p(f_S, X_T)) + L_task(f_S, G_st(X_S), p(f_S, X_S))

where ``f_S`` is the source task network, trained first and then *frozen*.
The paper trains this in stages, and so does this port; one config drives all
of them (``config.stage``), each stage a run of its own in ``workdir/<stage>``
that warm-starts from the final checkpoints of the stages before it
(:meth:`CyCADA.stage_configs`; ``stage='all'`` runs the three in order, a re-run
resumes the interrupted one). Each stage is a method of its own over shared parts
(:class:`Pretrain`, :class:`Pixel`, :class:`Feature`; ``CyCADA(config)`` picks
``config.stage``'s):

0. **pretrain** (player ``f_S``): ``min L_task(f_S, X_S, Y_S)``.
1. **pixel** (players ``G_st, G_ts`` | ``D_s, D_t``; ``f_S`` frozen in
   ``TrainState.extra``, not a player). The CycleGAN of
   :mod:`ganda_jax.methods.cyclegan`, used by import (its A is the source, B the
   target): LSGAN, cycle L1, optional identity loss, the 50-image pools, and
   one iteration = a G phase, then a D phase on the fakes the generators made
   *before* their update. The G phase adds ``semantic_weight * L_sem``; the
   gradient of L_sem flows through the frozen ``f_S`` into the generators.
2. **feature** (players ``D_feat`` | ``f_T`` | ``T_pix`` | ``T_src``;
   ``G_st`` and ``f_S`` frozen in ``extra``). ``f_T`` starts from ``f_S``. Per
   iteration, in order:

   - ``D_feat``: ``L_D(D_feat(phi(f_T(x_st))) real, D_feat(phi(f_T(x_t))) fake)``;
   - ``f_T``: ``task_weight CE(f_T(x_st), y_s) + feature_weight L_G(D_feat(phi(f_T(x_t))))``;
   - the baselines (phases the engine adds): ``pixel_only``, pixel-level adaptation
     only, ``CE(T_pix(x_st), y_s)``; ``source_only``, no adaptation, ``CE(T_src(x_s), y_s)``;
     ``oracle``, ``CE(f_T_oracle(x_t), y_t)`` on labelled target training images (the
     data's ``target_labeled`` stream, read by no other phase): the bound of
     ``eval/oracle_*`` and ``eval/gap_closed = (f_T - T_src) / (oracle - T_src)``.

   ``x_st = G_st(x_s)`` is made once per step (``step_inputs``).

   ``phi`` is the discriminated representation (``model.feature``:
   ``'logits'``, the network's output as in the paper's ``f_T(.)`` and the
   reference's ADDA, or ``'penultimate'``). The baselines have ``f_T``'s
   architecture, initial weights (``f_S``), optimizer block, batches and step
   count, so ``eval/target_accuracy`` (``f_T``) next to
   ``eval/pixel_only_accuracy`` (``T_pix``) and ``eval/source_only_accuracy``
   (``T_src``) measures what each level of adaptation adds. All scores are on
   the held-out labelled target *test* split (``eval/..._source_accuracy``: the
   source test split).

Task networks: digits (``config.task='classify'``) use :class:`TaskNet`, the
reference's DTN layout (conv5x5/2 x3 with BatchNorm and channel dropout, fc,
dropout, fc; the paper's SVHN->MNIST network); segmentation (``'segment'``,
the ``seg`` variant) uses the small fully-convolutional :class:`SegNet`, and
``D_feat`` is then applied at every position of the score map. ``D_feat`` is
the reference ADDA discriminator: an MLP 500-500-1 (a 2-way softmax there;
one logit and the same log loss here).

Departures from the reference code (jhoffman/cycada_release; the audit: ``docs/cycada.md``):

- ``f_S`` is pretrained and frozen, as the paper says (the reference trains a small
  classifier inside the CycleGAN loop and gates the semantic loss on it).
- ``loss.semantic_source_labels``: ``'predicted'`` (the paper's ``p(f_S, X_S)``, default) or
  ``'ground_truth'`` (the reference); ``loss.adv_weight_st`` its doubled G_st term.
- The feature stage trains ``f_T`` on the paper's joint objective, its own features on both
  sides, no accuracy gate (the reference runs ADDA without a task loss).
- ``f_T`` sees ``[x_st; x_t]`` as one batch (one BatchNorm statistic, eps 1e-5); evaluation
  uses running averages, always on the target *test* split.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ganda_jax import engine, losses
from ganda_jax.methods import cyclegan
from ganda_jax.metrics import classify_eval, image_metrics, seg_eval
from ganda_jax.nets.layers import FAST, BatchNorm, Dtype

STAGES = ("pretrain", "pixel", "feature")
TASKS = ("classify", "segment")

# Player -> optimizer block (config.optimizer), per stage. The baselines share f_T's
# block so their hyper-parameters are the adapted network's, by construction.
PLAYERS = {
    "pretrain": {"f_S": "f_S"},
    "pixel": {"G_st": "G", "G_ts": "G", "D_s": "D", "D_t": "D"},
    "feature": {"D_feat": "D_feat", "f_T": "f_T"},
}

# The feature stage's baselines: copies of f_T (its initial weights from f_S and its
# optimizer block), one on the translated source only, one on the source only.
FEATURE_BASELINES = (
    engine.Baseline(
        "pixel_only", {"T_pix": "f_T"}, inputs=("x_st", "label"), metrics=("eval/pixel_only_",)
    ),
    engine.Baseline(
        "source_only", {"T_src": "f_T"}, metrics=("eval/source_only_", "eval/adaptation_gain")
    ),
    engine.target_oracle("f_T"),  # f_T_oracle: trained on labelled target images, the bound
)


# ---------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------


def _norm(kind: str, dtype):
    if kind == "batch":
        return BatchNorm(dtype=dtype)
    if kind == "none":
        return lambda x, train: x
    raise ValueError(f"unknown task-network norm {kind!r}; expected 'batch' or 'none'")


class TaskNet(nn.Module):
    """DTN digit classifier: [conv5x5/2 - norm - channel dropout - ReLU] x n, fc - norm,
    ReLU - dropout - fc. Returns float32 ``(logits [B, C], penultimate [B, hidden])``."""

    features: Sequence[int] = (64, 128, 256)
    conv_dropout: Sequence[float] = (0.1, 0.3, 0.5)
    hidden: int = 512
    dropout: float = 0.5
    norm: str = "batch"
    num_classes: int = 10
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        y = x.astype(self.dtype)
        for f, rate in zip(self.features, self.conv_dropout):
            y = nn.Conv(f, (5, 5), strides=(2, 2), padding=2, dtype=self.dtype, **FAST)(y)
            y = _norm(self.norm, self.dtype)(y, train=train)
            # Dropout2d: whole channels (broadcast over H, W).
            y = nn.Dropout(rate, broadcast_dims=(1, 2), deterministic=not train)(y)
            y = nn.relu(y)
        y = y.reshape(y.shape[0], -1)
        feat = _norm(self.norm, self.dtype)(nn.Dense(self.hidden, dtype=self.dtype)(y), train=train)
        y = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(feat))
        logits = nn.Dense(self.num_classes, dtype=self.dtype)(y)
        return logits.astype(jnp.float32), feat.astype(jnp.float32)


class SegNet(nn.Module):
    """A small FCN: conv3x3 - norm - ReLU blocks (stride 2 after the first block),
    a 1x1 score layer at 1/2^(n-1) resolution, bilinear upsampling to the input.

    Returns float32 ``(logits [B, H, W, C], score map [B, h, w, C] (the ``phi`` of
    'logits'; 'penultimate' takes the last hidden map))``.
    """

    features: Sequence[int] = (32, 64, 128)
    norm: str = "batch"
    num_classes: int = 5
    dtype: Dtype = jnp.float32
    penultimate: bool = False

    @nn.compact
    def __call__(self, x, *, train: bool):
        b, h, w, _ = x.shape
        y = x.astype(self.dtype)
        for i, f in enumerate(self.features):
            stride = 1 if i == 0 else 2
            y = nn.Conv(f, (3, 3), strides=(stride, stride), padding=1, dtype=self.dtype, **FAST)(y)
            y = nn.relu(_norm(self.norm, self.dtype)(y, train=train))
        hidden = y
        score = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, **FAST)(y).astype(jnp.float32)
        logits = jax.image.resize(score, (b, h, w, self.num_classes), method="bilinear")
        return logits, (hidden.astype(jnp.float32) if self.penultimate else score)


class FeatureDiscriminator(nn.Module):
    """D_feat: an MLP on the last axis (per example, or per position of a score map)."""

    hidden: Sequence[int] = (500, 500)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, f):
        y = f.astype(self.dtype)
        for n in self.hidden:
            y = nn.relu(nn.Dense(n, dtype=self.dtype)(y))
        return nn.Dense(1, dtype=self.dtype)(y).astype(jnp.float32)


# ---------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------


def stage_config(
    config: ml_collections.ConfigDict, stage: str, workdir: str | None = None
) -> ml_collections.ConfigDict:
    """The config of one stage: ``stage``, its ``num_train_steps`` and ``batch_size``
    (``stage_steps`` / ``stage_batch_size``), the earlier stages' workdirs.

    With ``workdir``, empty ``pretrain_workdir`` / ``pixel_workdir`` become
    ``workdir/pretrain`` / ``workdir/pixel``.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown CyCADA stage {stage!r}; expected one of {STAGES} or 'all'")
    c = config.copy_and_resolve_references()
    with c.unlocked():
        c.stage = stage
        c.num_train_steps = int(config.stage_steps[stage])
        c.batch_size = int(config.stage_batch_size[stage]) or int(config.batch_size)
        if workdir is not None:
            c.pretrain_workdir = config.pretrain_workdir or os.path.join(workdir, "pretrain")
            c.pixel_workdir = config.pixel_workdir or os.path.join(workdir, "pixel")
    return c


class _CyCADA(engine.Method):
    """The parts the three stages share: task network, CycleGAN, D_feat, data, evaluation."""

    name = "cycada"
    stage = ""
    discriminator_phases = ("D", "D_feat")
    #: network (of ``_eval_networks``) -> its eval metric prefix
    eval_names: dict[str, str] = {}

    def __init__(self, config):
        super().__init__(config)
        if config.task not in TASKS:
            raise ValueError(f"unknown task {config.task!r}; expected one of {TASKS}")
        self.segment = config.task == "segment"
        m = config.model
        if m.feature not in ("logits", "penultimate"):
            raise ValueError(f"model.feature must be 'logits' or 'penultimate', got {m.feature!r}")
        if self.segment:
            self.task_net = SegNet(
                features=tuple(m.t_features),
                norm=m.t_norm,
                num_classes=config.data.num_classes,
                dtype=self.dtype,
                penultimate=m.feature == "penultimate",
            )
        else:
            self.task_net = TaskNet(
                features=tuple(m.t_features),
                conv_dropout=tuple(m.t_conv_dropout),
                hidden=m.t_hidden,
                dropout=m.t_dropout,
                norm=m.t_norm,
                num_classes=config.data.num_classes,
                dtype=self.dtype,
            )
        self.D_feat = FeatureDiscriminator(hidden=tuple(m.d_feat_hidden), dtype=self.dtype)
        # The CycleGAN (networks, losses, image pools) by composition; A = source, B = target.
        self.cyclegan = cyclegan.CycleGAN(config)

    # --- data -----------------------------------------------------------------
    @property
    def data_task(self):
        return "segment" if self.config.task == "segment" else "classify"

    prepare = staticmethod(engine.adaptation_batch)

    # --- networks ---------------------------------------------------------------
    def _task_init(self, rng, x):
        k_p, k_d = jax.random.split(rng)
        return dict(self.task_net.init({"params": k_p, "dropout": k_d}, x, train=False))

    def task_apply(self, variables, x, *, train: bool, rng=None):
        """``(logits, phi, new non-param collections)`` of a task network (variables dict).

        ``train=False`` uses BatchNorm's running averages and no dropout.
        """
        if not train:
            logits, feats = self.task_net.apply(variables, x, train=False)
            return logits, feats, {k: v for k, v in variables.items() if k != "params"}
        (logits, feats), new = self.task_net.apply(
            variables, x, train=True, rngs={"dropout": rng}, mutable=["batch_stats"]
        )
        return logits, feats, dict(new)

    @staticmethod
    def player_vars(params, model_state, player: str):
        return {"params": params[player], **model_state.get(player, {})}

    def phi(self, logits, feats):
        """The representation D_feat sees: the output (logits) or the penultimate layer."""
        if self.config.model.feature == "penultimate" or self.segment:
            return feats  # SegNet already returns the score map or the hidden map
        return logits

    def translate(self, g_params, x):
        """``G(x)`` in float32 (a CycleGAN generator)."""
        return self.cyclegan.G.apply({"params": g_params}, x).astype(jnp.float32)

    def task_ce(self, logits, labels):
        ignore = self.config.data.ignore_index if self.segment else None
        return losses.softmax_cross_entropy(logits=logits, labels=labels, ignore_index=ignore)

    def task_acc(self, logits, labels):
        ignore = self.config.data.ignore_index if self.segment else None
        return losses.accuracy(logits=logits, labels=labels, ignore_index=ignore)

    # --- init / warm start ----------------------------------------------------------
    @staticmethod
    def _zeros_like_init(init_fn, *args):
        """Zeros shaped like ``init_fn(*args)``: for frozen networks that ``warm_start``
        replaces (nothing random to compile; an all-zero network shows a missing warm start)."""
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(init_fn, *args))

    def _supervised(self, params, inp, player: str, x, y):
        logits, _, new = self.task_apply(
            self.player_vars(params, inp.model_state, player), x, train=True, rng=inp.rng
        )
        ce = self.task_ce(logits, y)
        metrics = {"ce": ce, "acc": self.task_acc(logits, y)}
        return ce, engine.Out(metrics=metrics, model_state={player: new} if new else {})

    # --- evaluation ---------------------------------------------------------------
    def _logits_fn(self, params, x):
        nets, gens = params
        out = {k: self.task_apply(v, x, train=False)[0] for k, v in nets.items()}
        for g, g_params in gens.items():  # f_S on translated test images (pixel stage)
            out[f"f_S_{g}"] = self.task_apply(
                nets["f_S"], self.translate(g_params, x), train=False
            )[0]
        return out

    @functools.cached_property
    def _score_fn(self):
        if self.segment:
            d = self.config.data
            return seg_eval.make_segment_fn(
                self._logits_fn, num_classes=d.num_classes, ignore_index=d.ignore_index
            )
        return classify_eval.make_accuracy_fn(self._logits_fn)

    def _scores(self, params, domain: str, mesh) -> dict[str, dict[str, float]]:
        """``{network: {'accuracy'|'miou'|...: value}}`` on the test split of ``domain``."""
        cfg = self.config
        split = self.data.test_split(domain)
        if self.segment:
            scores = seg_eval.miou(
                self._score_fn, params, split, mesh=mesh, batch_size=cfg.eval_batch_size
            )
            names = self.data.class_names()
            return {
                k: seg_eval.metric_dict(v, prefix="", class_names=names) for k, v in scores.items()
            }
        acc = classify_eval.accuracies(
            self._score_fn, params, split, mesh=mesh, batch_size=cfg.eval_batch_size
        )
        return {k: {"accuracy": v} for k, v in acc.items()}

    def evaluate(self, state, mesh):
        """Scores of this stage's networks on the held-out test splits.

        Target test split (the adaptation metrics), for digits ``..._accuracy``,
        for segmentation ``..._miou``, ``..._pixel_accuracy``, ``..._iou/<class>``:

        - pretrain: ``eval/source_only_*`` (f_S);
        - pixel: ``eval/source_only_*`` (f_S), ``eval/target_to_source_*``
          (f_S on G_ts(x_t): the target translated into the source style);
        - feature: ``eval/*`` (f_T, the adapted network; e.g. ``eval/target_accuracy``,
          ``eval/miou``), ``eval/pixel_only_*`` (T_pix), ``eval/source_only_*``
          (T_src), ``eval/pretrained_source_only_*`` (f_S), and
          ``eval/adaptation_gain`` (f_T minus T_src, accuracy or mIoU).

        Source test split: ``eval/<name>source_*`` of the same networks, and at
        the pixel stage ``eval/source_to_target_label_*`` (f_S on G_st(x_s) against
        the true labels: how well the translation keeps the semantics).
        """
        params = self._eval_networks(state)
        tgt = self._scores(params, "target", mesh)
        src = self._scores(params, "source", mesh)
        main = "miou" if self.segment else "accuracy"
        out = {}

        def put(prefix, scores, source: bool):
            for k, v in scores.items():
                if source:
                    k = f"source_{k}"
                elif not self.segment:
                    k = f"target_{k}" if prefix == "eval/" else k
                out[f"{prefix}{k}"] = v

        for net, prefix in self.eval_names.items():
            put(prefix, tgt[net], source=False)
            if net != "f_S_G_ts":
                put(prefix, src[net], source=True)
        if "f_S_G_st" in src:  # pixel stage
            put("eval/source_to_target_label_", src["f_S_G_st"], source=False)
        if "T_src" in tgt:  # feature stage
            adapted, source_only = tgt["f_T"][main], tgt["T_src"][main]
            out["eval/adaptation_gain"] = adapted - source_only
            out.update(classify_eval.gap_closed(adapted, source_only, tgt["f_T_oracle"][main]))
        return out

    @functools.cached_property
    def _translate_fn(self):
        return jax.jit(self.translate)

    @functools.cached_property
    def _predict_fn(self):
        return jax.jit(lambda v, x: jnp.argmax(self.task_apply(v, x, train=False)[0], -1))

    def _sample_images(self, n: int = 8):
        """The first ``n`` source and target test images, float32 in [-1, 1]."""
        return tuple(
            image_metrics.from_uint8(self.data.test_split(d)["image"][:n], np.float32)
            for d in ("source", "target")
        )


class Pretrain(_CyCADA):
    """Stage 0: the source task network, ``min L_task(f_S, X_S, Y_S)``."""

    stage = "pretrain"
    players = PLAYERS["pretrain"]
    eval_names = {"f_S": "eval/source_only_"}

    def init(self, rng, batch):
        v = self._task_init(jax.random.split(rng, 3)[0], batch["source"][:1])
        return {"f_S": v.pop("params")}, ({"f_S": v} if v else {}), {}

    def phases(self):
        return (engine.Phase("f_S", ("f_S",), self.pretrain_loss),)

    def pretrain_loss(self, params, inp: engine.PhaseInputs):
        """L_task(f_S, X_S, Y_S)."""
        ce, out = self._supervised(params, inp, "f_S", inp.batch["source"], inp.batch["label"])
        return ce, out.replace(metrics={f"f_S/{k}": v for k, v in out.metrics.items()})

    def _eval_networks(self, state):
        return {"f_S": self.player_vars(state.params, state.model_state, "f_S")}, {}

    def samples(self, state, batch):
        return {}


class Pixel(_CyCADA):
    """Stage 1: CycleGAN + the semantic loss through the frozen ``f_S`` (in ``extra``)."""

    stage = "pixel"
    players = PLAYERS["pixel"]
    eval_names = {"f_S": "eval/source_only_", "f_S_G_ts": "eval/target_to_source_"}

    def init(self, rng, batch):
        x = batch["source"][:1]
        k_task, k_pix, _ = jax.random.split(rng, 3)
        f_s = self._zeros_like_init(self._task_init, k_task, x)  # frozen: from warm_start
        cg_params, _, pools = self.cyclegan.init(
            k_pix, {"A": batch["source"], "B": batch["target"]}
        )
        params = {
            "G_st": cg_params["G_AB"],
            "G_ts": cg_params["G_BA"],
            "D_s": cg_params["D_A"],
            "D_t": cg_params["D_B"],
        }
        return params, {}, {**pools, "f_S": f_s}

    def warm_start(self, state, restore):
        """``f_S`` from the pretrain stage's final checkpoint (``config.pretrain_workdir``,
        filled in by :meth:`CyCADA.stage_configs`; empty: no warm start, for unit tests)."""
        if not self.config.pretrain_workdir:
            return state
        pre = restore(stage_config(self.config, "pretrain"), self.config.pretrain_workdir)
        f_s = {"params": pre.params["f_S"], **pre.model_state.get("f_S", {})}
        return state.replace(extra={**state.extra, "f_S": f_s})

    def phases(self):
        return (
            engine.Phase("G", ("G_st", "G_ts"), self.pixel_generator_loss),
            engine.Phase("D", ("D_s", "D_t"), self.pixel_discriminator_loss),
        )

    @staticmethod
    def _cyclegan_params(params):
        return {
            "G_AB": params["G_st"],
            "G_BA": params["G_ts"],
            "D_A": params["D_s"],
            "D_B": params["D_t"],
        }

    @staticmethod
    def _cyclegan_inputs(inp: engine.PhaseInputs):
        return inp._replace(batch={"A": inp.batch["source"], "B": inp.batch["target"]})

    def pixel_generator_loss(self, params, inp: engine.PhaseInputs):
        """CycleGAN's generator loss (A = source) + semantic_weight * L_sem through frozen f_S."""
        cfg, b = self.config.loss, inp.batch
        loss, aux = self.cyclegan.generator_loss(
            self._cyclegan_params(params), self._cyclegan_inputs(inp)
        )
        cg = aux.metrics
        fake_t, fake_s = aux.carry["fake_B"], aux.carry["fake_A"]  # G_st(x_s), G_ts(x_t)
        loss += (cfg.adv_weight_st - 1.0) * cg["G/adv_AtoB"]

        f_s = inp.extra["f_S"]
        apply = lambda x: self.task_apply(f_s, x, train=False)[0]
        # p(f_S, x): labels from the frozen network, no gradient.
        pred_s = jnp.argmax(jax.lax.stop_gradient(apply(b["source"])), axis=-1)
        pred_t = jnp.argmax(jax.lax.stop_gradient(apply(b["target"])), axis=-1)
        labels_s = b["label"] if cfg.semantic_source_labels == "ground_truth" else pred_s
        logits_st, logits_ts = apply(fake_t), apply(fake_s)
        sem_st = self.task_ce(logits_st, labels_s)
        sem_ts = losses.softmax_cross_entropy(logits=logits_ts, labels=pred_t)
        loss += cfg.semantic_weight * (sem_st + sem_ts)

        metrics = {
            "G_st/adv": cg["G/adv_AtoB"],
            "G_ts/adv": cg["G/adv_BtoA"],
            "G/cycle_s": cg["G/cycle_A"],
            "G/cycle_t": cg["G/cycle_B"],
            "G/sem_st": sem_st,
            "G/sem_ts": sem_ts,
            # Does f_S still read the true labels in the translated source images?
            "G/sem_st_label_acc": self.task_acc(logits_st, b["label"]),
        }
        if "G/identity_A" in cg:
            metrics.update({"G/identity_s": cg["G/identity_A"], "G/identity_t": cg["G/identity_B"]})
        return loss, engine.Out(metrics=metrics, carry=aux.carry)

    def pixel_discriminator_loss(self, params, inp: engine.PhaseInputs):
        """CycleGAN's discriminator loss on the pooled fakes of the G phase."""
        loss, aux = self.cyclegan.discriminator_loss(
            self._cyclegan_params(params), self._cyclegan_inputs(inp)
        )
        m = aux.metrics
        return loss, engine.Out(metrics={"D_s/adv": m["D/A"], "D_t/adv": m["D/B"]}, extra=aux.extra)

    def _eval_networks(self, state):
        p = state.params
        return {"f_S": state.extra["f_S"]}, {"G_st": p["G_st"], "G_ts": p["G_ts"]}

    def samples(self, state, batch):
        """Rows x_s, G_st(x_s), G_ts(G_st(x_s)), x_t, G_ts(x_t), G_st(G_ts(x_t))."""
        from ganda_jax.train.writers import image_grid

        s, t = self._sample_images()
        p = jax.device_get(state.params)
        tr = lambda g, x: np.asarray(self._translate_fn(g, x))  # noqa: E731
        st, ts = tr(p["G_st"], s), tr(p["G_ts"], t)
        rows = [s, st, tr(p["G_ts"], st), t, ts, tr(p["G_st"], ts)]
        return {"source_to_target_and_back": image_grid(rows)}


class Feature(_CyCADA):
    """Stage 2: ``f_T`` (from ``f_S``) on the translated source, adversarial on features."""

    stage = "feature"
    players = PLAYERS["feature"]
    baselines = FEATURE_BASELINES  # (the other stages' eval/source_only_* are f_S's)
    eval_names = {
        "f_T": "eval/",
        "T_pix": "eval/pixel_only_",
        "T_src": "eval/source_only_",
        "f_T_oracle": "eval/oracle_",
        "f_S": "eval/pretrained_source_only_",
    }

    def init(self, rng, batch):
        # f_T (and the baselines' copies) start from f_S, and f_S and G_st are frozen: all come
        # from warm_start. Only D_feat starts from a random init.
        x = batch["source"][:1]
        k_task, k_pix, k_d = jax.random.split(rng, 3)
        f_s = self._zeros_like_init(self._task_init, k_task, x)
        t = dict(f_s)
        t_params = t.pop("params")
        phi = self.phi(*jax.eval_shape(functools.partial(self.task_net.apply, train=False), f_s, x))
        params = {
            "D_feat": self.D_feat.init(k_d, jnp.zeros(phi.shape, phi.dtype))["params"],
            "f_T": t_params,
        }
        model_state = {"f_T": t} if t else {}
        g_st = self._zeros_like_init(self.cyclegan.G.init, k_pix, x)["params"]
        return params, model_state, {"G_st": g_st, "f_S": f_s}

    def warm_start(self, state, restore):
        """``f_S`` (also the start of ``f_T`` and the baselines' copies) and ``G_st`` from the
        earlier stages' final checkpoints (``config.pretrain_workdir``, ``pixel_workdir``)."""
        cfg, copy = self.config, functools.partial(jax.tree.map, jnp.copy)
        extra, params, model_state = dict(state.extra), dict(state.params), dict(state.model_state)
        if cfg.pretrain_workdir:
            pre = restore(stage_config(cfg, "pretrain"), cfg.pretrain_workdir)
            extra["f_S"] = {"params": pre.params["f_S"], **pre.model_state.get("f_S", {})}
            for p in ("f_T", *(c for b in self.baselines for c in b.copies)):
                params[p] = copy(pre.params["f_S"])
                if "f_S" in pre.model_state:
                    model_state[p] = copy(pre.model_state["f_S"])
        if cfg.pixel_workdir:
            pixel = restore(stage_config(cfg, "pixel"), cfg.pixel_workdir)
            extra["G_st"] = pixel.params["G_st"]
        return state.replace(params=params, model_state=model_state, extra=extra)

    def phases(self):
        return (
            engine.Phase("D_feat", ("D_feat",), self.feature_discriminator_loss),
            engine.Phase("f_T", ("f_T",), self.feature_task_loss),
        )

    def step_inputs(self, rng, batch, extra):
        # x_st = G_st(x_s) from the frozen pixel-stage generator, made once per step.
        return {"x_st": self.translate(extra["G_st"], batch["source"])}

    def supervised_loss(self, params, inp, images, labels):
        """L_task(f_T, images, labels): what the feature stage's baselines minimise."""
        return self._supervised(params, inp, "f_T", images, labels)

    def _f_T_both(self, params, inp, x_st):
        """f_T on ``[x_st; x_t]`` in one batch: (logits_s, logits_t, phi_s, phi_t, stats)."""
        n = x_st.shape[0]
        x = jnp.concatenate([x_st, inp.batch["target"]], axis=0)
        logits, feats, new = self.task_apply(
            self.player_vars(params, inp.model_state, "f_T"), x, train=True, rng=inp.rng
        )
        phi = self.phi(logits, feats)
        return logits[:n], logits[n:], phi[:n], phi[n:], new

    def feature_discriminator_loss(self, params, inp: engine.PhaseInputs):
        """D_feat: translated-source representations are 'real', target ones 'fake'."""
        cfg = self.config.loss
        _, _, phi_s, phi_t, _ = self._f_T_both(params, inp, inp.draws["x_st"])
        real = self.D_feat.apply({"params": params["D_feat"]}, jax.lax.stop_gradient(phi_s))
        fake = self.D_feat.apply({"params": params["D_feat"]}, jax.lax.stop_gradient(phi_t))
        loss = losses.gan_discriminator_loss(
            real_logits=real, fake_logits=fake, loss_type=cfg.feature_gan
        )
        metrics = {
            "D_feat/adv": loss,
            "D_feat/real_logit": jnp.mean(real),
            "D_feat/fake_logit": jnp.mean(fake),
            # Domain accuracy of D_feat (the reference's ADDA logs and gates on it).
            "D_feat/acc": 0.5 * (jnp.mean(real > 0) + jnp.mean(fake <= 0)),
        }
        return loss, engine.Out(metrics=metrics)

    def feature_task_loss(self, params, inp: engine.PhaseInputs):
        """f_T: task loss on translated source + feature-level generator loss on the target."""
        cfg, y = self.config.loss, inp.batch["label"]
        logits_s, _, _, phi_t, new = self._f_T_both(params, inp, inp.draws["x_st"])
        ce = self.task_ce(logits_s, y)
        adv = losses.gan_generator_loss(
            fake_logits=self.D_feat.apply({"params": params["D_feat"]}, phi_t),
            loss_type=cfg.feature_gan,
        )
        metrics = {"f_T/ce": ce, "f_T/adv": adv, "f_T/acc": self.task_acc(logits_s, y)}
        loss = cfg.task_weight * ce + cfg.feature_weight * adv
        return loss, engine.Out(metrics=metrics, model_state={"f_T": new} if new else {})

    def _eval_networks(self, state):
        p, ms = state.params, state.model_state
        nets = {q: self.player_vars(p, ms, q) for q in self.eval_names if q != "f_S"}
        return {**nets, "f_S": state.extra["f_S"]}, {}  # f_S: frozen, in extra

    def samples(self, state, batch):
        """Rows x_s, G_st(x_s), x_t (+ for segmentation: f_T's and T_src's target maps, truth)."""
        from ganda_jax.train.writers import image_grid

        s, t = self._sample_images()
        p, ex = jax.device_get(state.params), jax.device_get(state.extra)
        rows = [s, np.asarray(self._translate_fn(ex["G_st"], s)), t]
        if self.segment:
            ms, k = jax.device_get(state.model_state), self.config.data.num_classes
            for q in ("f_T", "T_src"):
                pred = self._predict_fn(self.player_vars(p, ms, q), t)
                rows.append(seg_eval.colorize(np.asarray(pred), k))
            rows.append(seg_eval.colorize(self.data.test_split("target")["label"][:8], k))
        return {"translated_source_and_target": image_grid(rows)}


STAGE_METHODS = {"pretrain": Pretrain, "pixel": Pixel, "feature": Feature}


class CyCADA:
    """The registry's ``cycada``: ``CyCADA(config)`` is the method of ``config.stage``
    (:class:`Pretrain`, :class:`Pixel` or :class:`Feature`); :meth:`stage_configs` splits
    ``stage='all'`` into the three runs, which ``trainer.train`` trains in order."""

    def __new__(cls, config):
        if config.stage not in STAGES:
            raise ValueError(
                f"a CyCADA run trains one stage of {STAGES}, got stage={config.stage!r} "
                "('all' is run stage by stage by trainer.train)"
            )
        return STAGE_METHODS[config.stage](config)

    @classmethod
    def stage_configs(cls, config, workdir):
        """``[(stage, config)]`` of ``config.stage`` (all three for 'all'), for trainer.train."""
        total = sum(int(config.stage_steps[s]) for s in STAGES)
        if int(config.num_train_steps) != total:
            raise ValueError(
                f"config.num_train_steps={config.num_train_steps} but CyCADA's step counts are "
                f"config.stage_steps (sum {total}); set --config.stage_steps.<stage>=N instead"
            )
        stages = STAGES if config.stage == "all" else (config.stage,)
        return [(s, stage_config(config, s, workdir)) for s in stages]
