"""Distributed reliability: a two-process job, checkpoints across device counts, process
counts and compute dtypes, and run-to-run determinism.

Every run is tiny CycleGAN (``runlocal`` at global batch 8, :func:`distributed_worker.config`),
as in tests/test_engine.py, so the 8- and 1-device programs are compiled once per session (the
compilation cache) for all of these tests and those. Runs stop before ``num_train_steps``,
which skips the end-of-run evaluation (its own compilations) except where it is under test.
"""

import json
import os
import socket
import subprocess
import sys
import time

import distributed_worker
import jax
import numpy as np
import pytest
from conftest import equal_trees

from ganda_jax.train import checkpointing, loop, parallel, trainer

# Multi-process and cross-device-count runs take ~3 min on 2 cores: CI runs them in its slow
# pass (`python -m pytest tests -m slow`) to keep the default suite under 15 minutes.
pytestmark = pytest.mark.slow

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed_worker.py")
NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 4  # 8 in all, as the single-process reference


def _config(**overrides):
    cfg = distributed_worker.config()
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


def _fields(state):
    return {f: getattr(state, f) for f in ("step", "params", "opt_state", "model_state", "extra")}


def _assert_same_state(a, b):
    """Bit-identical train states (every field, the RNG key's bits included)."""
    for field, value in _fields(a).items():
        assert equal_trees(value, getattr(b, field)), field
    assert np.array_equal(jax.device_get(a.rng), jax.device_get(b.rng))


def _on_devices(state, n: int) -> bool:
    leaf = state.params["G_AB"]["Conv_0"]["Conv_0"]["kernel"]
    return leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == n


