"""CC-GAN (Denton, Gross, Fergus 2016): semi-supervised learning with context-conditional GANs.

A generator ``G`` in-paints a square hole cut out of an *unlabelled* image from
the pixels around it (a context encoder); a discriminator ``D`` judges whether
an image is real or in-painted and, through a second head, classifies it. The
adversarial in-painting task regularises ``D``'s features, which the handful of
labelled images alone would overfit. With ``m`` the hole mask (1 in the hole),

    x_I = (1 - m) * x + m * G((1 - m) * x + c * m, m [, x_low])      (in-filled image)

    min_G max_D   E_x[log D(x)] + E_x[log(1 - D(x_I))]                (x unlabelled)
    + lambda_c E_{(x, y) labelled}[log D_c(y | x)]                      (D's class head)

(``c`` the fill value, ``x_low`` the optional low-resolution full image of the
paper's CC-GAN^2). That the in-painting game "acts as a regularizer for standard
supervised training of the discriminator" is the paper's abstract; the formula
is the objective as implemented here, not checked against the paper's text.
Holes are random squares of side ``model.hole_size``, their position drawn
uniformly per example from the step's RNG on the device. As in a context
encoder, G also minimises the L2 error inside the hole.

One iteration (every phase sees the parameters the phases before it produced):

1. **D phase** (updates ``D``). Draw this iteration's holes and in-fill the
   unlabelled batch with the current G, then, with ``w_dadv = loss.d_adv_weight`` and
   ``w_c = loss.class_weight``,

   L_D = w_dadv [BCE(D(x_u), 1) + BCE(D(x_I), 0)] + w_c CE(D_c(x_l), y_l)

   on D's *logits* (the class head's logits go straight into the cross-entropy).
2. **G phase** (updates ``G``; D frozen at its new value). The same holes, so
   the same in-filling (G has not changed; one generated batch per iteration, as
   in the references, and XLA computes G's forward pass once), then the
   non-saturating generator loss and the masked L2 reconstruction loss
   (``losses.masked_l2``: mean squared error over the hole's pixels only):

   L_G = w_adv BCE(D(x_I), 1) + w_rec |m * (G(...) - x_u)|^2 / |m|

Baseline ``supervised_only`` (a phase the engine adds; updates ``D_sup``): the same
   network as D with the same initial weights, the same labelled batches, the
   same number of steps and optimiser hyper-parameters (D's block), trained on
   ``w_c CE(D_sup_c(x_l), y_l)`` alone: the D phase without its adversarial term.
   It never sees an unlabelled image, so ``eval/test_accuracy`` (D) next to
   ``eval/supervised_only_accuracy`` (D_sup) measures what the unlabelled data
   and the in-painting game add.

Evaluation (``Method.evaluate``, on the held-out labelled *test* split):
``eval/test_accuracy`` and ``eval/supervised_only_accuracy`` (top-1 of the class
heads), ``eval/ssl_gain`` (their difference), ``eval/masked_l2`` (mean squared
error inside the hole of G's in-filling, images in [-1, 1]) and
``eval/hole_psnr`` (PSNR of the hole region, dB, mean over images), next to the
same two numbers for a fill with the mean colour of the image's visible
context (``eval/mean_fill_*``). Each test image gets one fixed hole (seeded), so
numbers are comparable across steps and runs.

Networks (NHWC): G is an encoder-decoder: ``n_down`` stride-2 4x4 convs
(LeakyReLU 0.2, BatchNorm after the first) to a small map, a 3x3 bottleneck conv,
stride-2 4x4 transposed convs back up (BatchNorm, ReLU) and tanh. Its input is
the masked image plus the mask as a fourth channel; with ``model.lowres_factor
= f > 0`` the full image average-pooled by ``f`` is concatenated to the encoder
features of the same size (CC-GAN^2; the reference does f = 4, after two
downsamplings). D is a VGG-style stack: per stage ``convs_per_stage - 1``
stride-1 3x3 convs and one stride-2 4x4 conv, LeakyReLU 0.2, optional
instance norm and dropout, then two dense heads on the flattened features: one
adversarial logit and ``num_classes`` class logits.

Departures from the references (the audit: ``docs/ccgan.md``):

- PyTorch-GAN's ccgan has no class head (nothing semi-supervised): the class head, labelled
  stream, baseline and evaluation follow the paper; the hole's L2 term is the context
  encoder's (Pathak et al. 2016).
- BatchNorm eps 1e-5, not the reference's 0.8.
- D sees the in-filled image x_I (real context, G's pixels in the hole), not G's raw output.
- The hole is filled with ``model.fill_value`` and the mask is an input channel; every hole
  position is drawn, on the device.
- The GAN log loss by default (``loss.gan='lsgan'``: the reference's); D is updated first,
  each phase with its own forward pass (no gradient through a graph made before an update).
- D's class head returns logits (no softmax before the cross-entropy, PyTorch-GAN sgan's bug).
- G is deterministic (no dropout, no z).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ganda_jax import engine, losses
from ganda_jax.metrics import evaluation, image_metrics
from ganda_jax.nets.layers import FAST, BatchNorm, ConvTranspose, Dtype, make_norm

# Random draws are made flat and reshaped: the same distributions, but XLA:CPU compiles the
# threefry generator for a rank-2..4 shape several times slower than for a rank-1 one
# (measured here: ~2.7 s vs ~0.4 s of compile time per draw), which dominates small runs.


def flat_normal_init(stddev: float = 0.02):
    """N(0, stddev^2) weights (the DCGAN init of :data:`ganda_jax.nets.layers.conv_init`), drawn flat."""

    def init(key, shape, dtype=jnp.float32):
        return stddev * jax.random.normal(key, (math.prod(shape),), dtype).reshape(shape)

    return init


conv_init = flat_normal_init(0.02)


def conv(features: int, kernel: int, stride: int = 1, padding: int = 0, *, dtype) -> nn.Conv:
    """A conv with zero padding and the N(0, 0.02) init (as :class:`ganda_jax.nets.layers.Conv`)."""
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        kernel_init=conv_init,
        dtype=dtype,
        **FAST,
    )


def dropout(module: nn.Module, x: jax.Array, rate: float, *, train: bool) -> jax.Array:
    """Inverted dropout with a flat Bernoulli draw (as ``nn.Dropout``); identity at eval."""
    if not train or rate == 0.0:
        return x
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, (x.size,))
    return jnp.where(keep.reshape(x.shape), x / (1.0 - rate), 0.0).astype(x.dtype)


# ---------------------------------------------------------------------------
# Holes
# ---------------------------------------------------------------------------


def hole_corners(rng: jax.Array, n: int, image_size: int, hole_size: int) -> jax.Array:
    """Top-left ``(y, x)`` of one square hole per example, uniform over all positions.

    int32 ``[n, 2]`` in ``[0, image_size - hole_size]`` (both ends included).
    """
    corners = jax.random.randint(rng, (2 * n,), 0, image_size - hole_size + 1, dtype=jnp.int32)
    return corners.reshape(n, 2)


def hole_mask(corners: jax.Array, image_size: int, hole_size: int) -> jax.Array:
    """float32 ``[n, S, S, 1]``: 1 inside each example's ``hole_size`` square, 0 elsewhere."""
    pos = jnp.arange(image_size)
    y0, x0 = corners[:, 0, None], corners[:, 1, None]
    rows = (pos >= y0) & (pos < y0 + hole_size)  # [n, S]
    cols = (pos >= x0) & (pos < x0 + hole_size)
    return (rows[:, :, None] & cols[:, None, :]).astype(jnp.float32)[..., None]


