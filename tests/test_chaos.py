"""Crash safety of ``train.py``, each run as a real subprocess: SIGTERM finishes the step,
checkpoints and exits 0; SIGKILL at random moments, checkpoint writes included
(``scripts/chaos.py``), loses nothing; a checkpoint write that fails (the file-size limit
reached, as on a full disk) stops the run with a one-line error and keeps the previous
checkpoint. Every interrupted run, resumed, ends bit-identical to one uninterrupted run."""

import errno
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import ROOT, equal_trees

from ganda_jax.train import checkpointing

# Every test here starts train.py subprocesses (~3 min in all on 2 cores): CI runs them in its
# slow pass (`python -m pytest tests -m slow`) to keep the default suite under 15 minutes.
pytestmark = pytest.mark.slow

STEPS, SEED = 10, 0  # every test trains this run: one compilation, one reference


def _load_chaos():
    spec = importlib.util.spec_from_file_location(
        "chaos", os.path.join(ROOT, "scripts", "chaos.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["chaos"] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


chaos = _load_chaos()


def _env():
    # The session's compilation cache (tests/conftest.py), shared with the subprocesses.
    return chaos.env(os.environ["JAX_COMPILATION_CACHE_DIR"])


def _run(cmd, **kw):
    return subprocess.run(
        cmd, check=False, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600, **kw
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run every test compares with."""
    workdir = str(tmp_path_factory.mktemp("reference") / "wd")
    proc = _run(chaos.command(workdir, STEPS, SEED))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


def test_sigterm_checkpoints_exits_0_and_the_resume_is_bit_identical(reference, tmp_path):
    workdir = tmp_path / "wd"
    # No periodic checkpoint: the only one the first run writes is SIGTERM's.
    cmd = chaos.command(str(workdir), STEPS, SEED, checkpoint_every_steps=1000)
    log_path = tmp_path / "first.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            metrics, deadline = workdir / "metrics.jsonl", time.time() + 600
            while not (metrics.exists() and metrics.stat().st_size):  # stepping has started
                assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    out = log_path.read_text()
    assert rc == 0, out[-3000:]
    assert "SIGTERM received" in out
    ckpt_dir = str(workdir / "checkpoints")
    stopped = re.search(rf"Preempted at step (\d+): checkpoint written to {ckpt_dir}, exiting", out)
    assert stopped, out[-3000:]
    stopped = int(stopped.group(1))
    assert 1 <= stopped < STEPS
    assert chaos.scan(ckpt_dir) == ([stopped], [])

    proc = _run(cmd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Resumed from {ckpt_dir} at step {stopped}." in proc.stderr
    (ref_state, ref_meta), (state, meta) = chaos.final_states(
        [reference, str(workdir)], STEPS, SEED
    )
    assert meta["step"] == STEPS and meta["data"] == ref_meta["data"]
    assert equal_trees(ref_state, state)


def test_chaos_sigkills_during_writes_and_steps_lose_nothing(reference, tmp_path, capsys):
    argv = ["--kills", "2", "--steps", str(STEPS), "--seed", str(SEED), "--chaos_seed", "0"]
    rc = chaos.main([*argv, "--workdir", str(tmp_path), "--reference", reference])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.startswith("chaos: OK: 2 SIGKILLs"), out
    assert int(re.search(r"\((\d+) during a checkpoint write", out).group(1)) >= 1, out
    assert "final state bit-identical to the uninterrupted run" in out


def test_chaos_ten_sigkills_over_one_run(tmp_path, capsys):
    """The full-strength run (``scripts/chaos.py``'s defaults: 10 kills), in CI's slow pass."""
    rc = chaos.main(["--kills", "10", "--chaos_seed", "1", "--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.startswith("chaos: OK: 10 SIGKILLs"), out
    assert int(re.search(r"\((\d+) during a checkpoint write", out).group(1)) >= 3, out


# Trains to step 2 (checkpointed), saves that state, then caps the file size: Orbax's write of
# the step-4 checkpoint (its tensorstore data files) fails with EFBIG, as on a full disk.
_FILE_LIMIT = """
import json, resource, signal, sys, traceback
import jax, numpy as np
sys.path.insert(0, "scripts")
import chaos
from ganda_jax.train import trainer

workdir = sys.argv[1]
cfg = chaos.config(int(sys.argv[2]), int(sys.argv[3]))
cfg.checkpoint_every_steps = 2
state = trainer.train(cfg, workdir, max_steps=2)
np.savez(workdir + "/step2.npz", *[np.asarray(x) for x in jax.tree.leaves(state)])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails, not the process
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
try:
    trainer.train(cfg, workdir)
except Exception as err:  # what Python prints for it (stderr interleaves other threads' noise)
    with open(workdir + "/error.json", "w") as f:
        json.dump([type(err).__name__, str(err), traceback.format_exception(err)], f)
    raise
"""


def test_a_failed_checkpoint_write_stops_with_one_line_and_keeps_the_last(reference, tmp_path):
    workdir = tmp_path / "wd"
    ckpt_dir = str(workdir / "checkpoints")
    proc = _run([sys.executable, "-c", _FILE_LIMIT, str(workdir), str(STEPS), str(SEED)])
    assert proc.returncode == 1, proc.stderr[-3000:]
    kind, message, printed = json.loads((workdir / "error.json").read_text())
    assert kind == "CheckpointError"
    assert message == (
        "checkpoint at step 4 could not be written (File too large [errno 27]); the checkpoint "
        f"at step 2 in {ckpt_dir} is intact; raise the file-size limit (ulimit -f) and re-run "
        "to resume"
    )
    assert "ganda_jax.train.checkpointing.CheckpointError" in proc.stderr and message in proc.stderr
    # Its traceback is the main thread's few frames, not chained to the background thread's.
    printed = "".join(printed)
    assert len(printed.splitlines()) < 20 and "orbax" not in printed, printed
    assert chaos.scan(ckpt_dir)[0] == [2]

    # The step-2 checkpoint is what it was.
    ((state, meta),) = chaos.final_states([str(workdir)], STEPS, SEED, step=2)
    saved = np.load(workdir / "step2.npz")
    leaves = jax.tree.leaves(state)
    assert meta["step"] == 2 and len(leaves) == len(saved.files)
    assert all(np.array_equal(x, saved[f"arr_{i}"]) for i, x in enumerate(leaves))

    # Space again: the CLI resumes from step 2 and ends where the uninterrupted run did.
    proc = _run(chaos.command(str(workdir), STEPS, SEED, checkpoint_every_steps=2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Resumed from {ckpt_dir} at step 2." in proc.stderr
    (ref_state, _), (state, _) = chaos.final_states([reference, str(workdir)], STEPS, SEED)
    assert equal_trees(ref_state, state)


def test_a_full_disk_names_the_step_the_cause_and_the_intact_checkpoint(tmp_path, monkeypatch):
    ckpt = checkpointing.Checkpointer(str(tmp_path), save_every=1)
    try:
        ckpt.save(1, {"w": np.ones(3)}, {"step": 1})
        ckpt.wait()

        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(ckpt.manager, "save", full)
        with pytest.raises(checkpointing.CheckpointError) as err:
            ckpt.save(2, {"w": np.zeros(3)}, {"step": 2})
        assert str(err.value) == (
            "checkpoint at step 2 could not be written (No space left on device [errno 28]); "
            f"the checkpoint at step 1 in {tmp_path} is intact; free space and re-run to resume"
        )
        assert err.value.__cause__ is None and err.value.__suppress_context__
    finally:
        ckpt.close()
