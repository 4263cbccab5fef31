"""Crash-safety chaos run: SIGKILL a training run at random moments, restart it, compare.

  python scripts/chaos.py --kills 10 --workdir /tmp/chaos

Trains the tiny CycleGAN (``configs/cyclegan.py:runlocal``, a checkpoint every step) once
without interruption (``WORKDIR/ref``), then again in ``WORKDIR/run`` as a subprocess that is
killed with SIGKILL ``--kills`` times, spread over the run, and restarted after each kill. The
kills cycle through three moments: during a checkpoint write (Orbax writes into
``<step>.orbax-checkpoint-tmp`` and renames it when complete: polling for that directory
catches the write), at a random moment while stepping, and at a random moment of start-up
(imports, compilation, the restore itself). A kill counts as "during a write" when the process
left a temporary directory behind. ``--reference DIR`` compares with an existing uninterrupted
run of the same ``--steps`` and ``--seed`` instead of training one.

Passes (exit 0) when every restart that got as far as restoring resumed from the newest
complete checkpoint on disk (never a half-written one), no run failed or logged a traceback,
the last restart finished the run, at least one kill hit a write, and the final train state
(every array: parameters, optimizer state, image pools, RNG) and data position are
bit-identical to the uninterrupted run's. Prints a summary (and the problems, if any); exits 1
otherwise. The subprocesses share a persistent compilation cache
(``$JAX_COMPILATION_CACHE_DIR`` if set, else ``WORKDIR/jax_cache``) so restarts are cheap.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import random
import re
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before jax is imported (the final comparison)

TMP_SUFFIX = ".orbax-checkpoint-tmp"
RESUMED = re.compile(r"Resumed from \S+ at step (\d+)\.")
MODES = ("write", "step", "startup")


def config(num_train_steps: int, seed: int):
    """The config the subprocesses train (same overrides as their command line)."""
    spec = importlib.util.spec_from_file_location(
        "configs_cyclegan", os.path.join(ROOT, "configs", "cyclegan.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config("runlocal").unlock()
    cfg.update({"num_train_steps": num_train_steps, "seed": seed})
    return cfg


def command(
    workdir: str, num_train_steps: int, seed: int, checkpoint_every_steps: int = 1
) -> list[str]:
    """``train.py`` on :func:`config` (what it trains does not depend on the checkpoint
    interval, so runs with other intervals end in the same state)."""
    overrides = {
        "num_train_steps": num_train_steps,
        "seed": seed,
        "checkpoint_every_steps": checkpoint_every_steps,
        "log_every_steps": 1,
    }
    flags = [f"--config.{k}={v}" for k, v in overrides.items()]
    return [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        "--config=" + os.path.join(ROOT, "configs", "cyclegan.py") + ":runlocal",
        *flags,
        f"--workdir={workdir}",
    ]


def env(cache_dir: str) -> dict:
    return dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        JAX_NUM_CPU_DEVICES="1",  # the same device count in every run, whatever the caller has
        JAX_COMPILATION_CACHE_DIR=cache_dir,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
    )


def scan(ckpt_dir: str) -> tuple[list[int], list[str]]:
    """(complete checkpoint steps, temporary directories of unfinished writes)."""
    try:
        names = os.listdir(ckpt_dir)
    except FileNotFoundError:
        return [], []
    return sorted(int(n) for n in names if n.isdigit()), sorted(n for n in names if TMP_SUFFIX in n)


def _tmp_stamps(ckpt_dir: str) -> set[tuple[str, int]]:
    """Each unfinished write's (name, ctime): a write in progress changes its directory's."""
    out = set()
    for n in scan(ckpt_dir)[1]:
        try:
            out.add((n, os.stat(os.path.join(ckpt_dir, n)).st_ctime_ns))
        except FileNotFoundError:
            pass
    return out


@dataclasses.dataclass
class Kill:
    mode: str
    after_s: float  # since the process started
    latest_before: int | None  # newest complete checkpoint when the process started
    latest_after: int | None  # ... when it was dead
    tmp_dirs: list[str]  # unfinished writes this process left behind

    @property
    def during_write(self) -> bool:
        return bool(self.tmp_dirs)


class _Process:
    """One ``train.py`` subprocess, its log file, and what was on disk when it started."""

    def __init__(self, cmd, env, ckpt_dir: str, log_path: str):
        self.ckpt_dir = ckpt_dir
        self.log_path = log_path
        steps, _ = scan(ckpt_dir)
        self.expected_resume = steps[-1] if steps else None
        self.stale_tmp = _tmp_stamps(ckpt_dir)  # left by an earlier kill
        self.log = open(log_path, "w")  # noqa: SIM115 - the child writes it until it ends
        self.started = time.time()
        self.first_step_s: float | None = None  # launch to its first new checkpoint
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT
        )

    def latest(self) -> int | None:
        steps, _ = scan(self.ckpt_dir)
        return steps[-1] if steps else None

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.log.close()

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.log.close()

    def text(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def resumed_step(self) -> int | None:
        found = RESUMED.findall(self.text())
        return int(found[-1]) if found else None

    def tail(self, n: int = 15) -> str:
        return "".join(self.text().splitlines(keepends=True)[-n:])


def _latest_or(p: _Process) -> int:
    return -1 if p.expected_resume is None else p.expected_resume


def _wait_until(cond, proc: _Process, timeout: float, poll: float) -> bool:
    """Polls ``cond`` until it holds (True) or the process exits or time runs out (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        if proc.proc.poll() is not None:
            return False
        time.sleep(poll)
    return False


def _wait_and_kill(
    p: _Process, mode: str, rng: random.Random, startup_s: float, advance: int, timeout: float
):
    """Waits for ``mode``'s moment (after ``advance`` new checkpoints, unless at start-up),
    then SIGKILLs; None if the process ended first."""
    base = _latest_or(p)

    def stepped() -> bool:
        latest = p.latest()
        if latest is not None and latest > base and p.first_step_s is None:
            p.first_step_s = time.time() - p.started
        return latest is not None and latest >= base + advance

    if mode == "startup":  # imports, compilation, the restore: before the first new step
        _wait_until(lambda: False, p, rng.uniform(0.0, startup_s), 0.02)
    elif mode == "step":
        if not _wait_until(stepped, p, timeout, 0.02):
            return None
        time.sleep(rng.uniform(0.0, 0.6))
    else:  # write: after the advance, the next write in flight
        if not _wait_until(stepped, p, timeout, 0.01):
            return None

        def writing():
            newest = max(scan(p.ckpt_dir)[0], default=-1)
            fresh = _tmp_stamps(p.ckpt_dir) - p.stale_tmp
            return any(int(n.split(".")[0]) > newest for n, _ in fresh)

        if not _wait_until(writing, p, timeout, 0.002):
            return None
        time.sleep(rng.uniform(0.0, 0.02))
    if p.proc.poll() is not None:
        return None
    after = time.time() - p.started
    p.kill()
    steps, _ = scan(p.ckpt_dir)
    fresh = sorted(n for n, _ in _tmp_stamps(p.ckpt_dir) - p.stale_tmp)
    return Kill(mode, after, p.expected_resume, steps[-1] if steps else None, fresh)


def final_states(
    workdirs: list[str], num_train_steps: int, seed: int, step: int | None = None
) -> list[tuple]:
    """``(state, meta)`` of each workdir's final checkpoint (or ``step``'s), restored onto
    one CPU device."""
    import jax

    from ganda_jax import engine
    from ganda_jax.methods import get_method
    from ganda_jax.train import checkpointing, resume

    cfg = config(num_train_steps, seed)
    method = get_method(cfg)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    abstract = resume.abstract_state(method, engine.make_optimizer(method), sharding)
    out = []
    for w in workdirs:
        ckpt = checkpointing.Checkpointer(
            os.path.join(w, "checkpoints"), save_every=1, async_save=False
        )
        try:
            out.append(ckpt.restore(abstract, step or num_train_steps))
        finally:
            ckpt.close()
    return out


def differences(a, b) -> list[str]:
    """Paths of the arrays that are not bit-identical."""
    import jax
    import numpy as np

    la, treedef_a = jax.tree_util.tree_flatten_with_path(a)
    lb, treedef_b = jax.tree_util.tree_flatten_with_path(b)
    if treedef_a != treedef_b:
        return ["tree structure"]
    return [
        jax.tree_util.keystr(path)
        for (path, x), (_, y) in zip(la, lb)
        if not np.array_equal(np.asarray(x), np.asarray(y))
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10, help="SIGKILLs over the run")
    parser.add_argument("--workdir", required=True, help="an empty or new directory")
    parser.add_argument("--steps", type=int, default=0, help="train steps (0: 3 * kills + 4)")
    parser.add_argument("--seed", type=int, default=0, help="the training seed")
    parser.add_argument("--chaos_seed", type=int, default=None, help="kill timing (random)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per wait")
    parser.add_argument("--reference", default="", help="an uninterrupted run to compare with")
    args = parser.parse_args(argv)
    steps = args.steps or 3 * args.kills + 4
    chaos_seed = random.randrange(2**31) if args.chaos_seed is None else args.chaos_seed
    rng = random.Random(chaos_seed)
    workdir = os.path.abspath(args.workdir)
    run_dir, logs = os.path.join(workdir, "run"), os.path.join(workdir, "logs")
    ref_dir = os.path.abspath(args.reference) if args.reference else os.path.join(workdir, "ref")
    for d in (run_dir,) if args.reference else (run_dir, ref_dir):
        if os.path.exists(d):
            print(f"chaos: {d} exists; use an empty --workdir", file=sys.stderr)
            return 2
    os.makedirs(logs, exist_ok=True)
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(workdir, "jax_cache")
    child_env = env(cache)
    t0 = time.time()
    problems: list[str] = []

    if not args.reference:  # the uninterrupted run (it also fills the compilation cache)
        ref = _Process(
            command(ref_dir, steps, args.seed),
            child_env,
            os.path.join(ref_dir, "checkpoints"),
            os.path.join(logs, "reference.log"),
        )
        rc = ref.wait(args.timeout)
        if rc != 0:
            print(f"chaos: the reference run failed (exit {rc}):\n{ref.tail()}", file=sys.stderr)
            return 1
    startup_s = 8.0  # refined from each run: launch to its first new checkpoint

    kills: list[Kill] = []
    runs: list[_Process] = []
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    for i in range(args.kills + 1):
        p = _Process(
            command(run_dir, steps, args.seed),
            child_env,
            ckpt_dir,
            os.path.join(logs, f"run_{i:02d}.log"),
        )
        runs.append(p)
        if i == args.kills:  # the last restart runs to the end
            rc = p.wait(args.timeout * 2)
            if rc != 0:
                problems.append(f"the final restart exited {rc}:\n{p.tail()}")
            break
        # Spread the kills over the run: on average an equal share of the steps left, keeping
        # one for each later kill and one for the end.
        room = steps - max(_latest_or(p), 0) - (args.kills - i)
        advance = max(1, min(room, round(rng.uniform(1, 2 * room / (args.kills - i + 1)))))
        mode = MODES[i % len(MODES)]
        kill = _wait_and_kill(p, mode, rng, startup_s, advance, args.timeout)
        if kill is None:
            rc = p.wait(args.timeout)
            if rc == 0:
                problems.append(
                    f"the run finished after {i} kill(s), before all {args.kills}: raise --steps"
                )
            else:
                problems.append(f"restart {i} exited {rc} before its kill:\n{p.tail()}")
            break
        kills.append(kill)
        startup_s = p.first_step_s or startup_s

    # Every restart that got as far as restoring took the newest complete checkpoint.
    not_reached = 0
    for i, p in enumerate(runs):
        got = p.resumed_step()
        if p.expected_resume is None:
            if got is not None:
                problems.append(f"run {i} resumed from step {got} in an empty directory")
        elif got is None:
            not_reached += 1
            if p is runs[-1]:
                problems.append(f"the final restart did not resume:\n{p.tail()}")
        elif got != p.expected_resume:
            problems.append(f"run {i} resumed from step {got}, expected {p.expected_resume}")
        if "Traceback" in p.text():
            problems.append(f"run {i} logged a traceback:\n{p.tail()}")

    n_write = sum(k.during_write for k in kills)
    if kills and not n_write:
        problems.append("no kill hit a checkpoint write (rerun: the timing is random)")

    n_arrays = 0
    if not problems:
        (ref_state, ref_meta), (state, meta) = final_states([ref_dir, run_dir], steps, args.seed)
        diff = differences(ref_state, state)
        if diff:
            problems.append(f"final state differs in {len(diff)} array(s): {', '.join(diff[:8])}")
        for key in ("step", "data", "rollbacks"):
            if ref_meta.get(key) != meta.get(key):
                problems.append(f"meta[{key!r}]: {meta.get(key)!r} vs {ref_meta.get(key)!r}")
        import jax

        n_arrays = len(jax.tree.leaves(state))

    restarts = len(runs) - 1
    by_mode = ", ".join(f"{sum(k.mode == m for k in kills)} {m}" for m in MODES)
    print(
        f"chaos: {'OK' if not problems else 'FAILED'}: {len(kills)} SIGKILLs over {steps} steps "
        f"({n_write} during a checkpoint write; aimed: {by_mode}), {restarts} restarts "
        f"({restarts - not_reached} reached the restore before the next kill"
        + (", each from the newest complete checkpoint" if not problems else "")
        + ")"
        + (
            f"; final state bit-identical to the uninterrupted run ({n_arrays} arrays)"
            if n_arrays and not problems
            else ""
        )
        + f"; {time.time() - t0:.0f}s, --chaos_seed {chaos_seed}"
    )
    for k in kills:
        print(
            f"  kill {k.mode:7s} at {k.after_s:5.1f}s: latest checkpoint {k.latest_before} -> "
            f"{k.latest_after}" + (f", unfinished: {', '.join(k.tmp_dirs)}" if k.tmp_dirs else "")
        )
    for prob in problems:
        print(f"  problem: {prob}")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