def crop_holes(x: jax.Array, corners: jax.Array, hole_size: int) -> jax.Array:
    """The hole regions ``[n, s, s, C]`` of images ``x [n, S, S, C]``."""
    c = x.shape[-1]
    return jax.vmap(
        lambda img, yx: jax.lax.dynamic_slice(img, (yx[0], yx[1], 0), (hole_size, hole_size, c))
    )(x, corners)


def downsample(x: jax.Array, factor: int) -> jax.Array:
    """Average pooling by ``factor`` (the low-resolution image of CC-GAN^2)."""
    b, h, w, c = x.shape
    return x.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


# ---------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------


class ContextEncoder(nn.Module):
    """G: masked image + mask (+ low-resolution full image) -> image in [-1, 1]."""

    ngf: int = 64
    n_down: int = 3
    out_channels: int = 3
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, masked, mask, lowres=None, *, train: bool):
        h = jnp.concatenate([masked, mask], axis=-1).astype(self.dtype)
        used_lowres = lowres is None
        for i in range(self.n_down):
            h = conv(self.ngf * 2**i, 4, 2, 1, dtype=self.dtype)(h)
            if i > 0:
                h = BatchNorm(dtype=self.dtype)(h, train=train)
            h = nn.leaky_relu(h, 0.2)
            if not used_lowres and h.shape[1] == lowres.shape[1]:
                h = jnp.concatenate([h, lowres.astype(self.dtype)], axis=-1)
                used_lowres = True
        if not used_lowres:
            raise ValueError(
                f"the low-resolution image ({lowres.shape[1]} px) matches no encoder level "
                f"of a {masked.shape[1]} px input with n_down={self.n_down}"
            )
        # A 3x3 conv at the bottleneck lets every hole position see the whole (small) map.
        h = conv(self.ngf * 2 ** (self.n_down - 1), 3, 1, 1, dtype=self.dtype)(h)
        h = nn.relu(BatchNorm(dtype=self.dtype)(h, train=train))
        for i in reversed(range(self.n_down)):
            features = self.ngf * 2 ** (i - 1) if i > 0 else self.out_channels
            h = ConvTranspose(
                features,
                (4, 4),
                strides=(2, 2),
                padding="SAME",
                kernel_init=conv_init,
                dtype=self.dtype,
            )(h)
            if i > 0:
                h = nn.relu(BatchNorm(dtype=self.dtype)(h, train=train))
        return jnp.tanh(h)


