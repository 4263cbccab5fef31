"""Evaluation and sample grids shared by the unpaired translation methods (CycleGAN, DiscoGAN).

A translation method exposes ``generate(params, x, direction) -> images`` with
``direction`` in ``('AtoB', 'BtoA')``, float images in ``[-1, 1]`` in and out.
On a source with a hidden ground truth (the embedded translation pair, whose
test split has ``B[i] = A[i]`` translated) :func:`embedded_pair_psnr` scores
both directions against the true counterparts, next to two trivial baselines;
on other sources it returns nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ganda_jax.metrics import evaluation, image_metrics

Generate = Callable[[Any, jax.Array, str], jax.Array]


def make_translate_fn(generate: Generate) -> Callable[[Any, dict], dict]:
    """``fn(params, {'A': uint8, 'B': uint8}) -> {'fake_B': G_AB(A), 'fake_A': G_BA(B)}``.

    Create it once per method and keep it (e.g. in a ``functools.cached_property``):
    :func:`ganda_jax.metrics.evaluation.batched_apply` caches its compilation per function object.
    """

    def fn(params, batch):
        a = image_metrics.from_uint8(batch["A"], jnp.float32)
        b = image_metrics.from_uint8(batch["B"], jnp.float32)
        return {
            "fake_B": generate(params, a, "AtoB"),
            "fake_A": generate(params, b, "BtoA"),
        }

    return fn


def embedded_pair_psnr(
    translate_fn: Callable[[Any, dict], dict],
    params: Any,
    data,
    *,
    mesh,
    batch_size: int,
) -> dict[str, float]:
    """PSNR of G_AB(a) against the true counterpart b (and of G_BA(b) against a).

    Returns, for the test split of a source with a hidden ground truth (else ``{}``):

    - ``eval/psnr_AtoB``, ``eval/psnr_BtoA``: the translations against the truth;
    - ``eval/psnr_identity_AtoB`` (= ``..._BtoA``): ``PSNR(a, b)``, i.e. not translating;
    - ``eval/psnr_mean_image_AtoB`` / ``..._BtoA``: always predicting the mean
      training image of the target domain (a stronger trivial baseline).

    All PSNRs are means of per-image PSNRs on ``[-1, 1]`` images (data range 2).
    """
    test = data.paired_test()
    if test is None:
        return {}
    out = evaluation.batched_apply(
        translate_fn,
        params,
        {"A": test["A"], "B": test["B"]},
        mesh=mesh,
        batch_size=batch_size,
    )
    a = image_metrics.from_uint8(test["A"], np.float32)
    b = image_metrics.from_uint8(test["B"], np.float32)
    identity = float(image_metrics.psnr(x=a, y=b))
    mean = {d: image_metrics.from_uint8(data.train_mean(d), np.float32) for d in ("A", "B")}
    return {
        "eval/psnr_AtoB": float(image_metrics.psnr(x=out["fake_B"], y=b)),
        "eval/psnr_BtoA": float(image_metrics.psnr(x=out["fake_A"], y=a)),
        "eval/psnr_identity_AtoB": identity,
        "eval/psnr_identity_BtoA": identity,
        "eval/psnr_mean_image_AtoB": float(
            image_metrics.psnr(x=np.broadcast_to(mean["B"], b.shape), y=b)
        ),
        "eval/psnr_mean_image_BtoA": float(
            image_metrics.psnr(x=np.broadcast_to(mean["A"], a.shape), y=a)
        ),
    }


def sample_grids(
    generate: Generate,
    params: Any,
    data,
    *,
    train_a: np.ndarray,
    train_b: np.ndarray,
    n: int = 4,
) -> dict[str, np.ndarray]:
    """Grids ``AtoB`` / ``BtoA`` with rows real, translated, reconstructed (+ the hidden truth).

    Uses the first ``n`` test pairs when the source has a ground truth (then a
    fourth row shows the true counterpart), else the first ``n`` training
    images ``train_a`` / ``train_b`` (uint8 NHWC).
    """
    from ganda_jax.train.writers import image_grid

    test = data.paired_test()
    if test is not None:
        a, b = test["A"][:n], test["B"][:n]
    else:
        a, b = np.asarray(train_a)[:n], np.asarray(train_b)[:n]
    params = jax.device_get(params)
    fa, fb = image_metrics.from_uint8(a, jnp.float32), image_metrics.from_uint8(b, jnp.float32)
    fake_b = generate(params, fa, "AtoB")
    fake_a = generate(params, fb, "BtoA")
    rec_a = generate(params, fake_b, "BtoA")
    rec_b = generate(params, fake_a, "AtoB")
    truth = test is not None
    rows_ab = [fa, fake_b, rec_a] + ([fb] if truth else [])
    rows_ba = [fb, fake_a, rec_b] + ([fa] if truth else [])
    return {
        "AtoB": image_grid([np.asarray(r) for r in rows_ab]),
        "BtoA": image_grid([np.asarray(r) for r in rows_ba]),
    }


class TranslationEvalMixin:
    """``evaluate`` and ``samples`` for a two-generator translation method.

    The method provides ``generate(params, x, direction)`` and, when its batch
    layout is not ``{'A': {'image'}, 'B': {'image'}}``, ``sample_images(batch)``.
    """

    config: Any

    def generate(self, params, x, direction: str):
        raise NotImplementedError

    def sample_images(self, batch) -> tuple[np.ndarray, np.ndarray]:
        """``(a, b)`` uint8 training images of a batch (used when there is no hidden truth)."""
        return np.asarray(batch["A"]["image"]), np.asarray(batch["B"]["image"])

    @functools.cached_property
    def _translate_fn(self):
        return make_translate_fn(self.generate)

    def evaluate(self, state, mesh):
        """PSNR against the hidden counterparts of the embedded pair (:func:`embedded_pair_psnr`)."""
        return embedded_pair_psnr(
            self._translate_fn,
            state.params,
            self.data,
            mesh=mesh,
            batch_size=self.config.eval_batch_size,
        )

    def samples(self, state, batch):
        """Rows real, translated, reconstructed (and the hidden truth when known)."""
        a, b = self.sample_images(batch)
        return sample_grids(
            self.generate,
            state.params,
            self.data,
            train_a=np.asarray(a),
            train_b=np.asarray(b),
        )
