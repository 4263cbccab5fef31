"""GTA for segmentation (Sankaranarayanan, Balaji, Jain, Lim, Chellappa, CVPR 2018).

"Learning from Synthetic Data: Addressing Domain Shift for Semantic
Segmentation" (reference code: LSD-seg, github.com/swamiviv/LSD-seg). A
segmentation network is pushed to embed labelled synthetic (source) and
unlabelled real (target) images alike by a GAN that *reconstructs images from
the embedding*: the generator must make source-looking images from source
embeddings and target-looking images from target embeddings, while the
embedding network is trained so that the discriminator mistakes its
source-made images for real target images and vice versa.

Networks (NHWC, images in [-1, 1]):

- ``F``, the embedding: a VGG-like stack of conv3x3-ReLU stages, each ending
  in a 2x2 max-pool, then "fc6/fc7" convolutions. It returns the embedding
  ``F(x) = (pool_{n-2}, pool_{n-1}, fc7)`` (FCN-8s' pool3, pool4, fc7 with
  VGG-16's five stages).
- ``C``, the pixel-wise classifier: FCN-8s' head on ``F(x)`` (1x1 score
  convolutions on fc7, pool_{n-1}, pool_{n-2}, added coarse to fine), upsampled
  to the image size: logits ``[B, H, W, K]``.
- ``G``, the generator: decodes ``F(x)`` back to an image (up-convolutions with
  instance norm and residual blocks, concatenating the skip features, ``tanh``).
  There is no noise input: dropout in G's residual blocks is its randomness,
  as in the paper.
- ``D``, the discriminator: fully convolutional (a stride-2 conv, stages of
  residual blocks separated by max-pools) with two per-pixel heads at 1/8
  resolution: ``D_data``, a 4-way domain classifier over (src-real, src-fake,
  tgt-real, tgt-fake) = (0, 1, 2, 3), and ``D_cls``, a ``K``-way segmentation
  head used on source images only (ACGAN-style auxiliary classifier).

With ``CE`` the per-pixel softmax cross-entropy on logits (mean over pixels,
void pixels ``ignore_index`` excluded), ``y_s`` the source labels and
``y_s'`` their nearest down-sampling to D's resolution, ``g_s = G(F(x_s))``,
``g_t = G(F(x_t))``, one iteration updates, in this order, each phase seeing
the parameters the phases before it produced (everything is recomputed in
each phase):

1. **D phase** (updates ``D``)::

       L_D = CE(D_data(x_s), src-real) + CE(D_data(g_s), src-fake)
           + CE(D_data(x_t), tgt-real) + CE(D_data(g_t), tgt-fake)
           + w_aux_D CE(D_cls(x_s), y_s')

2. **G phase** (updates ``G``; within-domain adversarial, auxiliary and
   reconstruction losses)::

       L_G = w_adv_G [CE(D_data(g_s), src-real) + CE(D_data(g_t), tgt-real)]
           + w_aux_G CE(D_cls(g_s), y_s') + w_rec [|g_s - x_s|_1 + |g_t - x_t|_1]

3. **F phase** (updates ``F`` and ``C``; cross-domain adversarial losses: F is
   updated so that fake-source is judged real-target and fake-target
   real-source)::

       L_F = CE(C(F(x_s)), y_s) + w_adv_F [CE(D_data(g_s), tgt-real)
           + CE(D_data(g_t), src-real)] + w_aux_F CE(D_cls(g_s), y_s')

Baselines (phases the engine adds after F's, from the same initial weights, for the same
number of steps, with F's optimizer block: the same settings by construction):

- ``source_only`` (updates ``F_src``, ``C_src``): ``CE(C_src(F_src(x_s)), y_s)`` on the
  method's source batches only.
- ``oracle`` (updates ``F_oracle``, ``C_oracle``): ``CE(C_oracle(F_oracle(x_t)), y_t)`` on
  labelled *target* training images (the data's ``target_labeled`` stream, which the method
  never reads): the bound adaptation is measured against.

The run reports ``eval/miou`` and ``eval/pixel_accuracy`` (F, C) next to their
``eval/source_only_*`` and ``eval/oracle_*`` counterparts, the per-class IoUs
``eval/iou/<class>`` (and the baselines'), and ``eval/gap_closed = (miou -
source_only_miou) / (oracle_miou - source_only_miou)``, all on the held-out labelled target
*test* split (never seen in training).

Weights (``config.loss``): ``seg_weight`` (1), ``aux_D`` (1), ``adv_G`` (0.1),
``aux_G`` (1), ``rec`` (1), ``adv_F`` (0.1), ``aux_F`` (0.1). These are the
reference code's values (train.py: ``l1_weight=1``, ``adv_weight=0.1``,
``c_weight=0.1``; trainer_LSD.py: D's terms all 1, G's adversarial terms 0.1
and its auxiliary term 1). The loss weights printed in the paper itself were
not checked here.

Departures from the reference code (LSD-seg; the audit: ``docs/gta_seg.md``):

- Each phase recomputes its forward passes with the current parameters (the reference steps
  D, G and F on graphs made before the D update).
- Every loss term is a mean over valid pixels (the reference sums over pixels, which weights
  each term by its resolution).
- F is trained from scratch with SAME padding (no ImageNet VGG-16 offline) and C upsamples
  bilinearly; G ends in ``tanh`` for [-1, 1] images; one Adam learning rate for F.
- 'rbg' keys for initial weights and dropout (faster XLA:CPU compiles); evaluation on the
  target test split only.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ganda_jax import engine, losses
from ganda_jax.metrics import classify_eval, image_metrics, seg_eval
from ganda_jax.nets.layers import Conv, ConvTranspose, Dtype, InstanceNorm, conv_init, max_pool

#: D_data's four per-pixel domain classes.
SRC_REAL, SRC_FAKE, TGT_REAL, TGT_FAKE = 0, 1, 2, 3


def rbg_key(rng):
    """A key drawing its bits with XLA's RngBitGenerator ('rbg'), made from a threefry key.

    With threefry keys every dropout layer and every initialiser becomes an
    unrolled hash that XLA on CPU compiles very slowly (here: the step compiled
    ~2x, the initialisation ~5x faster with 'rbg'). Still deterministic on a
    given backend: masks per (step, phase), weights per seed.
    """
    return jax.random.wrap_key_data(jax.random.bits(rng, (4,), jnp.uint32), impl="rbg")


def _resize(x, hw: tuple[int, int]):
    """Bilinear resize of the spatial axes of an NHWC tensor."""
    if tuple(x.shape[1:3]) == tuple(hw):
        return x
    return jax.image.resize(x, (x.shape[0], *hw, x.shape[-1]), method="bilinear")


def downsample_labels(labels, hw: tuple[int, int]):
    """Nearest down-sampling of ``[B, H, W]`` class maps to ``hw`` (the centre pixel of each cell).

    Never blends class ids; ``ignore_index`` pixels stay ignored.
    """
    h, w = labels.shape[1:3]
    sh, sw = h // hw[0], w // hw[1]
    return labels[:, sh // 2 :: sh, sw // 2 :: sw][:, : hw[0], : hw[1]]


class Encoder(nn.Module):
    """F: VGG-like stages of [conv3x3-ReLU] x n + max-pool, then fc6/fc7 as convolutions.

    Returns ``(pool_{n-2}, pool_{n-1}, fc7)``: strides 2^(n-2), 2^(n-1), 2^n.
    """

    features: Sequence[int] = (64, 128, 256, 512, 512)
    convs: Sequence[int] = (2, 2, 3, 3, 3)
    fc_features: int = 4096
    fc_kernel: int = 7
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        if len(self.features) != len(self.convs) or len(self.features) < 3:
            raise ValueError("Encoder needs >= 3 stages and one conv count per stage")
        h = x.astype(self.dtype)
        pools = []
        for f, n in zip(self.features, self.convs):
            for _ in range(n):
                h = nn.relu(Conv(f, 3, padding=1, dtype=self.dtype)(h))
            h = max_pool(h, 2)
            pools.append(h)
        for k in (self.fc_kernel, 1):  # fc6, fc7
            h = nn.relu(Conv(self.fc_features, k, padding="SAME", dtype=self.dtype)(h))
            # Channel dropout like PyTorch's Dropout2d in FCN-8s.
            h = nn.Dropout(self.dropout, broadcast_dims=(1, 2), deterministic=not train)(h)
        return pools[-3], pools[-2], h


class PixelClassifier(nn.Module):
    """C: FCN-8s head; float32 logits ``[B, H, W, num_classes]`` at ``out_hw``."""

    num_classes: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, embedding, out_hw: tuple[int, int]):
        pool_a, pool_b, fc = embedding
        score = lambda h: Conv(self.num_classes, 1, dtype=self.dtype)(h)
        s = score(fc)
        for skip in (pool_b, pool_a):
            s = _resize(s, skip.shape[1:3]) + score(skip)
        return _resize(s.astype(jnp.float32), out_hw)


class ResidualBlock(nn.Module):
    """The reference's block: ``x + dropout(act(instance_norm(conv3x3(x))))``."""

    features: int
    dropout: float = 0.5
    leaky: bool = False
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        y = Conv(self.features, 3, padding=1, use_bias=self.use_bias, dtype=self.dtype)(x)
        y = InstanceNorm(dtype=self.dtype)(y)
        y = nn.leaky_relu(y, 0.2) if self.leaky else nn.relu(y)
        return x + nn.Dropout(self.dropout, deterministic=not train)(y)


