"""benchmarks/: throughput.py end to end on a tiny network (the GPU checks depend on it), and
calibrate_digits.py's hybrid digit sets."""

import json
import os
import sys

import jax
import numpy as np
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


def test_calibrate_digits_hybrids_swap_geometry_and_keep_the_look():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import calibrate_digits

    from ganda_jax.data import synthetic

    before = {d: dict(s) for d, s in synthetic._DIGIT_STYLES.items()}
    kw = dict(num=64, split="train", seed=0)
    restyled = calibrate_digits._hybrid("target", "source", **kw)  # source strokes, target look
    plain = calibrate_digits._hybrid("source", "target", **kw)  # target strokes, source look
    assert synthetic._DIGIT_STYLES == before  # the styles are put back
    img = restyled["image"].astype(int)
    assert np.abs(img[..., 0] - img[..., 1]).mean() > 5  # coloured textures: the target's look
    grey = plain["image"].astype(int)
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 0] == grey[..., 2]).all()
    assert (grey.reshape(64, -1).min(axis=1) == 0).all()  # black background: the source's look
    for hybrid, domain in ((restyled, "target"), (plain, "source")):
        same = synthetic.digits(domain=domain, **kw)
        np.testing.assert_array_equal(hybrid["label"], same["label"])
        assert not np.array_equal(hybrid["image"], same["image"])  # other strokes


def test_seeds_reads_the_final_evaluation_and_summarises_paired_differences(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import seeds

    rows = [
        {"step": 5, "loss/D": 1.0},
        {"step": 5, "eval/acc": 0.1, "eval/base": 0.2},
        {"step": 10, "eval/acc": 0.5, "eval/base": 0.3},
        {"step": 10, "loss/D": 0.5},
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert seeds.final_eval(str(tmp_path)) == {"step": 10, "eval/acc": 0.5, "eval/base": 0.3}
    (tmp_path / "feature").mkdir()  # a staged run (CyCADA): its last stage is read
    (tmp_path / "feature" / "metrics.jsonl").write_text(json.dumps({"step": 3, "eval/acc": 0.9}))
    assert seeds.final_eval(str(tmp_path))["eval/acc"] == 0.9

    runs = {0: {"eval/acc": 0.5, "eval/base": 0.3}, 1: {"eval/acc": 0.6, "eval/base": 0.5}}
    s = seeds.summarise(runs, paired=("eval/acc", "eval/base"))
    assert s["eval/acc"]["mean"] == np.mean([0.5, 0.6])
    assert s["eval/acc"]["std"] == np.std([0.5, 0.6], ddof=1)
    diff = s["eval/acc - eval/base"]
    assert np.isclose(diff["mean"], 0.15) and np.isclose(diff["std"], np.std([0.2, 0.1], ddof=1))
    assert np.isclose(diff["min"], 0.1) and diff["n"] == 2
