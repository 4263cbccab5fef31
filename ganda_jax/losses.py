"""Loss functions for GAN domain adaptation and unpaired image translation.

Conventions shared by every function in this module:

* **Keyword-only arguments** (``l1(x=a, y=b)``), so the order of "real" and
  "fake" or "prediction" and "target" can never be swapped by accident.
* **Any shape.** Inputs may have any shape (a global discriminator gives
  ``[B, 1]`` logits, a PatchGAN ``[B, H, W, 1]``); every loss reduces to a
  **scalar mean** over all elements unless documented otherwise.
* **float32 math.** Inputs are cast with ``.astype(jnp.float32)`` before any
  arithmetic, so the result is a float32 scalar even when the model runs in
  bfloat16 (a bf16 mean over a large PatchGAN map loses most of its precision).
* **Pure functions** of ``jax.Array`` / ``np.ndarray`` inputs, all
  ``jax.jit``- and ``jax.grad``-compatible. String options (``loss_type``,
  ``distance``) are Python values and must be static under ``jit``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

Array = jax.Array

__all__ = [
    "DISTANCES",
    "GAN_LOSS_TYPES",
    "accuracy",
    "cycle_loss",
    "gan_discriminator_loss",
    "gan_generator_loss",
    "hinge_d",
    "hinge_g",
    "identity_loss",
    "l1",
    "l2",
    "least_squares",
    "masked_l2",
    "mse",
    "sigmoid_bce",
    "softmax_cross_entropy",
]

#: Valid ``loss_type`` values of :func:`gan_discriminator_loss` and
#: :func:`gan_generator_loss`. ``'bce'`` and ``'vanilla'`` are aliases of
#: ``'nsgan'``.
GAN_LOSS_TYPES = ("lsgan", "nsgan", "bce", "vanilla", "hinge", "wgan")

#: Valid ``distance`` values of :func:`cycle_loss` and :func:`identity_loss`.
#: ``'l2'`` and ``'mse'`` are the same thing (mean squared error).
DISTANCES = ("l1", "l2", "mse")


def _f32(x) -> Array:
    """Casts ``x`` to a float32 ``jax.Array`` (no-op if already float32)."""
    return jnp.asarray(x).astype(jnp.float32)


# -----------------------------------------------------------------------------
# Low-level building blocks.
# -----------------------------------------------------------------------------


def least_squares(*, predictions, target) -> Array:
    """Least-squares loss ``mean((p - t)^2)``.

    Args:
        predictions: Array of any shape (e.g. discriminator outputs).
        target: Scalar (e.g. ``1.0`` / ``0.0`` for LSGAN) or an array
            broadcastable to ``predictions``.

    Returns:
        float32 scalar ``mean((predictions - target)^2)``.
    """
    return jnp.mean(jnp.square(_f32(predictions) - _f32(target)))


def sigmoid_bce(*, logits, labels) -> Array:
    """Binary cross-entropy on logits, numerically stable.

    For a logit ``l`` and a label ``y`` in ``[0, 1]``::

        BCE(l, y) = -[y log sigmoid(l) + (1 - y) log(1 - sigmoid(l))]
                  = softplus(l) - l * y

    and the loss is ``mean(softplus(l) - l * y)``. ``jax.nn.softplus`` is
    ``logaddexp(l, 0)``, so values *and* gradients stay finite for arbitrarily
    large ``|l|`` (there is no ``log`` of an underflowed ``sigmoid``).

    Args:
        logits: Array of any shape (unnormalised discriminator outputs).
        labels: Scalar or array broadcastable to ``logits``; targets in
            ``[0, 1]`` (soft labels allowed).

    Returns:
        float32 scalar mean BCE.
    """
    logits = _f32(logits)
    return jnp.mean(jax.nn.softplus(logits) - logits * _f32(labels))


def hinge_d(*, real_logits, fake_logits) -> Array:
    """Hinge discriminator loss (Lim & Ye 2017; SAGAN, BigGAN).

    ``L_D = mean(relu(1 - D(x))) + mean(relu(1 + D(G(z))))``

    Each term is a mean over its own input, so ``real_logits`` and
    ``fake_logits`` may have different shapes.
    """
    real_term = jnp.mean(jax.nn.relu(1.0 - _f32(real_logits)))
    fake_term = jnp.mean(jax.nn.relu(1.0 + _f32(fake_logits)))
    return real_term + fake_term


def hinge_g(*, fake_logits) -> Array:
    """Hinge (and WGAN) generator loss ``L_G = -mean(D(G(z)))``."""
    return -jnp.mean(_f32(fake_logits))


# -----------------------------------------------------------------------------
# Adversarial losses.
# -----------------------------------------------------------------------------


def _check_loss_type(loss_type: str) -> None:
    if loss_type not in GAN_LOSS_TYPES:
        valid = ", ".join(repr(t) for t in GAN_LOSS_TYPES)
        raise ValueError(f"Unknown GAN loss_type {loss_type!r}; valid values are {valid}.")


def gan_discriminator_loss(*, real_logits, fake_logits, loss_type: str) -> Array:
    """Discriminator loss; ``D`` is trained to *minimise* it.

    With ``D(x) = real_logits`` (discriminator outputs on real samples) and
    ``D(G(z)) = fake_logits`` (on generated samples, normally passed through
    ``jax.lax.stop_gradient`` by the caller), ``loss_type`` selects:

    * ``'lsgan'`` (least squares, Mao et al. 2017)::

          L_D = 0.5 * [mean((D(x) - 1)^2) + mean(D(G(z))^2)]

      The factor **0.5** follows the official CycleGAN / pix2pix code
      (``loss_D = (loss_D_real + loss_D_fake) * 0.5`` in
      ``backward_D_basic``), which halves the D loss to slow D down relative
      to G. It belongs to the **discriminator** LSGAN loss only:
      :func:`gan_generator_loss` has no such factor, and the other loss types
      below follow their original papers without it.
    * ``'nsgan'`` / ``'bce'`` / ``'vanilla'`` (Goodfellow et al. 2014; binary
      cross-entropy on logits, see :func:`sigmoid_bce`)::

          L_D = BCE(D(x), 1) + BCE(D(G(z)), 0)
              = mean(softplus(-D(x))) + mean(softplus(D(G(z))))

    * ``'hinge'``: ``L_D = mean(relu(1 - D(x))) + mean(relu(1 + D(G(z))))``.
    * ``'wgan'`` (Wasserstein critic; the Lipschitz constraint, e.g. a
      gradient penalty, is the caller's job)::

          L_D = mean(D(G(z))) - mean(D(x))

    Each term is a mean over its own input, so the two logit arrays may have
    any (possibly different) shapes.

    Args:
        real_logits: Discriminator outputs on real samples, any shape and
            float dtype.
        fake_logits: Discriminator outputs on generated samples.
        loss_type: One of :data:`GAN_LOSS_TYPES`.

    Returns:
        float32 scalar loss.

    Raises:
        ValueError: if ``loss_type`` is unknown.
    """
    _check_loss_type(loss_type)
    if loss_type == "lsgan":
        real_term = least_squares(predictions=real_logits, target=1.0)
        fake_term = least_squares(predictions=fake_logits, target=0.0)
        return 0.5 * (real_term + fake_term)
    if loss_type in ("nsgan", "bce", "vanilla"):
        real_term = sigmoid_bce(logits=real_logits, labels=1.0)
        fake_term = sigmoid_bce(logits=fake_logits, labels=0.0)
        return real_term + fake_term
    if loss_type == "hinge":
        return hinge_d(real_logits=real_logits, fake_logits=fake_logits)
    # "wgan"
    return jnp.mean(_f32(fake_logits)) - jnp.mean(_f32(real_logits))


def gan_generator_loss(*, fake_logits, loss_type: str) -> Array:
    """Generator (adversarial) loss; ``G`` is trained to *minimise* it.

    With ``D(G(z)) = fake_logits``:

    * ``'lsgan'``: ``L_G = mean((D(G(z)) - 1)^2)`` (no 0.5 factor).
    * ``'nsgan'`` / ``'bce'`` / ``'vanilla'`` (non-saturating):
      ``L_G = BCE(D(G(z)), 1) = mean(softplus(-D(G(z))))``.
    * ``'hinge'`` and ``'wgan'``: ``L_G = -mean(D(G(z)))``.

    Args:
        fake_logits: Discriminator outputs on generated samples, any shape.
        loss_type: One of :data:`GAN_LOSS_TYPES`.

    Returns:
        float32 scalar loss.

    Raises:
        ValueError: if ``loss_type`` is unknown.
    """
    _check_loss_type(loss_type)
    if loss_type == "lsgan":
        return least_squares(predictions=fake_logits, target=1.0)
    if loss_type in ("nsgan", "bce", "vanilla"):
        return sigmoid_bce(logits=fake_logits, labels=1.0)
    # "hinge", "wgan"
    return hinge_g(fake_logits=fake_logits)


# -----------------------------------------------------------------------------
# Reconstruction losses.
# -----------------------------------------------------------------------------


def l1(*, x, y) -> Array:
    """Mean absolute error ``mean(|x - y|)`` (inputs broadcast)."""
    return jnp.mean(jnp.abs(_f32(x) - _f32(y)))


def l2(*, x, y) -> Array:
    """Mean squared error ``mean((x - y)^2)`` (inputs broadcast).

    "l2" here is the *squared* error averaged over elements, as in the
    image-translation literature, not the Euclidean norm ``||x - y||_2``.
    """
    return jnp.mean(jnp.square(_f32(x) - _f32(y)))


#: Alias of :func:`l2`.
mse = l2


def _distance(distance: str, x, y) -> Array:
    if distance == "l1":
        return l1(x=x, y=y)
    if distance in ("l2", "mse"):
        return l2(x=x, y=y)
    valid = ", ".join(repr(d) for d in DISTANCES)
    raise ValueError(f"Unknown distance {distance!r}; valid values are {valid}.")


def cycle_loss(*, real, reconstructed, distance: str = "l1") -> Array:
    """Cycle-consistency loss (CycleGAN), e.g. ``mean(|F(G(x)) - x|)``.

    Args:
        real: Original images ``x``.
        reconstructed: ``F(G(x))``, the round trip through both generators.
        distance: ``'l1'`` (default, as in CycleGAN) or ``'l2'`` / ``'mse'``.

    Returns:
        float32 scalar, *not* multiplied by the cycle weight (lambda); that is
        the caller's job.

    Raises:
        ValueError: if ``distance`` is unknown.
    """
    return _distance(distance, reconstructed, real)


def identity_loss(*, real, same, distance: str = "l1") -> Array:
    """Identity-mapping loss (CycleGAN), e.g. ``mean(|G(y) - y|)``.

    Args:
        real: Images ``y`` already in the generator's *target* domain.
        same: ``G(y)``, the generator applied to them.
        distance: ``'l1'`` (default) or ``'l2'`` / ``'mse'``.

    Returns:
        float32 scalar, unweighted.

    Raises:
        ValueError: if ``distance`` is unknown.
    """
    return _distance(distance, same, real)


def masked_l2(*, x, y, mask) -> Array:
    """Masked mean squared error.

    ``L = sum(m * (x - y)^2) / max(sum(m), 1)``  with
    ``m = broadcast_to(mask, (x - y).shape)``.

    The mask is broadcast over the channel axis (and any other size-1 axis)
    **before** summing, so the normaliser counts masked *elements including
    channels*: for ``x`` of shape ``[B, H, W, C]`` and a 0/1 mask of shape
    ``[B, H, W, 1]`` it is ``C * (number of masked pixels)``, and ``L`` is the
    mean squared error over exactly the selected elements. A mask of shape
    ``[B, H, W]`` (``x.shape[:-1]``, no channel axis) gets a trailing axis
    added. Non-binary masks act as weights (weighted mean). The ``max(., 1)``
    makes an all-zero mask give ``0`` instead of ``nan``.

    Args:
        x: Array of any shape.
        y: Array broadcastable with ``x``.
        mask: Array broadcastable to ``x - y``, or of shape ``x.shape[:-1]``.

    Returns:
        float32 scalar.
    """
    diff2 = jnp.square(_f32(x) - _f32(y))
    mask = _f32(mask)
    if mask.ndim == diff2.ndim - 1 and mask.shape == diff2.shape[:-1]:
        mask = mask[..., None]
    mask = jnp.broadcast_to(mask, diff2.shape)
    return jnp.sum(mask * diff2) / jnp.maximum(jnp.sum(mask), 1.0)


# -----------------------------------------------------------------------------
# Classification / segmentation (task losses for domain adaptation).
# -----------------------------------------------------------------------------


def _check_class_shapes(logits: Array, labels: Array, num_classes: int | None) -> None:
    if num_classes is not None and logits.shape[-1] != num_classes:
        raise ValueError(
            f"logits have {logits.shape[-1]} classes (shape {logits.shape}), "
            f"expected num_classes={num_classes}."
        )
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"labels shape {labels.shape} must equal logits.shape[:-1] = "
            f"{logits.shape[:-1]} (integer labels, not one-hot)."
        )


def _valid_weights(labels: Array, mask, ignore_index: int | None) -> Array:
    """float32 weights of shape ``labels.shape``: mask * (label != ignore)."""
    weights = jnp.ones(labels.shape, jnp.float32)
    if ignore_index is not None:
        weights = weights * (labels != ignore_index).astype(jnp.float32)
    if mask is not None:
        mask = _f32(mask)
        # Accept a [B, H, W, 1] mask for [B, H, W] labels.
        if mask.ndim == labels.ndim + 1 and mask.shape[-1] == 1:
            mask = mask[..., 0]
        weights = weights * jnp.broadcast_to(mask, labels.shape)
    return weights


def softmax_cross_entropy(
    *,
    logits,
    labels,
    mask=None,
    num_classes: int | None = None,
    ignore_index: int | None = None,
) -> Array:
    """Softmax cross-entropy with integer labels, mean over valid entries.

    ``CE_i = logsumexp(logits_i) - logits_i[labels_i]``, computed by
    ``optax.softmax_cross_entropy_with_integer_labels`` directly on the
    **logits** (never apply a softmax first), and::

        L = sum_i(w_i * CE_i) / max(sum_i(w_i), 1)
        w_i = mask_i * [labels_i != ignore_index]

    Works for image classification (``logits [B, C]``, ``labels [B]``) and
    per-pixel segmentation (``logits [B, H, W, C]``, ``labels [B, H, W]``).

    Ignored entries: pass ``ignore_index`` (e.g. ``255`` for the Cityscapes /
    GTA5 "void" label, or ``-1``) and/or a ``mask`` (0/1, or float weights
    for a weighted mean; shape ``labels.shape``, broadcastable to it, or
    ``labels.shape + (1,)``). Ignored labels are replaced by ``0`` before the
    lookup, so an out-of-range ignore value never yields garbage values or NaN
    gradients; their loss is then zeroed by the weight. Labels outside
    ``[0, C)`` that are *not* ignored are a caller bug (their CE is
    undefined). If no entry is valid the loss is ``0``.

    Args:
        logits: ``[..., C]`` float array (any float dtype; math in float32).
        labels: ``[...]`` integer class ids (``logits.shape[:-1]``).
        mask: Optional validity mask / weights, see above.
        num_classes: Optional expected ``C``; if given, ``logits.shape[-1]``
            is checked against it (a cheap guard against a wrong head size).
        ignore_index: Optional label value to ignore.

    Returns:
        float32 scalar mean cross-entropy over valid entries.

    Raises:
        ValueError: on a ``num_classes`` or shape mismatch.
    """
    logits = _f32(logits)
    labels = jnp.asarray(labels)
    _check_class_shapes(logits, labels, num_classes)
    weights = _valid_weights(labels, mask, ignore_index)
    safe_labels = labels
    if ignore_index is not None:
        safe_labels = jnp.where(labels == ignore_index, 0, labels)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, safe_labels.astype(jnp.int32))
    # `where`, not a plain product, so an inf CE on an ignored entry can't leak.
    total = jnp.sum(jnp.where(weights > 0, ce * weights, 0.0))
    return total / jnp.maximum(jnp.sum(weights), 1.0)


def accuracy(*, logits, labels, mask=None, ignore_index: int | None = None) -> Array:
    """Top-1 accuracy ``sum_i(w_i [argmax(logits_i) == labels_i]) / sum_i(w_i)``.

    Same shapes and ``mask`` / ``ignore_index`` semantics as
    :func:`softmax_cross_entropy`; for per-pixel ``[B, H, W, C]`` logits this
    is pixel accuracy. Returns a float32 scalar in ``[0, 1]``, or ``0`` if no
    entry is valid.
    """
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    _check_class_shapes(logits, labels, None)
    weights = _valid_weights(labels, mask, ignore_index)
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return jnp.sum(correct * weights) / jnp.maximum(jnp.sum(weights), 1.0)
