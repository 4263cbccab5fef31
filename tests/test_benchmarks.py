"""benchmarks/throughput.py end to end on a tiny network (the GPU checks depend on it)."""

import json
import os

import jax
from conftest import ROOT

from ganda_jax.nets import cpu_conv


def test_throughput_writes_a_row_with_what_the_backward_keeps(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    for flag in ("CPU_GRADIENTS", "CPU_REWRITES", "CPU_YNN_CONVS"):  # main() sets them
        monkeypatch.setattr(cpu_conv, flag, getattr(cpu_conv, flag))
    import throughput

    path = tmp_path / "rows.json"
    argv = "--method pixelda --variant runlocal --image-size 16 --batch-size 4 --devices 1"
    argv += " --warmup 0 --steps 1 --repeats 1 --json"
    assert throughput.main(argv.split() + [str(path)]) == 0
    out = json.loads(path.read_text())
    assert out["meta"]["backend"] == jax.default_backend()
    (row,) = out["rows"]
    assert (row["method"], row["image_size"], row["batch_size"]) == ("pixelda", 16, 4)
    assert row["train_baselines"] is True and row["devices"] == 1 and row["step_time_median_s"] > 0
    assert row["flops_per_step"] > 0 and row["images_per_s"] > 0
    by_phase = row["stored_for_backward_bytes_by_phase"]
    assert set(by_phase) == {"D", "GT", "source_only", "oracle"} and min(by_phase.values()) > 0
    assert row["stored_for_backward_bytes"] == max(by_phase.values())
    assert {"loss/D", "loss/GT", "loss/source_only"} <= set(row["first_step_metrics"])
