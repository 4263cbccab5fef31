"""Start-up time with and without JAX's persistent compilation cache.

  python benchmarks/compile_cache.py --method cyclegan
  python benchmarks/compile_cache.py --all --json cache.json

``train.py`` keeps compiled programs in ``workdir/compilation_cache``
(``config.compilation_cache_dir``), so a resumed run (after a preemption or a
crash) loads its training step instead of compiling it again. Per method,
at its first reference setting (``throughput.py``'s network, batch and image size),
two fresh processes build the same jitted training step with one new cache
directory: the first compiles and writes the cache (a run's first start), the second
reads it (a resume). Printed: the step's compile seconds (``throughput.py``'s
``compile_s``: tracing and lowering, which the cache does not save, and XLA's
compilation, which it does), and the process's
seconds from its start to a compiled step (imports, mesh, state init, compile),
cold and warm, their ratios, and whether the second process wrote nothing new
(every program it needed was in the cache).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import throughput  # noqa: E402


def child(method: str, size: int | None, batch: int | None, dtype: str) -> None:
    """One process: build throughput.Bench's step (init and compile), print its timings."""
    cfg = throughput.build_config(method, size, batch, dtype)
    bench = throughput.Bench(cfg)
    print(
        json.dumps(
            dict(compile_s=bench.compile_s, image_size=cfg.image_size, batch_size=cfg.batch_size)
        )
    )


def start(method, size, batch, dtype, cache: str) -> dict:
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--child", method, str(size or 0), str(batch or 0), dtype],
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{method}: the benchmark process failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return dict(out, process_s=wall, cache_entries=len(os.listdir(cache)))


def measure(method: str, dtype: str) -> dict:
    size, batch = throughput.METHODS[method]["settings"][0]
    with tempfile.TemporaryDirectory(prefix="ganda_compile_cache_") as cache:
        cold = start(method, size, batch, dtype, cache)
        warm = start(method, size, batch, dtype, cache)
    return dict(
        method=method,
        image_size=cold["image_size"],
        batch_size=cold["batch_size"],
        dtype=dtype,
        compile_s_cold=cold["compile_s"],
        compile_s_warm=warm["compile_s"],
        compile_speedup=cold["compile_s"] / warm["compile_s"],
        process_s_cold=cold["process_s"],
        process_s_warm=warm["process_s"],
        process_speedup=cold["process_s"] / warm["process_s"],
        cache_entries=cold["cache_entries"],
        all_hits=warm["cache_entries"] == cold["cache_entries"],
    )


COLUMNS = [
    ("method", "{}"),
    ("image_size", "{}"),
    ("batch_size", "{}"),
    ("compile_s_cold", "{:.2f}"),
    ("compile_s_warm", "{:.2f}"),
    ("compile_speedup", "{:.1f}x"),
    ("process_s_cold", "{:.1f}"),
    ("process_s_warm", "{:.1f}"),
    ("process_speedup", "{:.2f}x"),
    ("cache_entries", "{}"),
    ("all_hits", "{}"),
]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        method, size, batch, dtype = argv[1:5]
        child(method, int(size) or None, int(batch) or None, dtype)
        return 0
    methods = sorted(throughput.METHODS)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--method", choices=methods)
    p.add_argument("--all", action="store_true", help="every method")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    args = p.parse_args(argv)
    if not args.all and not args.method:
        p.error("give --method or --all")
    rows = []
    for method in methods if args.all else [args.method]:
        rows.append(measure(method, args.dtype))
        print(json.dumps(rows[-1]), file=sys.stderr)
    throughput.print_table(rows, COLUMNS)
    if args.json:
        throughput.write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