class Discriminator(nn.Module):
    """D: VGG-style convs, then an adversarial logit ``[B]`` and class logits ``[B, K]``."""

    features: Sequence[int] = (64, 128, 256)
    convs_per_stage: int = 1
    num_classes: int = 10
    norm: str = "none"
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        h = x.astype(self.dtype)
        for i, f in enumerate(self.features):
            for _ in range(self.convs_per_stage - 1):
                h = conv(f, 3, 1, 1, dtype=self.dtype)(h)
                h = nn.leaky_relu(make_norm(self.norm, self.dtype)(h) if i > 0 else h, 0.2)
            h = conv(f, 4, 2, 1, dtype=self.dtype)(h)
            h = nn.leaky_relu(make_norm(self.norm, self.dtype)(h) if i > 0 else h, 0.2)
            h = dropout(self, h, self.dropout, train=train)
        h = h.reshape(h.shape[0], -1)
        adv = nn.Dense(1, kernel_init=conv_init, dtype=self.dtype)(h)
        logits = nn.Dense(self.num_classes, kernel_init=conv_init, dtype=self.dtype)(h)
        return adv[:, 0].astype(jnp.float32), logits.astype(jnp.float32)


# ---------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------


class CCGAN(engine.Method):
    name = "ccgan"
    data_task = "semi"
    players = {"G": "G", "D": "D"}
    # D_sup: D's architecture, initial weights and optimizer settings, trained on the
    # labelled images only; the baseline differs only by the unlabelled data.
    baselines = (
        engine.Baseline(
            "supervised_only",
            {"D_sup": "D"},
            inputs=("labeled", "label"),
            metrics=("eval/supervised_only_", "eval/ssl_gain"),
        ),
    )

    def __init__(self, config):
        super().__init__(config)
        m, size = config.model, config.image_size
        if not 0 < m.hole_size < size:
            raise ValueError(f"model.hole_size must be in (0, {size}), got {m.hole_size}")
        f = m.lowres_factor
        if f and (size % f or f not in [2**i for i in range(1, m.n_down + 1)]):
            raise ValueError(
                f"model.lowres_factor={f} must be 0 (off) or 2**k with 1 <= k <= "
                f"n_down={m.n_down}, dividing image_size={size}"
            )
        self.G = ContextEncoder(ngf=m.ngf, n_down=m.n_down, dtype=self.dtype)
        self.D = Discriminator(
            features=tuple(m.d_features),
            convs_per_stage=m.d_convs_per_stage,
            num_classes=config.data.num_classes,
            norm=m.norm_D,
            dropout=m.dropout_D,
            dtype=self.dtype,
        )

    # --- data -----------------------------------------------------------------
    def prepare(self, batch):
        return {
            "labeled": image_metrics.from_uint8(batch["labeled"]["image"], jnp.float32),
            "label": batch["labeled"]["label"],
            "unlabeled": image_metrics.from_uint8(batch["unlabeled"]["image"], jnp.float32),
        }

    def step_inputs(self, rng, batch, extra):
        # This iteration's holes, shared by the D and G phases (D's dropout key is the other
        # half of its own key).
        return {"corners": self.holes(jax.random.split(rng)[0], batch["unlabeled"].shape[0])}

    # --- model ----------------------------------------------------------------
    def init(self, rng, batch):
        k_g, k_d = jax.random.split(rng)
        x = batch["unlabeled"][:1]
        corners = jnp.zeros((1, 2), jnp.int32)
        mask = hole_mask(corners, self.config.image_size, self.config.model.hole_size)
        g = self.G.init(k_g, x, mask, self.lowres(x), train=False)
        params = {"G": g["params"], "D": self.D.init(k_d, x, train=False)["params"]}
        return params, {"G": {"batch_stats": g["batch_stats"]}}, {}

    def lowres(self, x):
        f = self.config.model.lowres_factor
        return downsample(x, f) if f else None

    def holes(self, rng, n: int):
        return hole_corners(rng, n, self.config.image_size, self.config.model.hole_size)

    def inpaint(self, params, g_state, x, corners, *, train: bool):
        """``(x_I, G's raw output, mask, G's new state)`` for float32 images ``x`` in [-1, 1].

        ``train=True`` normalises with batch statistics (and returns the updated
        running averages); ``train=False`` uses the running averages.
        """
        m = self.config.model
        mask = hole_mask(corners, self.config.image_size, m.hole_size)
        masked = x * (1.0 - mask) + m.fill_value * mask
        args = (masked, mask, self.lowres(x))
        out, new = engine.apply(self.G, params, {"G": g_state}, "G", *args, train=train)
        out = out.astype(jnp.float32)
        return x * (1.0 - mask) + out * mask, out, mask, new

    def discriminate(self, params, x, *, train: bool = False, rng=None):
        """``(adversarial logits [B], class logits [B, K])``; ``rng``: dropout key (train)."""
        return engine.apply(self.D, params, {}, "D", x, train=train, rng=rng)[0]

    def phases(self):
        return (
            engine.Phase("D", ("D",), self.discriminator_loss),
            engine.Phase("G", ("G",), self.generator_loss),
        )

    def discriminator_loss(self, params, inp: engine.PhaseInputs):
        cfg, b = self.config.loss, inp.batch
        _, k_drop = jax.random.split(inp.rng)
        x_u, x_l = b["unlabeled"], b["labeled"]
        n = x_u.shape[0]
        corners = inp.draws["corners"]
        # G's statistics are updated by the G phase only (once per step).
        filled, _, _, _ = self.inpaint(params, inp.model_state["G"], x_u, corners, train=True)
        filled = jax.lax.stop_gradient(filled)
        # D's layers are per-example (no batch norm), so one pass over the three batches
        # computes exactly what three passes would.
        adv, logits = self.discriminate(
            params, jnp.concatenate([x_u, filled, x_l]), train=True, rng=k_drop
        )
        real_adv, fake_adv, class_logits = adv[:n], adv[n : 2 * n], logits[2 * n :]
        loss_adv = losses.gan_discriminator_loss(
            real_logits=real_adv, fake_logits=fake_adv, loss_type=cfg.gan
        )
        ce = losses.softmax_cross_entropy(logits=class_logits, labels=b["label"])
        metrics = {
            "D/adv": loss_adv,
            "D/class_ce": ce,
            "D/train_labeled_acc": losses.accuracy(logits=class_logits, labels=b["label"]),
            "D/real_logit": jnp.mean(real_adv),
            "D/fake_logit": jnp.mean(fake_adv),
        }
        loss = cfg.d_adv_weight * loss_adv + cfg.class_weight * ce
        return loss, engine.Out(metrics=metrics)

    def generator_loss(self, params, inp: engine.PhaseInputs):
        cfg, x_u = self.config.loss, inp.batch["unlabeled"]
        _, k_drop = jax.random.split(inp.rng)
        # The D phase's holes: with G unchanged by that phase, its in-filling and this forward
        # pass are one computation, which XLA does once.
        filled, out, mask, g_state = self.inpaint(
            params, inp.model_state["G"], x_u, inp.draws["corners"], train=True
        )
        fake_adv, _ = self.discriminate(params, filled, train=True, rng=k_drop)
        adv = losses.gan_generator_loss(fake_logits=fake_adv, loss_type=cfg.gan)
        rec = losses.masked_l2(x=out, y=x_u, mask=mask)
        loss = cfg.adv_weight * adv + cfg.rec_weight * rec
        metrics = {"G/adv": adv, "G/masked_l2": rec}
        return loss, engine.Out(metrics=metrics, model_state={"G": g_state})

    def supervised_loss(self, params, inp, images, labels):
        """D's class head on labelled images only (its loss weight as in the D phase)."""
        _, logits = self.discriminate(params, images, train=True, rng=inp.rng)
        ce = losses.softmax_cross_entropy(logits=logits, labels=labels)
        acc = losses.accuracy(logits=logits, labels=labels)
        metrics = {"class_ce": ce, "train_labeled_acc": acc}
        return self.config.loss.class_weight * ce, engine.Out(metrics=metrics)

    # --- evaluation -------------------------------------------------------------
    def eval_holes(self, n: int) -> np.ndarray:
        """One fixed hole per test image (seeded by ``data.seed``), int32 ``[n, 2]``."""
        size, hole = self.config.image_size, self.config.model.hole_size
        rng = np.random.default_rng([self.config.data.seed, 0xC0C0])
        return rng.integers(0, size - hole + 1, (n, 2)).astype(np.int32)

    @functools.cached_property
    def _eval_fn(self):
        # One function object per method: batched_apply caches its compilation by it.
        return self._per_example_metrics

    def _per_example_metrics(self, params, batch):
        """Class hits of D and D_sup, and hole errors of G and of the mean-colour fill."""
        x = image_metrics.from_uint8(batch["image"], jnp.float32)
        out = {}
        (baseline,) = self.baselines
        for name, p in (
            ("ccgan", params),
            ("supervised_only", engine.copy_params(params, baseline)),
        ):
            _, logits = self.discriminate(p, x)
            out[f"{name}_hit"] = jnp.argmax(logits, axis=-1) == batch["label"]
        corners, hole = batch["hole"], self.config.model.hole_size
        filled, _, mask, _ = self.inpaint(params, params["G_state"], x, corners, train=False)
        context = 1.0 - mask
        mean = jnp.sum(x * context, axis=(1, 2), keepdims=True) / jnp.sum(
            context, axis=(1, 2), keepdims=True
        )
        mean_fill = x * context + mean * mask
        per_image_l2 = jax.vmap(lambda a, b, m: losses.masked_l2(x=a, y=b, mask=m))
        real_crop = crop_holes(x, corners, hole)
        for name, y in (("ccgan", filled), ("mean_fill", mean_fill)):
            out[f"{name}_l2"] = per_image_l2(y, x, mask)
            out[f"{name}_psnr"] = image_metrics.psnr_per_image(
                x=crop_holes(y, corners, hole), y=real_crop
            )
        return out

    def evaluate(self, state, mesh):
        """Accuracies of D and D_sup, and in-filling error, on the held-out test split."""
        cfg = self.config
        split = self.data.test_split("domain")
        params = {p: state.params[p] for p in ("G", "D", "D_sup")}
        params["G_state"] = state.model_state["G"]
        out = evaluation.batched_apply(
            self._eval_fn,
            params,
            {
                "image": split["image"],
                "label": split["label"],
                "hole": self.eval_holes(len(split["label"])),
            },
            mesh=mesh,
            batch_size=cfg.eval_batch_size,
        )
        acc, acc_sup = float(np.mean(out["ccgan_hit"])), float(np.mean(out["supervised_only_hit"]))
        return {
            "eval/test_accuracy": acc,
            "eval/supervised_only_accuracy": acc_sup,
            "eval/ssl_gain": acc - acc_sup,
            "eval/masked_l2": float(np.mean(out["ccgan_l2"])),
            "eval/hole_psnr": float(np.mean(out["ccgan_psnr"])),
            "eval/mean_fill_masked_l2": float(np.mean(out["mean_fill_l2"])),
            "eval/mean_fill_hole_psnr": float(np.mean(out["mean_fill_psnr"])),
        }

    @functools.cached_property
    def _inpaint_fn(self):
        return jax.jit(
            lambda params, g_state, x, corners: self.inpaint(
                params, g_state, x, corners, train=False
            )[:3]
        )

    def samples(self, state, batch):
        """Rows: masked test images (the hole in the fill value), G's in-filling, the real ones."""
        from ganda_jax.train.writers import image_grid

        cfg, n = self.config, 8
        split = self.data.test_split("domain")
        real = split["image"][:n]
        corners = self.eval_holes(len(split["label"]))[:n]
        p, ms = jax.device_get(state.params), jax.device_get(state.model_state)
        x = image_metrics.from_uint8(real, np.float32)
        filled, _, mask = (np.asarray(a) for a in self._inpaint_fn(p, ms["G"], x, corners))
        masked = x * (1.0 - mask) + cfg.model.fill_value * mask
        return {"masked_infilled_real": image_grid([masked, filled, real])}
