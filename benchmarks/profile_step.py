"""Where one training step's time goes: XLA's ops of the compiled step, by category and by op.

  python benchmarks/profile_step.py --method pixelda                 # reference settings
  python benchmarks/profile_step.py --method cyclegan --image-size 128 --batch-size 4 --top 20
  python benchmarks/profile_step.py --method gta --xla-convs         # without ganda_jax.nets.cpu_conv
  python benchmarks/profile_step.py --method ccgan --ynn-convs       # YNNPACK's convolutions

Builds the same jitted step as ``throughput.py`` (``Bench``), runs it once to warm up,
then once under ``jax.profiler`` and reads the trace back (the Perfetto JSON the profiler
writes; no TensorBoard needed). It prints the step time, the op time summed by category
(the op name without its numeric suffix: ``ynn_fusion``, ``convolution``, ...) and the
slowest ops with their shape, window and the model code that made them (the HLO
``op_name``). On CPU, ops that run on the two cores at once add up to more than the
step's wall time. This is how the slow convolutions fixed in ``ganda_jax/cpu_conv.py``
were found. XLA's own (Eigen) convolutions, which training programs use on CPU
(``cpu_conv.compiler_options``), are mostly missing from the trace (PixelDA: 1.0 s of op time
in a 4.1 s profiled step); ``--ynn-convs`` profiles with YNNPACK's, which it sees.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import throughput  # noqa: E402

from ganda_jax.nets import cpu_conv  # noqa: E402


def op_times(trace_dir: str) -> collections.Counter:
    """Microseconds per XLA op name in the newest Perfetto trace under ``trace_dir``."""
    files = glob.glob(os.path.join(trace_dir, "**", "*.json.gz"), recursive=True)
    if not files:
        raise FileNotFoundError(f"the profiler wrote no trace under {trace_dir}")
    with gzip.open(max(files, key=os.path.getmtime)) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    times = collections.Counter()
    for e in events:
        name = e.get("name", "")
        # Complete events of the compiled program's ops; not Python frames ($...) or the
        # executor's own spans, which contain the ops.
        if e.get("ph") == "X" and not name.startswith(("$", "Thunk")):
            times[name] += e.get("dur", 0)
    return times


def describe(op: str, hlo: str) -> str:
    """``shape, window, op_name`` of ``op`` from the compiled HLO text."""
    m = re.search(r"%" + re.escape(op) + r" = (\S+) ", hlo)
    line = hlo[m.start() : hlo.find("\n", m.start())] if m else ""
    window = re.search(r"window=\{[^}]*\}", line)
    name = re.search(r'op_name="([^"]*)"', line)
    parts = [
        m.group(1) if m else "?",
        window.group(0) if window else "",
        name.group(1) if name else "",
    ]
    return " ".join(p for p in parts if p)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--method", required=True, choices=sorted(throughput.METHODS))
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--variant", default=None)
    p.add_argument("--top", type=int, default=15, help="how many of the slowest ops to list")
    p.add_argument(
        "--xla-convs", action="store_true", help="without ganda_jax.nets.cpu_conv's rewrites"
    )
    p.add_argument(
        "--ynn-convs",
        action="store_true",
        help="XLA's default YNNPACK convolutions (the profiler sees them; XLA's Eigen ones, "
        "the default here, are mostly missing from the trace)",
    )
    p.add_argument("--json", default=None, help="write the per-op times (ms) to this file")
    args = p.parse_args(argv)

    size, batch = throughput.METHODS[args.method]["settings"][0]
    cfg = throughput.build_config(
        args.method, args.image_size or size, args.batch_size or batch, args.dtype, args.variant
    )
    cpu_conv.CPU_REWRITES = not args.xla_convs
    cpu_conv.CPU_YNN_CONVS = args.ynn_convs
    bench = throughput.Bench(cfg)
    hlo = bench.compiled.as_text()
    bench.run(1)  # warm up
    with tempfile.TemporaryDirectory(prefix="ganda_profile_") as trace_dir:
        t0 = time.perf_counter()
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        bench.run(1)
        jax.profiler.stop_trace()
        wall = time.perf_counter() - t0
        times = op_times(trace_dir)
    by_kind = collections.Counter()
    for op, us in times.items():
        by_kind[re.sub(r"[.\d]+$", "", op)] += us
    total = sum(times.values())
    print(
        f"{args.method} {cfg.image_size}px batch {cfg.batch_size} {args.dtype} on "
        f"{jax.devices()[0].device_kind}: step {wall:.3f} s (profiled), op time {total / 1e6:.3f} s"
    )
    print("| op kind | ms | share |\n|---|---|---|")
    for kind, us in by_kind.most_common(12):
        print(f"| {kind} | {us / 1e3:.1f} | {us / total:.1%} |")
    print("\n| slowest ops | ms | what |\n|---|---|---|")
    for op, us in times.most_common(args.top):
        print(f"| {op} | {us / 1e3:.1f} | {describe(op, hlo)} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({op: us / 1e3 for op, us in times.most_common()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
