"""The training loop, written once for every method.

``train(config, workdir)`` builds the method, the mesh and the input pipeline,
initialises the state (or restores the latest checkpoint in ``workdir``), and
runs the jitted step: one XLA program per iteration with the state donated,
the batch sharded over the ``data`` axis and the state replicated. Metrics stay
on the device and are fetched every ``log_every_steps`` (no per-step host sync).

A method with stages (a classmethod ``stage_configs(config, workdir)``, e.g.
CyCADA's pretrain -> pixel -> feature) is trained stage by stage, each in
``workdir/<stage>``; a finished stage is skipped on a re-run, an interrupted one
resumes, and a later stage warm-starts (``Method.warm_start``) from the final
checkpoint of an earlier one (:func:`restore_latest`).
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from ganda_jax import engine
from ganda_jax.nets import cpu_conv
from ganda_jax.train import checkpointing, parallel, writers
from ganda_jax.data import pipeline

# config.method -> "module:Class"
METHODS = {
    "cyclegan": "ganda_jax.methods.cyclegan:CycleGAN",
    "discogan": "ganda_jax.methods.discogan:DiscoGAN",
    "pixelda": "ganda_jax.methods.pixelda:PixelDA",
    "cycada": "ganda_jax.methods.cycada:CyCADA",
    "gta": "ganda_jax.methods.gta:GTA",
    "gta_seg": "ganda_jax.methods.gta_seg:GTASeg",
    "ccgan": "ganda_jax.methods.ccgan:CCGAN",
}


def get_method_class(config: ml_collections.ConfigDict) -> type[engine.Method]:
    """``config.method``: a name in :data:`METHODS`, or ``"module:Class"`` (a method of your own,
    importable from ``sys.path``)."""
    spec = METHODS.get(config.method, config.method)
    if ":" not in spec:
        raise ValueError(
            f"unknown method {config.method!r}; known: {sorted(METHODS)} or 'module:Class'"
        )
    module, cls = spec.split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"config.method={config.method!r}: cannot import it ({e})") from None


def get_method(config: ml_collections.ConfigDict) -> engine.Method:
    return get_method_class(config)(config)


class _Preemption:
    """Turns SIGTERM into a flag the loop checks after each step (then saves and exits)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. inside a test runner thread)
            self._previous = None
        return self

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: finishing this step, then checkpointing.")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class _StepProfiler:
    """A ``jax.profiler`` trace of ``num`` training steps, ``skip`` steps after this run's
    first (past compilation and warm-up), into ``directory`` (TensorBoard's profile plugin
    reads it; ``perfetto_trace.json.gz`` opens in ui.perfetto.dev). ``config.profile_steps``.
    """

    def __init__(self, directory: str, num: int, skip: int, first_step: int):
        self.directory, self.num = directory, int(num)
        self.start = int(first_step) + max(int(skip), 0)
        self.active = False

    def before(self, step: int, state) -> None:
        if self.num > 0 and not self.active and step >= self.start:
            jax.block_until_ready(state)  # the earlier steps finish outside the trace
            jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
            self.active, self.start = True, step

    def after(self, step: int, state) -> None:
        if self.active and step >= self.start + self.num:
            self.stop(step, state)

    def stop(self, step: int, state) -> None:
        if not self.active:
            return
        try:
            jax.block_until_ready(state)  # the traced steps' device work, not just dispatch
        except Exception:  # stopping in a failing run: its own error is the one to see
            logging.warning("Profile stopped without the last steps' device work")
        jax.profiler.stop_trace()
        self.active, self.num = False, 0
        logging.info("Profile of steps %d-%d written to %s", self.start, step - 1, self.directory)