class Generator(nn.Module):
    """G: decodes ``F(x)`` to an image in [-1, 1] of size ``out_hw``.

    From fc7: conv-IN-ReLU + blocks; up x2 to pool_{n-1}, concat; up x2 to
    pool_{n-2}, concat; then up x2 (halving the width, not below ``ngf``) until
    the image size; conv3x3 and tanh. Every up step is a stride-2 transposed
    conv, instance norm, ReLU and ``n_blocks`` residual blocks with dropout.
    """

    ngf: int = 64
    n_blocks: int = 2
    dropout: float = 0.5
    dtype: Dtype = jnp.float32

    def _stage(self, h, features: int, *, up: bool, train: bool):
        if up:
            h = ConvTranspose(
                features,
                (3, 3),
                strides=(2, 2),
                padding="SAME",
                use_bias=False,
                kernel_init=conv_init,
                dtype=self.dtype,
            )(h)
        else:
            h = Conv(features, 3, padding=1, use_bias=False, dtype=self.dtype)(h)
        h = nn.relu(InstanceNorm(dtype=self.dtype)(h))
        for _ in range(self.n_blocks):
            h = ResidualBlock(features, self.dropout, use_bias=False, dtype=self.dtype)(
                h, train=train
            )
        return h

    @nn.compact
    def __call__(self, embedding, out_hw: tuple[int, int], *, train: bool):
        pool_a, pool_b, fc = (e.astype(self.dtype) for e in embedding)
        mult = 8
        h = self._stage(fc, self.ngf * mult, up=False, train=train)
        for skip in (pool_b, pool_a):
            h = self._stage(h, self.ngf * mult, up=True, train=train)
            h = jnp.concatenate([h, skip], axis=-1)
            mult = max(mult // 2, 1)
        while h.shape[1] < out_hw[0]:
            h = self._stage(h, self.ngf * mult, up=True, train=train)
            mult = max(mult // 2, 1)
        h = Conv(3, 3, padding=1, dtype=self.dtype)(h)
        return jnp.tanh(h.astype(jnp.float32))


class Discriminator(nn.Module):
    """D: conv4x4/2-IN-LReLU, ``n_stages`` x [``n_blocks`` residual blocks], max-pools between.

    Returns float32 ``(domain_logits [B, h, w, 4], class_logits [B, h, w, K])``
    at stride ``2 ** n_stages`` (8 with the reference's 3 stages).
    """

    num_classes: int
    features: int = 128
    n_stages: int = 3
    n_blocks: int = 3
    dropout: float = 0.5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        h = Conv(self.features, 4, stride=2, padding=1, dtype=self.dtype)(x)
        h = nn.leaky_relu(InstanceNorm(dtype=self.dtype)(h), 0.2)
        for stage in range(self.n_stages):
            if stage:
                h = max_pool(h, 2)
            for _ in range(self.n_blocks):
                h = ResidualBlock(self.features, self.dropout, leaky=True, dtype=self.dtype)(
                    h, train=train
                )
        domain = Conv(4, 3, padding=1, dtype=self.dtype)(h)
        cls = Conv(self.num_classes, 3, padding=1, dtype=self.dtype)(h)
        return domain.astype(jnp.float32), cls.astype(jnp.float32)


class GTASeg(engine.Method):
    name = "gta_seg"
    data_task = "segment"
    # F and C (and the baseline's copies F_src, C_src) share one optimizer block.
    players: ClassVar[dict[str, str]] = {"F": "F", "C": "F", "G": "G", "D": "D"}
    baselines = (engine.source_only("F", "C"), engine.target_oracle("F", "C"))

    def __init__(self, config):
        super().__init__(config)
        m, d = config.model, config.data
        self.num_classes = d.num_classes
        self.ignore_index = d.ignore_index
        self.F = Encoder(
            features=tuple(m.f_features),
            convs=tuple(m.f_convs),
            fc_features=m.f_fc,
            fc_kernel=m.f_fc_kernel,
            dropout=m.f_dropout,
            dtype=self.dtype,
        )
        self.C = PixelClassifier(num_classes=d.num_classes, dtype=self.dtype)
        self.G = Generator(ngf=m.ngf, n_blocks=m.g_blocks, dropout=m.g_dropout, dtype=self.dtype)
        self.D = Discriminator(
            num_classes=d.num_classes,
            features=m.d_features,
            n_stages=m.d_stages,
            n_blocks=m.d_blocks,
            dropout=m.d_dropout,
            dtype=self.dtype,
        )

    # --- data -----------------------------------------------------------------
    prepare = staticmethod(engine.adaptation_batch)

    # --- model ----------------------------------------------------------------
    def init(self, rng, batch):
        k_f, k_c, k_g, k_d = jax.random.split(rbg_key(rng), 4)
        x = batch["source"][:1]
        hw = x.shape[1:3]
        f = self.F.init(k_f, x, train=False)["params"]
        emb = self.F.apply({"params": f}, x, train=False)
        c = self.C.init(k_c, emb, hw)["params"]
        params = {
            "F": f,
            "C": c,
            "G": self.G.init(k_g, emb, hw, train=False)["params"],
            "D": self.D.init(k_d, x, train=False)["params"],
        }
        return params, {}, {}

    @staticmethod
    def _apply(module, params, player, *args, rng=None):
        """``module`` of ``player``, in training mode (dropout keys from ``rng``) iff ``rng``."""
        train = rng is not None
        key = rbg_key(rng) if train else None
        return engine.apply(module, params, {}, player, *args, train=train, rng=key)[0]

    def embed(self, params, x, *, rng=None):
        return self._apply(self.F, params, "F", x, rng=rng)

    def segment(self, params, x, *, rng=None):
        """Per-pixel float32 logits ``C(F(x))`` (``rng``: training-mode dropout)."""
        emb = self.embed(params, x, rng=rng)
        return self.C.apply({"params": params["C"]}, emb, x.shape[1:3])

    def generate(self, params, embedding, hw, *, rng=None):
        return self._apply(self.G, params, "G", embedding, hw, rng=rng)

    def discriminate(self, params, x, *, rng=None):
        return self._apply(self.D, params, "D", x, rng=rng)

    def phases(self):
        return (
            engine.Phase("D", ("D",), self.discriminator_loss),
            engine.Phase("G", ("G",), self.generator_loss),
            engine.Phase("F", ("F", "C"), self.embedding_loss),
        )

    # Source and target go through F, G and D as one batch: every layer acts per
    # image (instance norm, no batch statistics), so this is exact and cheaper.
    def _both(self, b):
        return jnp.concatenate([b["source"], b["target"]], axis=0)

    def _fakes(self, params, x, rng):
        """``(g, embedding)`` for the stacked batch ``x``, with F and G in training mode."""
        k_f, k_g = jax.random.split(rng)
        emb = self.embed(params, x, rng=k_f)
        return self.generate(params, emb, x.shape[1:3], rng=k_g), emb

    def _ce(self, logits, labels):
        return losses.softmax_cross_entropy(
            logits=logits, labels=labels, ignore_index=self.ignore_index
        )

    def _domain_ce(self, logits, domain: int):
        return losses.softmax_cross_entropy(
            logits=logits, labels=jnp.full(logits.shape[:-1], domain, jnp.int32)
        )

    def discriminator_loss(self, params, inp: engine.PhaseInputs):
        cfg, b = self.config.loss, inp.batch
        n = b["source"].shape[0]
        k_fake, k_d = jax.random.split(inp.rng)
        x = self._both(b)
        fake, _ = self._fakes(params, x, k_fake)
        # One D pass over [x_s, x_t, g_s, g_t].
        dom, cls = self.discriminate(
            params, jnp.concatenate([x, jax.lax.stop_gradient(fake)]), rng=k_d
        )
        dom_src_real, dom_tgt_real, dom_src_fake, dom_tgt_fake = jnp.split(dom, 4)
        y_small = downsample_labels(b["label"], cls.shape[1:3])
        terms = {
            "D/src_real_ce": self._domain_ce(dom_src_real, SRC_REAL),
            "D/src_fake_ce": self._domain_ce(dom_src_fake, SRC_FAKE),
            "D/tgt_real_ce": self._domain_ce(dom_tgt_real, TGT_REAL),
            "D/tgt_fake_ce": self._domain_ce(dom_tgt_fake, TGT_FAKE),
        }
        aux = self._ce(cls[:n], y_small)
        loss = sum(terms.values()) + cfg.aux_D * aux
        labels = jnp.repeat(jnp.array([SRC_REAL, TGT_REAL, SRC_FAKE, TGT_FAKE]), n)
        acc = losses.accuracy(
            logits=dom, labels=jnp.broadcast_to(labels[:, None, None], dom.shape[:-1])
        )
        metrics = {**terms, "D/aux_ce": aux, "D/domain_acc": acc}
        return loss, engine.Out(metrics=metrics)

    def generator_loss(self, params, inp: engine.PhaseInputs):
        cfg, b = self.config.loss, inp.batch
        n = b["source"].shape[0]
        k_fake, k_d = jax.random.split(inp.rng)
        x = self._both(b)
        fake, _ = self._fakes(params, x, k_fake)
        dom, cls = self.discriminate(params, fake, rng=k_d)
        y_small = downsample_labels(b["label"], cls.shape[1:3])
        adv_src = self._domain_ce(dom[:n], SRC_REAL)  # within-domain: g_s should pass as x_s
        adv_tgt = self._domain_ce(dom[n:], TGT_REAL)
        aux = self._ce(cls[:n], y_small)
        rec_src = losses.l1(x=fake[:n], y=b["source"])
        rec_tgt = losses.l1(x=fake[n:], y=b["target"])
        loss = cfg.adv_G * (adv_src + adv_tgt) + cfg.aux_G * aux + cfg.rec * (rec_src + rec_tgt)
        metrics = {
            "G/adv_src_ce": adv_src,
            "G/adv_tgt_ce": adv_tgt,
            "G/aux_ce": aux,
            "G/rec_src_l1": rec_src,
            "G/rec_tgt_l1": rec_tgt,
        }
        return loss, engine.Out(metrics=metrics)

    def embedding_loss(self, params, inp: engine.PhaseInputs):
        cfg, b = self.config.loss, inp.batch
        n = b["source"].shape[0]
        k_f, k_g, k_d = jax.random.split(inp.rng, 3)
        x = self._both(b)
        emb = self.embed(params, x, rng=k_f)
        logits = self.C.apply({"params": params["C"]}, [e[:n] for e in emb], x.shape[1:3])
        fake = self.generate(params, emb, x.shape[1:3], rng=k_g)
        dom, cls = self.discriminate(params, fake, rng=k_d)
        y_small = downsample_labels(b["label"], cls.shape[1:3])
        seg_ce = self._ce(logits, b["label"])
        adv_src = self._domain_ce(dom[:n], TGT_REAL)  # cross-domain: g_s should pass as x_t
        adv_tgt = self._domain_ce(dom[n:], SRC_REAL)  # and g_t as x_s
        aux = self._ce(cls[:n], y_small)
        loss = cfg.seg_weight * seg_ce + cfg.adv_F * (adv_src + adv_tgt) + cfg.aux_F * aux
        metrics = {
            "F/seg_ce": seg_ce,
            "F/source_pixel_acc": losses.accuracy(
                logits=logits, labels=b["label"], ignore_index=self.ignore_index
            ),
            "F/adv_src_ce": adv_src,
            "F/adv_tgt_ce": adv_tgt,
            "F/aux_ce": aux,
        }
        return loss, engine.Out(metrics=metrics)

    def supervised_loss(self, params, inp, images, labels):
        logits = self.segment(params, images, rng=inp.rng)
        ce = self._ce(logits, labels)
        acc = losses.accuracy(logits=logits, labels=labels, ignore_index=self.ignore_index)
        metrics = {"seg_ce": ce, "source_pixel_acc": acc}
        return self.config.loss.seg_weight * ce, engine.Out(metrics=metrics)

    # --- evaluation -------------------------------------------------------------
    @functools.cached_property
    def _segment_fn(self):
        return seg_eval.make_segment_fn(  # 'adapted', 'source_only', 'oracle'
            engine.with_baselines(self.segment, self.baselines),
            num_classes=self.num_classes,
            ignore_index=self.ignore_index,
        )

    def evaluate(self, state, mesh):
        """mIoU, pixel accuracy and per-class IoU of F+C (adapted), F_src+C_src and the oracle.

        ``eval/miou``, ``eval/pixel_accuracy``, ``eval/iou/<class>``, their
        ``eval/source_only_*`` and ``eval/oracle_*`` counterparts on the target test split;
        ``eval/adaptation_gain`` = the mIoU difference against source only and
        ``eval/gap_closed`` = (miou - source_only_miou) / (oracle_miou - source_only_miou);
        ``eval/source_miou``, ``eval/source_only_source_miou`` on the source test split.
        """
        cfg = self.config
        params = {
            p: state.params[p] for p in ("F", "C", *(c for b in self.baselines for c in b.copies))
        }
        names = self.data.class_names()
        tgt, src = (
            seg_eval.miou(
                self._segment_fn,
                params,
                self.data.test_split(domain),
                mesh=mesh,
                batch_size=cfg.eval_batch_size,
            )
            for domain in ("target", "source")
        )
        adapted, source_only = tgt["adapted"]["miou"], tgt["source_only"]["miou"]
        return {
            **seg_eval.metric_dict(tgt["adapted"], prefix="eval/", class_names=names),
            **seg_eval.metric_dict(
                tgt["source_only"], prefix="eval/source_only_", class_names=names
            ),
            **seg_eval.metric_dict(tgt["oracle"], prefix="eval/oracle_", class_names=names),
            "eval/adaptation_gain": adapted - source_only,
            **classify_eval.gap_closed(adapted, source_only, tgt["oracle"]["miou"]),
            "eval/source_miou": src["adapted"]["miou"],
            "eval/source_only_source_miou": src["source_only"]["miou"],
        }

    @functools.cached_property
    def _sample_fn(self):
        def fn(params, x):
            emb = self.embed(params, x)
            recon = self.generate(params, emb, x.shape[1:3])
            logits = self.C.apply({"params": params["C"]}, emb, x.shape[1:3])
            logits_src = self.segment(engine.copy_params(params, self.baselines[0]), x)
            return recon, jnp.argmax(logits, -1), jnp.argmax(logits_src, -1)

        return jax.jit(fn)

    def samples(self, state, batch):
        """Per domain, rows: test images, G(F(x)), true masks, F+C masks, source-only masks."""
        from ganda_jax.train.writers import image_grid

        n, k = 8, self.num_classes
        p = jax.device_get(state.params)
        out = {}
        for domain in ("source", "target"):
            split = self.data.test_split(domain)
            images, labels = split["image"][:n], split["label"][:n]
            recon, pred, pred_src = self._sample_fn(p, image_metrics.from_uint8(images))
            rows = [
                images,
                np.asarray(recon),
                seg_eval.colorize(labels, k),
                seg_eval.colorize(np.asarray(pred), k),
                seg_eval.colorize(np.asarray(pred_src), k),
            ]
            out[f"{domain}_recon_masks"] = image_grid(rows)
        return out
