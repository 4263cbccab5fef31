"""Classifier accuracy on an in-memory labelled split (shared by the domain-adaptation methods).

A method exposes ``logits_fn(params, images) -> {name: logits [B, C]}`` (float
images in ``[-1, 1]``; one entry per classifier to score, e.g. the adapted
classifier and a source-only baseline). :func:`make_accuracy_fn` wraps it once
into the per-example function that :func:`ganda_jax.metrics.evaluation.batched_apply`
runs sharded over the mesh, and :func:`accuracies` turns the per-example hits
into top-1 accuracies. Every classifier is scored on the same batches in one
pass, and each example counts exactly once (batched_apply drops the padding).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from ganda_jax import engine, losses
from ganda_jax.metrics import evaluation, image_metrics

LogitsFn = Callable[[Any, Any], Mapping[str, Any]]


def make_accuracy_fn(logits_fn: LogitsFn) -> Callable[[Any, dict], dict]:
    """``fn(params, {'image': uint8, 'label': int}) -> {name: bool hit per example}``.

    Create it once per method and keep it (e.g. in a ``functools.cached_property``):
    :func:`ganda_jax.metrics.evaluation.batched_apply` caches its compilation per function object.
    """

    def fn(params, batch):
        images = image_metrics.from_uint8(batch["image"], jnp.float32)
        logits = logits_fn(params, images)
        return {k: jnp.argmax(v, axis=-1) == batch["label"] for k, v in logits.items()}

    return fn


def accuracies(
    accuracy_fn: Callable[[Any, dict], dict],
    params: Any,
    split: Mapping[str, np.ndarray],
    *,
    mesh,
    batch_size: int,
) -> dict[str, float]:
    """Top-1 accuracy of each classifier of ``accuracy_fn`` on ``split`` ({'image', 'label'})."""
    hits = evaluation.batched_apply(
        accuracy_fn,
        params,
        {"image": split["image"], "label": split["label"]},
        mesh=mesh,
        batch_size=batch_size,
    )
    return {k: float(np.mean(v)) for k, v in hits.items()}


def adaptation_scores(
    accuracy_fn: Callable[[Any, dict], dict], params: Any, test_split, *, mesh, batch_size: int
) -> dict[str, float]:
    """The digit-adaptation metrics of an ``accuracy_fn`` with ``'adapted'`` and ``'source_only'``.

    ``test_split(domain)`` returns a labelled test split ('source' | 'target').
    ``eval/target_accuracy`` and ``eval/source_only_accuracy`` are on the
    held-out target test split, ``eval/adaptation_gain`` their difference;
    ``eval/source_accuracy`` and ``eval/source_only_source_accuracy`` on the
    source test split. With an ``'oracle'`` classifier too: ``eval/oracle_accuracy`` and
    ``eval/gap_closed`` (:func:`gap_closed`) on the target test split.
    """
    tgt, src = (
        accuracies(accuracy_fn, params, test_split(domain), mesh=mesh, batch_size=batch_size)
        for domain in ("target", "source")
    )
    out = {
        "eval/target_accuracy": tgt["adapted"],
        "eval/source_only_accuracy": tgt["source_only"],
        "eval/adaptation_gain": tgt["adapted"] - tgt["source_only"],
        "eval/source_accuracy": src["adapted"],
        "eval/source_only_source_accuracy": src["source_only"],
    }
    if "oracle" in tgt:
        out["eval/oracle_accuracy"] = tgt["oracle"]
        out.update(gap_closed(tgt["adapted"], tgt["source_only"], tgt["oracle"]))
    return out


def gap_closed(adapted: float, source_only: float, oracle: float) -> dict[str, float]:
    """``{'eval/gap_closed': (adapted - source_only) / (oracle - source_only)}``: the share of
    the source-only -> oracle gap the adaptation closes (1: as good as training on target
    labels; 0: no better than source only). Empty when the oracle is not above source only."""
    if oracle - source_only <= 1e-9:
        return {}
    return {"eval/gap_closed": (adapted - source_only) / (oracle - source_only)}


class TaskClassifier:
    """Mixin of a digit-adaptation :class:`ganda_jax.engine.Method` whose task network is a
    classifier (``task_logits``). Its baselines' ``supervised_loss`` is the cross-entropy on
    those logits; its ``evaluate`` is :func:`adaptation_scores` of ``task_logits`` with the
    method's players ('adapted') and with each baseline's copies in their place (named by the
    baseline: 'source_only', 'oracle'), all on the same batches of the held-out test splits."""

    def task_logits(self, params, images):
        """Class logits [B, C] of the task network for float images in [-1, 1]."""
        raise NotImplementedError

    def supervised_loss(self, params, inp, images, labels):
        """CE(task_logits(images), labels), with its accuracy."""
        logits = self.task_logits(params, images)
        ce = losses.softmax_cross_entropy(logits=logits, labels=labels)
        acc = losses.accuracy(logits=logits, labels=labels)
        return ce, engine.Out(metrics={"ce": ce, "acc": acc})

    @functools.cached_property
    def _accuracy_fn(self):
        return make_accuracy_fn(engine.with_baselines(self.task_logits, self.baselines))

    def evaluate(self, state, mesh):
        scored = {p for b in self.baselines for p in (*b.copies, *b.copies.values())}
        return adaptation_scores(
            self._accuracy_fn,
            {p: state.params[p] for p in sorted(scored)},
            self.data.test_split,
            mesh=mesh,
            batch_size=self.config.eval_batch_size,
        )