class Run:
    """Everything built from a config; ``train`` drives it, tests poke at it."""

    def __init__(self, config: ml_collections.ConfigDict, mesh=None):
        self.config = config
        self.mesh = (
            mesh if mesh is not None else parallel.make_mesh(config.get("num_devices") or None)
        )
        parallel.check_batch_size(config.batch_size, self.mesh)
        self.method = get_method(config)
        self.tx = engine.make_optimizer(self.method)
        self.data_sharding = parallel.data_sharding(self.mesh)
        self.replicated = parallel.replicated(self.mesh)
        self.rollbacks = 0  # divergence rollbacks so far; each one changes the data order
        self.loader = self._make_loader()
        train_step = engine.make_train_step(self.method, self.tx, guard=config.divergence.guard)
        self.step_fn = jax.jit(
            train_step,
            in_shardings=(self.replicated, self.data_sharding),
            out_shardings=(self.replicated, self.replicated),
            donate_argnums=(0,),
            compiler_options=cpu_conv.compiler_options(),
        )
        self._init_fn = jax.jit(
            lambda rng, batch: engine.init_state(self.method, self.tx, rng, batch),
            out_shardings=self.replicated,
        )
        self.steps_per_call = int(config.get("steps_per_call", 1))
        if self.steps_per_call < 1:
            raise ValueError(f"config.steps_per_call must be >= 1, got {self.steps_per_call}")
        if self.steps_per_call > 1 and jax.default_backend() == "cpu":
            logging.warning(
                "config.steps_per_call=%d on CPU: XLA:CPU compiles a loop's body without its "
                "fast convolution kernels (a PixelDA step ran 4x slower); it is for GPU/TPU",
                self.steps_per_call,
            )
        # Several steps per dispatch (compiled on first use; runs that never use it pay nothing).
        self.multi_step_fn = jax.jit(
            engine.make_multi_step(train_step),
            in_shardings=(self.replicated, parallel.stacked_data_sharding(self.mesh)),
            out_shardings=(self.replicated, self.replicated),
            donate_argnums=(0,),
            compiler_options=cpu_conv.compiler_options(),
        )

    def _make_loader(self) -> pipeline.Loader:
        # After a divergence rollback the run continues with another data order; the
        # count is checkpointed, so the order stays a pure function of (seed, rollbacks, step).
        seed = (int(self.config.seed) + 1_000_003 * self.rollbacks) % 2**32
        return pipeline.Loader(
            self.method.train_streams(),
            global_batch_size=self.config.batch_size,
            seed=seed,
            transforms=self.method.train_transforms(),
            num_threads=self.config.data.get("num_threads", 4),
        )

    def set_rollbacks(self, n: int) -> None:
        if n != self.rollbacks:
            self.loader.close()
            self.rollbacks = int(n)
            self.loader = self._make_loader()

    def global_batch(self, step: int):
        return pipeline.to_global(self.loader.batch(step), self.data_sharding)

    def steps_this_call(self, step: int, stop_at: int) -> int:
        """``steps_per_call``, or 1 when that would run past a step where something must
        happen (a log, checkpoint, evaluation or sample step, or the end), so each still
        happens at its exact step."""
        k = self.steps_per_call
        if k == 1:
            return 1
        c = self.config
        periods = [c.log_every_steps, c.checkpoint_every_steps]
        periods += [c.get("eval_every_steps", 0), c.get("sample_every_steps", 0)]
        boundary = min([stop_at] + [(step // p + 1) * p for p in periods if p and p > 0])
        return k if boundary - step >= k else 1

    def run_steps(self, state: engine.TrainState, host_batches: list):
        """Applies one step per host batch (one dispatch for all of them when several)."""
        if len(host_batches) == 1:
            return self.step_fn(state, pipeline.to_global(host_batches[0], self.data_sharding))
        stacked = jax.tree.map(lambda *xs: np.stack(xs), *host_batches)
        sharding = parallel.stacked_data_sharding(self.mesh)
        return self.multi_step_fn(state, pipeline.to_global(stacked, sharding))

    def init_state(self) -> engine.TrainState:
        """A fresh state, then the method's warm start (only here: a resume never calls it)."""
        state = self._init_fn(jax.random.PRNGKey(self.config.seed), self.global_batch(0))
        restore = lambda config, workdir: restore_latest(config, workdir, self.replicated)  # noqa: E731
        return self.method.warm_start(state, restore)

    def abstract_state(self) -> engine.TrainState:
        return abstract_state(self.method, self.tx, self.replicated)

    def meta(self, step: int) -> dict:
        return {
            "method": self.method.name,
            "step": int(step),
            "data": self.loader.state(step),
            "rollbacks": self.rollbacks,
            "config": json.loads(self.config.to_json_best_effort()),
        }

    def restore_or_init(self, ckpt: checkpointing.Checkpointer) -> engine.TrainState:
        latest = ckpt.latest_step()
        if latest is None:
            return self.init_state()
        meta = ckpt.restore_meta(latest)
        if meta.get("method") != self.method.name:
            raise ValueError(
                f"workdir checkpoint {ckpt.directory}/{latest} is from method "
                f"{meta.get('method')!r}, not {self.method.name!r}; use another --workdir"
            )
        state, meta = self.restore(ckpt, latest, meta)
        logging.info("Resumed from %s at step %d.", ckpt.directory, latest)
        return state

    def restore(self, ckpt: checkpointing.Checkpointer, step: int, meta: dict):
        """Restores ``step``; a checkpoint that does not fit this config (other network
        sizes, other players) is a one-line error naming both configs' differences."""
        self.set_rollbacks(meta.get("rollbacks", 0))
        abstract = self.abstract_state()
        _check_fits(ckpt, step, meta, abstract, self.config, self.method.name, "workdir checkpoint")
        state, meta = ckpt.restore(abstract, step)
        self.loader.check_state(meta["data"])
        return state, meta


def _path(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _check_fits(ckpt, step: int, meta: dict, abstract, config, method: str, what: str) -> None:
    """Raises a one-line ``ValueError`` if checkpoint ``step`` does not have ``abstract``'s
    shapes (other network sizes, other players), naming the config differences. Checked
    before restoring: Orbax would fail deep in its async reader, leaving noise."""
    misfit = _shape_mismatches(os.path.join(ckpt.directory, str(step), "state"), abstract)
    if misfit:
        diff = config_differences(meta.get("config", {}), config)
        raise ValueError(
            f"{what} {ckpt.directory}/{step} ({meta.get('method')}) does not fit this "
            f"{method} config: {misfit}; config differences (checkpoint vs now): "
            f"{diff or 'none found'}; use another --workdir"
        )


def _shape_mismatches(directory: str, abstract: engine.TrainState, limit: int = 3) -> str:
    """``''`` if the stored arrays have ``abstract``'s shapes, else the first differences
    (parameters, statistics and buffers; the optimizer state follows the parameters)."""
    stored = ocp.StandardCheckpointer().metadata(directory).item_metadata
    theirs = {_path(p): tuple(m.shape) for p, m in jax.tree_util.tree_leaves_with_path(stored)}
    mine = {
        f"{field}/{_path(p)}": tuple(x.shape)
        for field in ("params", "model_state", "extra")
        for p, x in jax.tree_util.tree_leaves_with_path(getattr(abstract, field))
    }
    problems = []
    for key, shape in mine.items():
        if key not in theirs:
            problems.append(f"{key} is not in the checkpoint")
        elif theirs[key] != shape:
            problems.append(f"{key}: checkpoint {theirs[key]} vs now {shape}")
    extra = sorted(k for k in theirs if k.split("/")[0] in ("params", "extra") and k not in mine)
    problems += [f"{k} is only in the checkpoint" for k in extra]
    more = f"; and {len(problems) - limit} more" if len(problems) > limit else ""
    return "; ".join(problems[:limit]) + more


def config_differences(saved: dict, config: ml_collections.ConfigDict, limit: int = 6) -> str:
    """``'model.ngf: 4 vs 8; ...'`` for the leaves that differ between a checkpoint's
    saved config (JSON) and ``config`` (run-length keys such as num_train_steps too)."""

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    a, b = flat(saved), flat(json.loads(config.to_json_best_effort()))
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    text = "; ".join(f"{k}: {a.get(k, '-')!r} vs {b.get(k, '-')!r}" for k in keys[:limit])
    return text + (f"; and {len(keys) - limit} more" if len(keys) > limit else "")


def abstract_state(method: engine.Method, tx, sharding) -> engine.TrainState:
    """Shapes, dtypes and shardings of the train state, computed without data or FLOPs."""
    batch = method.example_batch(method.config.batch_size)
    shapes = jax.eval_shape(
        lambda rng, b: engine.init_state(method, tx, rng, b), jax.random.PRNGKey(0), batch
    )
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)


def restore_latest(config: ml_collections.ConfigDict, workdir: str, sharding) -> engine.TrainState:
    """The latest checkpointed state of ``config``'s run in ``workdir`` (for warm starts).

    Raises a one-line ``FileNotFoundError`` if ``workdir`` holds no checkpoint.
    """
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"warm start: no checkpoint in {directory}; train that run first")
    ckpt = checkpointing.Checkpointer(directory, save_every=1, async_save=False)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(
                f"warm start: no checkpoint in {directory}; train that run first"
            )
        method = get_method(config)
        meta = ckpt.restore_meta(step)
        if meta.get("method") != method.name:
            raise ValueError(
                f"warm start: {directory}/{step} is from method {meta.get('method')!r}, "
                f"not {method.name!r}"
            )
        if step != int(config.num_train_steps):
            logging.warning(
                "warm start from %s at step %d of %d (that run is unfinished)",
                directory,
                step,
                config.num_train_steps,
            )
        abstract = abstract_state(method, engine.make_optimizer(method), sharding)
        _check_fits(ckpt, step, meta, abstract, config, method.name, "warm start:")
        state, _ = ckpt.restore(abstract, step)
        logging.info("Warm start: loaded %s at step %d.", directory, step)
        return state
    finally:
        ckpt.close()


def _finished(workdir: str, total: int) -> bool:
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return False
    ckpt = checkpointing.Checkpointer(directory, save_every=1, async_save=False)
    try:
        return ckpt.latest_step() == total
    finally:
        ckpt.close()


DIVERGENCE_ACTIONS = ("rollback", "stop", "skip")


class _Divergence:
    """Reads the step's ``guard/*`` flags and the discriminator losses at each log step
    (``config.divergence``): says what went non-finite, and warns about collapse."""

    def __init__(self, config: ml_collections.ConfigDict, method: engine.Method):
        d = config.divergence
        if d.action not in DIVERGENCE_ACTIONS:
            raise ValueError(
                f"config.divergence.action={d.action!r}; expected one of {DIVERGENCE_ACTIONS}"
            )
        self.guard, self.action, self.max_rollbacks = d.guard, d.action, int(d.max_rollbacks)
        self.collapse_loss, self.collapse_steps = float(d.collapse_d_loss), int(d.collapse_steps)
        self.d_phases = tuple(method.discriminator_phases)
        self.low_steps: dict[str, int] = {}

    def problem(self, scalars: dict[str, float], step: int, n: int) -> str | None:
        """What was non-finite in the ``n`` steps ending at ``step``, or None."""
        if not self.guard:  # unguarded: any non-finite loss means the state is already bad
            bad = [k for k, v in scalars.items() if k.startswith("loss/") and not np.isfinite(v)]
            if bad:
                raise FloatingPointError(
                    f"non-finite values at step {step}: {', '.join(bad)}; training stopped "
                    "(config.divergence.guard is off; the last checkpoint may be affected)"
                )
            return None
        skipped = round(scalars.get("guard/skipped", 0.0) * n)
        if not skipped:
            return None
        flagged = (
            lambda prefix: [  # noqa: E731
                k[len(prefix) :]
                for k, v in sorted(scalars.items())
                if k.startswith(prefix) and v > 0
            ]
        )
        return (
            f"{skipped} of steps {step - n + 1}..{step} produced NaN/inf (phase losses: "
            f"{', '.join(flagged('guard/loss/')) or 'finite'}; parameters or statistics of: "
            f"{', '.join(flagged('guard/params/')) or 'finite'}); those updates were not applied"
        )

    def collapse_hints(self, scalars: dict[str, float], step: int, n: int) -> None:
        """Warns when a discriminator loss stays near zero: D wins outright and the
        generator's adversarial gradient vanishes (a common prelude to mode collapse)."""
        if not self.collapse_steps:
            return
        for ph in self.d_phases:
            v = scalars.get(f"loss/{ph}")
            low = v is not None and np.isfinite(v) and abs(v) < self.collapse_loss
            self.low_steps[ph] = self.low_steps.get(ph, 0) + n if low else 0
            if self.low_steps[ph] >= self.collapse_steps:
                logging.warning(
                    "possible mode collapse at step %d: discriminator loss %r below %g for "
                    "%d steps; consider a lower D learning rate or resuming an earlier checkpoint",
                    step,
                    ph,
                    self.collapse_loss,
                    self.low_steps[ph],
                )
                self.low_steps[ph] = 0


def _rollback(run: Run, ckpt: checkpointing.Checkpointer, before: int, problem: str):
    """Restores the newest checkpoint from ``before`` or earlier (else the oldest one kept,
    else a fresh init: the guard keeps every saved state finite) and changes the data order."""
    if run.rollbacks >= int(run.config.divergence.max_rollbacks):
        raise FloatingPointError(
            f"{problem}; still diverging after {run.rollbacks} rollback(s), training stopped "
            f"(checkpoints in {ckpt.directory} are intact)"
        )
    ckpt.wait()
    steps = ckpt.all_steps()
    earlier = [s for s in steps if s <= before]
    target = max(earlier) if earlier else (min(steps) if steps else None)
    ckpt.delete_after(-1 if target is None else target)
    run.set_rollbacks(run.rollbacks + 1)
    if target is None:
        state = run.init_state()
    else:
        state, _ = ckpt.restore(run.abstract_state(), target)
    logging.warning(
        "Rollback %d/%d to step %d with a new data order.",
        run.rollbacks,
        run.config.divergence.max_rollbacks,
        target or 0,
    )
    return state, int(jax.device_get(state.step))


def train(
    config: ml_collections.ConfigDict, workdir: str, *, max_steps: int | None = None, mesh=None
) -> engine.TrainState:
    """Trains (or resumes) ``config`` in ``workdir``; returns the final state.

    ``max_steps`` stops early after that many total steps (with a checkpoint), as
    an interruption would; the next call continues exactly where it stopped.
    For a method with stages the steps count over all stages, in order, and the
    state returned is that of the last stage trained.
    """
    parallel.maybe_initialize_distributed()  # before anything touches the backend
    cache = compilation_cache_dir(config, workdir)  # one for all stages: a resume finds it
    stage_configs = getattr(get_method_class(config), "stage_configs", None)
    if stage_configs is None:
        return _train_run(config, workdir, max_steps=max_steps, mesh=mesh, cache=cache)
    plan = stage_configs(config, workdir)
    state, offset = None, 0
    for i, (name, cfg) in enumerate(plan):
        stage_dir = os.path.join(workdir, name)
        total = int(cfg.num_train_steps)
        left = None if max_steps is None else int(max_steps) - offset
        if left is not None and left <= 0:
            break
        offset += total
        if i < len(plan) - 1 and _finished(stage_dir, total):
            logging.info("Stage %r is finished in %s; skipping it.", name, stage_dir)
            continue
        logging.info("Stage %r (%d/%d) in %s.", name, i + 1, len(plan), stage_dir)
        state = _train_run(cfg, stage_dir, max_steps=left, mesh=mesh, cache=cache)
        if int(jax.device_get(state.step)) < total:  # stopped early: later stages must wait
            break
    return state


def compilation_cache_dir(config: ml_collections.ConfigDict, workdir: str) -> str | None:
    """The directory for JAX's persistent compilation cache that ``config`` asks for.

    ``config.compilation_cache_dir``: ``"auto"`` (default) is ``workdir/compilation_cache``,
    ``""`` none, anything else that directory. A directory JAX already has (set by the user,
    ``JAX_COMPILATION_CACHE_DIR``, or an earlier run in this process) is kept: JAX reads its
    cache directory once per process.
    """
    setting = config.get("compilation_cache_dir", "auto")
    if not setting:
        return None
    current = jax.config.jax_compilation_cache_dir
    if current:
        if setting != "auto" and os.path.abspath(os.path.expanduser(setting)) != os.path.abspath(
            current
        ):
            logging.warning(
                "config.compilation_cache_dir=%r ignored: this process already uses %r.",
                setting,
                current,
            )
        return current
    if setting == "auto":
        return os.path.join(workdir, "compilation_cache")
    return os.path.expanduser(setting)


def _use_compilation_cache(path: str | None) -> None:
    if path and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", path)
        logging.info("Persistent compilation cache: %s", path)


def _train_run(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    max_steps: int | None = None,
    mesh=None,
    cache: str | None = None,
) -> engine.TrainState:
    parallel.maybe_initialize_distributed()
    run = Run(config, mesh)
    # Bad input (a missing path, a corrupt file, labels out of range) fails here, in one
    # line, before anything is trained or written to the workdir.
    run.method.data.check()
    os.makedirs(workdir, exist_ok=True)
    total = int(config.num_train_steps)
    stop_at = total if max_steps is None else min(total, int(max_steps))
    ckpt = checkpointing.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        save_every=config.checkpoint_every_steps,
        keep=config.get("keep_checkpoints", 3),
    )
    divergence = _Divergence(config, run.method)
    state = run.restore_or_init(ckpt)  # before writing anything: a misfit workdir stays as it was
    # From here on (the step's and the evaluations' programs; not the fresh state's init,
    # which a resume does not compile): JAX would create the directory on its first compile.
    _use_compilation_cache(cache)
    writer = writers.MetricWriter(workdir)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
        with open(os.path.join(workdir, "data.json"), "w") as f:  # e.g. class folder -> id
            json.dump(run.method.data.info(), f, indent=2)
    step = int(jax.device_get(state.step))
    progress = writers.ProgressLogger(total_steps=total, batch_size=config.batch_size)
    log_every = max(int(config.log_every_steps), 1)
    eval_every = int(config.get("eval_every_steps", 0))
    sample_every = int(config.get("sample_every_steps", 0))
    accum, accum_n, batch = None, 0, None

    def evaluate_and_sample(step):
        scalars = engine.without_baseline_metrics(run.method, run.method.evaluate(state, run.mesh))
        if scalars:
            writer.write_scalars(step, scalars)
            logging.info(
                "eval @ %d: %s", step, ", ".join(f"{k}={v:.4f}" for k, v in sorted(scalars.items()))
            )
        if batch is not None:
            images = run.method.samples(state, batch)
            if images:
                writer.write_images(step, images)

    profiler = _StepProfiler(
        os.path.join(workdir, "profile"),
        num=config.get("profile_steps", 0),
        skip=config.get("profile_skip_steps", 5),
        first_step=step,
    )
    with _Preemption() as preemption:
        if step < stop_at:
            batches = run.loader.iterate(step)
        try:
            t_last = time.time()
            while step < stop_at:
                n = run.steps_this_call(step, stop_at)
                group = [next(batches) for _ in range(n)]
                batch = group[-1]
                profiler.before(step, state)
                state, metrics = run.run_steps(state, group)
                step += n
                profiler.after(step, state)
                accum = metrics if accum is None else jax.tree.map(jnp.add, accum, metrics)
                accum_n += n
                if step % log_every == 0 or step == stop_at:
                    scalars = {k: float(v) / accum_n for k, v in jax.device_get(accum).items()}
                    problem = divergence.problem(scalars, step, accum_n)
                    if problem:
                        logging.error("%s", problem)
                        if divergence.action != "skip":  # (skip writes them below)
                            writer.write_scalars(step, scalars)
                        if divergence.action == "stop":
                            raise FloatingPointError(
                                f"{problem}; training stopped (config.divergence.action=stop; "
                                f"checkpoints in {ckpt.directory} are intact)"
                            )
                        if divergence.action == "rollback":
                            state, step = _rollback(run, ckpt, step - accum_n, problem)
                            batches = run.loader.iterate(step)
                            accum, accum_n, t_last = None, 0, time.time()
                            continue
                    else:  # the per-phase/player flags are all zero: keep the logs short
                        scalars = {
                            k: v
                            for k, v in scalars.items()
                            if k.count("/") < 2 or not k.startswith("guard/")
                        }
                    divergence.collapse_hints(scalars, step, accum_n)
                    now = time.time()
                    scalars["perf/steps_per_sec"] = accum_n / max(now - t_last, 1e-9)
                    scalars["perf/images_per_sec"] = (
                        scalars["perf/steps_per_sec"] * config.batch_size
                    )
                    t_last = now
                    scalars.update(engine.learning_rates(run.method, step))
                    writer.write_scalars(step, scalars)
                    progress.log(step, scalars)
                    accum, accum_n = None, 0
                ckpt.save(step, state, run.meta(step), force=preemption.requested)
                if not preemption.requested and (  # a preempted job has no time to evaluate
                    (eval_every and step % eval_every == 0 and step < total)
                    or (sample_every and step % sample_every == 0 and step < total)
                ):
                    evaluate_and_sample(step)
                if preemption.requested or ckpt.reached_preemption(step):
                    ckpt.wait()  # the message must be true when read (a failed write raises)
                    logging.warning(
                        "Preempted at step %d: checkpoint written to %s, exiting.",
                        step,
                        ckpt.directory,
                    )
                    break
            else:
                if step == total:
                    if batch is None:  # resumed at the end: nothing left to train
                        batch = run.loader.batch(step - 1)
                    evaluate_and_sample(step)
            if ckpt.latest_step() != step:
                ckpt.save(step, state, run.meta(step), force=True)
        finally:
            profiler.stop(step, state)  # a run that ended inside the profiled steps
            ckpt.close()
            writer.close()
            run.loader.close()
    return state
