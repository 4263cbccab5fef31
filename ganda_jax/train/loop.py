"""The training loop of one run, written once for every method.

:class:`Run` builds the method, the mesh, the optimizer and the input pipeline from a
config, and jits the step: one XLA program per iteration with the state donated, the batch
sharded over the ``data`` axis and the state replicated. :func:`train_run` initialises the
state (or restores the latest checkpoint in the workdir) and steps it; metrics stay on the
device and are fetched every ``log_every_steps`` (no per-step host sync)."""

from __future__ import annotations

import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from ganda_jax import engine
from ganda_jax.data import pipeline
from ganda_jax.methods import get_method
from ganda_jax.nets import cpu_conv
from ganda_jax.train import checkpointing, parallel, resume, writers
from ganda_jax.train.divergence import Divergence, rollback
from ganda_jax.train.profiling import StepProfiler


def jit_init_state(method: engine.Method, tx, sharding):
    """``engine.init_state`` jitted to ``sharding``, with the CPU options for a one-off
    program (:func:`cpu_conv.init_compiler_options`)."""
    return jax.jit(
        lambda rng, batch: engine.init_state(method, tx, rng, batch),
        out_shardings=sharding,
        compiler_options=cpu_conv.init_compiler_options(),
    )


class Preemption:
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
        self._init_fn = jit_init_state(self.method, self.tx, self.replicated)
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
        restore = lambda config, workdir: resume.restore_latest(config, workdir, self.replicated)  # noqa: E731
        return self.method.warm_start(state, restore)

    def abstract_state(self) -> engine.TrainState:
        return resume.abstract_state(self.method, self.tx, self.replicated)

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
        resume.check_fits(
            ckpt, step, meta, abstract, self.config, self.method.name, "workdir checkpoint"
        )
        state, meta = ckpt.restore(abstract, step)
        self.loader.check_state(meta["data"])
        return state, meta


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


def train_run(
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
    divergence = Divergence(config, run.method)
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
        scored = engine.eval_state(state)
        scalars = engine.without_baseline_metrics(run.method, run.method.evaluate(scored, run.mesh))
        if scalars:
            writer.write_scalars(step, scalars)
            logging.info(
                "eval @ %d: %s", step, ", ".join(f"{k}={v:.4f}" for k, v in sorted(scalars.items()))
            )
        if batch is not None:
            images = run.method.samples(scored, batch)
            if images:
                writer.write_images(step, images)

    profiler = StepProfiler(
        os.path.join(workdir, "profile"),
        num=config.get("profile_steps", 0),
        skip=config.get("profile_skip_steps", 5),
        first_step=step,
    )
    with Preemption() as preemption:
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
                            state, step = rollback(run, ckpt, step - accum_n, problem)
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
