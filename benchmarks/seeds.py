"""Runs one config over several seeds and prints the mean and spread of its final evaluation.

Each seed is a separate ``train.py`` run in ``WORKDIR/seed_<k>`` (``--config.seed=k``, so the
initial weights, the batches and the draws all change; the embedded data do not); the final
``eval/*`` line of its ``metrics.jsonl`` is read (for CyCADA the last stage's,
``feature/metrics.jsonl``). ``--paired A B`` adds the per-seed difference ``A - B`` (a method
against the baseline trained in the same run, from the same weights on the same batches), whose
spread is what says whether a gain is real::

    python benchmarks/seeds.py --config configs/ccgan.py --seeds 0 1 2 --workdir /tmp/seeds \\
        --set data.labels_per_class=10 \\
        --paired eval/test_accuracy eval/supervised_only_accuracy --json out.json

A finished seed's workdir is reused (train.py resumes or skips it), so an interrupted sweep
goes on where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def final_eval(workdir: str) -> dict[str, float]:
    """The last line with ``eval/`` keys of the run's metrics (the last stage's, if staged)."""
    staged = os.path.join(workdir, "feature", "metrics.jsonl")  # CyCADA's last stage
    path = staged if os.path.exists(staged) else os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no metrics.jsonl in {workdir} (did the run fail?)")
    evals = []
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if any(k.startswith("eval/") for k in row):
                evals.append(row)
    if not evals:
        raise ValueError(f"{path} has no eval/ line")
    return {k: v for k, v in evals[-1].items() if k.startswith("eval/") or k == "step"}


def summarise(runs: dict[int, dict[str, float]], paired=None) -> dict[str, dict]:
    """``{key: {mean, std, min, max, n, per_seed}}`` over seeds (std with ddof=1), plus the
    paired difference ``A - B`` under the key ``'A - B'``."""
    keys = sorted({k for r in runs.values() for k in r if k.startswith("eval/")})
    cols = {k: {s: r[k] for s, r in runs.items() if k in r} for k in keys}
    if paired:
        a, b = paired
        cols[f"{a} - {b}"] = {s: r[a] - r[b] for s, r in runs.items() if a in r and b in r}
    out = {}
    for k, per_seed in cols.items():
        v = np.asarray(list(per_seed.values()), np.float64)
        out[k] = dict(
            mean=float(v.mean()),
            std=float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            min=float(v.min()),
            max=float(v.max()),
            n=len(v),
            per_seed=per_seed,
        )
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", required=True, help="e.g. configs/ccgan.py or configs/gta.py:paper")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--set", nargs="*", default=[], help="config overrides key=value")
    ap.add_argument("--paired", nargs=2, metavar=("A", "B"), help="report A - B per seed")
    ap.add_argument("--keys", nargs="*", help="eval keys to print (default: all)")
    ap.add_argument("--json", help="write the runs and the summary here")
    args = ap.parse_args(argv)

    runs, walls = {}, {}
    for seed in args.seeds:
        workdir = os.path.join(args.workdir, f"seed_{seed}")
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"--config={args.config}"]
        cmd += [f"--workdir={workdir}", f"--config.seed={seed}"]
        cmd += [f"--config.{kv}" for kv in args.set]
        print("$", " ".join(cmd), flush=True)
        t0 = time.time()
        os.makedirs(args.workdir, exist_ok=True)
        with open(os.path.join(args.workdir, f"seed_{seed}.log"), "w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        walls[seed] = time.time() - t0
        runs[seed] = final_eval(workdir)
        print(f"  seed {seed}: {walls[seed]:.0f} s", flush=True)

    summary = summarise(runs, args.paired)
    keys = args.keys or list(summary)
    if args.paired:
        keys = list(dict.fromkeys(list(keys) + [f"{args.paired[0]} - {args.paired[1]}"]))
    seeds_hdr = "".join(f"{'seed ' + str(s):>10}" for s in args.seeds)
    print(f"\n{'key':<48}{seeds_hdr}{'mean':>10}{'std':>10}")
    for k in keys:
        if k not in summary:
            continue
        per = [summary[k]["per_seed"].get(seed, float("nan")) for seed in args.seeds]
        cells = "".join(f"{v:>10.4f}" for v in per)
        print(f"{k:<48}{cells}{summary[k]['mean']:>10.4f}{summary[k]['std']:>10.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(vars(args), runs=runs, wall_s=walls, summary=summary), f, indent=2)
    return summary


if __name__ == "__main__":
    main()