# ---------------------------------------------------------------------------
# Two processes
# ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir: str, out_prefix: str, max_steps: list[int], timeout: float = 480) -> None:
    """Runs the worker as a 2-process job; kills every worker on any failure or timeout."""
    port = _free_port()
    procs, logs = [], []
    try:
        for i in range(NUM_PROCESSES):
            env = dict(
                os.environ,  # the session's compilation cache: the second job reuses the first's
                JAX_PLATFORMS="cpu",
                JAX_NUM_CPU_DEVICES=str(DEVICES_PER_PROCESS),
                JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                JAX_NUM_PROCESSES=str(NUM_PROCESSES),
                JAX_PROCESS_ID=str(i),
                GANDA_TEST_PARENT_PID=str(os.getpid()),  # the workers exit if this process dies
            )
            logs.append(open(f"{out_prefix}_p{i}.log", "w"))  # noqa: SIM115
            cmd = [sys.executable, WORKER, workdir, f"{out_prefix}_p{i}", *map(str, max_steps)]
            procs.append(subprocess.Popen(cmd, env=env, stdout=logs[-1], stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        # A failed process leaves the other blocked in a collective: stop at the first failure.
        while True:
            codes = [p.poll() for p in procs]  # every one polled (any() would stop early)
            if None not in codes or any(codes) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for log in logs:
            log.close()
    codes = [p.returncode for p in procs]
    if codes != [0] * NUM_PROCESSES:
        tails = []
        for i in range(NUM_PROCESSES):
            with open(f"{out_prefix}_p{i}.log") as f:
                lines = [line for line in f if not line.startswith("[Gloo]")]
            tails.append(f"--- process {i} (exit {codes[i]}):\n" + "".join(lines[-25:]))
        pytest.fail(f"2-process job {max_steps} failed or timed out:\n" + "\n".join(tails))


def _result(out_prefix: str, process: int, step: int | None = None) -> dict:
    """A worker's ``.json`` (``step=None``) or its state leaves after ``max_steps=step``."""
    if step is None:
        with open(f"{out_prefix}_p{process}.json") as f:
            return json.load(f)
    with np.load(f"{out_prefix}_p{process}_{step}.npz") as z:
        return {k: z[k] for k in z.files}


def _same_leaves(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_two_processes_train_resume_and_match_one_process(tmp_path):
    workdir, first, second = (str(tmp_path / n) for n in ("run", "first", "second"))
    cfg = _config()
    # Step 1 in this process (8 devices), so the 2-process jobs restore a single-process
    # checkpoint and never compile the initialisation.
    start = trainer.train(cfg, workdir, max_steps=1, mesh=parallel.make_mesh(8))
    _launch(workdir, first, [1, 3])  # restore (returns the step-1 state), train steps 2-3
    _launch(workdir, second, [3, 4])  # restore, step 4, then the end-of-run evaluation

    # The processes agree bit for bit: every logged scalar and every state (replicated).
    for out in (first, second):
        info = [_result(out, p) for p in range(NUM_PROCESSES)]
        assert [i["process_index"] for i in info] == [0, 1]
        assert {(i["process_count"], i["device_count"]) for i in info} == {(2, 8)}
        assert info[0]["metrics"] == info[1]["metrics"]
    for out, step in ((first, 1), (first, 3), (second, 3), (second, 4)):
        assert _same_leaves(_result(out, 0, step), _result(out, 1, step)), (out, step)
    # Each job resumed from exactly the state saved before it (by 1 process, then by 2).
    assert _same_leaves(_result(first, 0, 1), distributed_worker.state_leaves(start))
    assert _same_leaves(_result(second, 0, 3), _result(first, 0, 3))

    seen = {**_result(first, 0)["metrics"], **_result(second, 0)["metrics"]}
    assert sorted(seen, key=int) == ["2", "3", "4"]
    assert {"eval/psnr_AtoB", "eval/psnr_BtoA"} <= set(seen["4"])  # evaluated on 2 processes

    # Only process 0 wrote: one metrics line per step (and the evaluation's), no copies.
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 4]
    for r in lines[1:]:
        for k, v in r.items():
            if k != "step" and not k.startswith("perf/"):
                assert v == seen[str(r["step"])][k], (r["step"], k)
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["batch_size"] == 8
    assert sorted(os.listdir(os.path.join(workdir, "samples"))) == [
        "AtoB_0000004.png",
        "BtoA_0000004.png",
    ]

    # One process, 8 devices, the same global batches, each step from the 2-process job's
    # state before it. Whole trajectories are not compared, nor bitwise: the gradient and loss
    # means are all-reduced in another order across processes (gloo) than within one
    # (XLA:CPU), which changes last bits; Adam turns a gradient that is float noise (e.g. of
    # the conv biases in front of instance norm, zero in theory) into a full +-lr step, and
    # the GAN amplifies that to ~1e-3 relative in the losses within 3 steps. From the same
    # state one step agrees to rounding: losses to ~2e-7 relative (rtol 1e-5), parameters to
    # within an Adam step (a noise gradient's sign swings the update by up to ~2.5 lr at
    # these early steps; measured 2 lr).
    run = loop.Run(cfg, mesh=parallel.make_mesh(8))
    lr = cfg.optimizer.G.learning_rate
    ckpt = checkpointing.Checkpointer(
        os.path.join(workdir, "checkpoints"), save_every=1, async_save=False
    )
    try:
        assert ckpt.all_steps() == [1, 2, 3, 4]
        saved = {s: ckpt.restore(run.abstract_state(), s)[0] for s in (1, 2, 3, 4)}
    finally:
        ckpt.close()
    assert _same_leaves(distributed_worker.state_leaves(saved[4]), _result(second, 0, 4))
    for s in (2, 3, 4):
        state, metrics = run.step_fn(saved[s - 1], run.global_batch(s - 1))
        for k, v in jax.device_get(metrics).items():
            if k.count("/") == 2 and k.startswith("guard/"):  # logged only when non-zero
                assert v == 0 and k not in seen[str(s)], (s, k)
                continue
            np.testing.assert_allclose(v, seen[str(s)][k], rtol=1e-5, err_msg=f"step {s} {k}")
        mine, theirs = jax.device_get((state, saved[s]))
        assert int(mine.step) == int(theirs.step) == s
        assert np.array_equal(mine.rng, theirs.rng)
        for a, b in zip(jax.tree.leaves(mine.params), jax.tree.leaves(theirs.params)):
            np.testing.assert_allclose(a, b, rtol=0, atol=3 * lr, err_msg=f"step {s}")
        for k in ("pool_A", "pool_B"):  # this step's fakes, from the same generators
            np.testing.assert_allclose(mine.extra[k], theirs.extra[k], atol=1e-4, err_msg=k)
        assert int(mine.extra["pool_count_A"]) == int(theirs.extra["pool_count_A"])


# ---------------------------------------------------------------------------
# Checkpoints across device counts and compute dtypes
# ---------------------------------------------------------------------------


def test_checkpoint_moves_between_8_and_1_devices(tmp_path):
    """8 devices write step 1; 1 device restores it bit for bit and writes step 2; 8 devices
    restore that bit for bit and train step 3."""
    cfg, workdir = _config(), str(tmp_path)
    mesh8, mesh1 = parallel.make_mesh(8), parallel.make_mesh(1)
    saved = trainer.train(cfg, workdir, max_steps=1, mesh=mesh8)
    for mesh, n, step in ((mesh1, 1, 1), (mesh8, 8, 2)):
        # max_steps equal to the checkpointed step: train restores and returns at once.
        restored = trainer.train(cfg, workdir, max_steps=step, mesh=mesh)
        assert int(restored.step) == step and _on_devices(restored, n)
        _assert_same_state(restored, saved)
        saved = trainer.train(cfg, workdir, max_steps=step + 1, mesh=mesh)
        assert int(saved.step) == step + 1 and _on_devices(saved, n)
        assert not equal_trees(saved.params, restored.params)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        losses = [json.loads(line)["loss/G"] for line in f]
    assert len(losses) == 3 and np.all(np.isfinite(losses))


def test_bfloat16_checkpoint_restores_for_float32(tmp_path):
    """A float32 checkpoint resumes with bfloat16 compute, whose checkpoint resumes with
    float32 compute: parameters (and the whole state) stay float32, restored bit for bit."""
    f32, bf16, workdir = _config(), _config(dtype="bfloat16"), str(tmp_path)
    mesh = parallel.make_mesh(8)
    trainer.train(f32, workdir, max_steps=1, mesh=mesh)
    saved = trainer.train(bf16, workdir, max_steps=2, mesh=mesh)
    assert {x.dtype for x in jax.tree.leaves(saved.params)} == {np.dtype("float32")}
    restored = trainer.train(f32, workdir, max_steps=2, mesh=mesh)
    _assert_same_state(restored, saved)
    final = trainer.train(f32, workdir, max_steps=3, mesh=mesh)
    assert int(final.step) == 3
    assert not equal_trees(final.params, restored.params)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert all(np.isfinite(r["loss/G"]) and np.isfinite(r["loss/D"]) for r in lines)


# ---------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------


def _train_losses(cfg, workdir: str) -> tuple[list[dict], object]:
    state = trainer.train(cfg, workdir, max_steps=3, mesh=parallel.make_mesh(8))
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    # Timings differ from run to run by nature; everything else must not.
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in lines], state


def test_same_seed_same_losses_other_seed_other_losses(tmp_path):
    a, state_a = _train_losses(_config(), str(tmp_path / "a"))
    b, state_b = _train_losses(_config(), str(tmp_path / "b"))
    assert [r["step"] for r in a] == [1, 2, 3]
    assert a == b  # every logged value of every step, bit for bit
    _assert_same_state(state_a, state_b)
    c, _ = _train_losses(_config(seed=1), str(tmp_path / "c"))
    assert [r["step"] for r in c] == [1, 2, 3]
    for ra, rc in zip(a, c):
        assert ra["loss/G"] != rc["loss/G"] and ra["loss/D"] != rc["loss/D"], ra["step"]
