"""Training throughput of every method: one full iteration (every phase) per step.

  python benchmarks/throughput.py --method cyclegan --image-size 256 --batch-size 1 --dtype float32
  python benchmarks/throughput.py --all --json results.json        # reference settings
  python benchmarks/throughput.py --method pixelda --compare-torch  # same settings in PyTorch
  python benchmarks/throughput.py --method cyclegan --scaling       # 1, 2, 4, 8 devices, same batch
  python benchmarks/throughput.py --method pixelda --variant runlocal --steps-per-call 8
  python benchmarks/throughput.py --method cyclegan --image-size 512 --remat --dtype bfloat16

The model is the config's paper-size network (variant ``paper`` where the
config has one), the batch is synthetic and already on the device, and the step
is the jitted training step that ``train.py`` runs (donated state, data sharded
over the mesh). After ``--warmup`` steps, ``--repeats`` timings of ``--steps``
steps each give the median and minimum step time. FLOPs per step come from
XLA's cost analysis of the compiled step; model FLOP utilisation is achieved
FLOP/s over ``--peak-tflops`` (or the table below for known chips).

Each run prints a table (one row per setting) and, with ``--json PATH``, writes
the rows as a JSON list.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
if "--scaling" in sys.argv:  # on a CPU-only machine: 8 virtual devices (set before jax loads)
    os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from ganda_jax import engine  # noqa: E402
from ganda_jax.methods import METHODS as REGISTRY
from ganda_jax.methods import get_method
from ganda_jax.nets import cpu_conv
from ganda_jax.train import loop, parallel


def _config_module(method: str):
    path = os.path.join(ROOT, "configs", f"{method}.py")
    spec = importlib.util.spec_from_file_location(f"bench_config_{method}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The one method registry (ganda_jax.methods); each config's BENCHMARK: its reference-size variant (and overrides),
# the PyTorch reference model (../shared/bench/torch_ref.py --model), (image size, batch) settings.
METHODS = {m: _config_module(m).BENCHMARK for m in REGISTRY}


# Dense peak TFLOP/s per chip by compute dtype (float32 matmuls/convs on NVIDIA run as TF32
# under XLA's default precision).
PEAK_TFLOPS = {
    "H100": {"bfloat16": 989.0, "float32": 494.0},
    "H200": {"bfloat16": 989.0, "float32": 494.0},
    "A100": {"bfloat16": 312.0, "float32": 156.0},
    "TPU v4": {"bfloat16": 275.0, "float32": 275.0},
    "TPU v5 lite": {"bfloat16": 197.0, "float32": 197.0},
    "TPU v5p": {"bfloat16": 459.0, "float32": 459.0},
}


def load_config(method: str, variant: str | None):
    module = _config_module(method)
    try:
        cfg = module.get_config(variant)
    except ValueError:  # the config has no such variant: its default network
        cfg = module.get_config(None)
    return cfg.unlock()


def build_config(method, image_size, batch_size, dtype, variant=None):
    spec = METHODS[method]
    cfg = load_config(method, spec["variant"] if variant is None else variant)
    for k, v in spec.get("overrides", {}).items():
        cfg[k] = v
    if image_size:
        cfg.image_size = int(image_size)
    if batch_size:
        cfg.batch_size = int(batch_size)
    cfg.dtype = dtype
    return cfg


def synthetic_batch(method: engine.Method, batch_size: int, seed: int = 0):
    """Random uint8 images in the loader's format; integer fields (labels, masks) stay 0."""
    rng = np.random.default_rng(seed)

    def fill(x):
        x = np.asarray(x)
        if x.dtype == np.uint8 and x.ndim == 4:
            return rng.integers(0, 256, x.shape, dtype=np.uint8)
        return x

    return jax.tree.map(fill, method.example_batch(batch_size))


def _cost(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def compiled_memory_bytes(compiled) -> int | None:
    """Device memory the compiled step needs (arguments + outputs + temporaries, less what
    donation aliases), from XLA's memory analysis: known before the step runs, on CPU too."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # some backends do not implement it
        return None
    if m is None:
        return None
    return int(
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )


def stored_for_backward_bytes(method: engine.Method, state, batch) -> dict[str, int]:
    """Bytes each phase's backward pass keeps from its forward pass (the residuals of the
    phase loss's VJP: activations, plus the parameters and inputs they need), by phase.

    A property of the traced program, the same on every backend: what ``model.remat``
    changes (XLA:CPU's memory analysis does not show it: its pipeline removes the
    optimization barriers that keep a recomputation apart before scheduling; RESULTS.md).
    """

    def residuals(state, batch):  # the train step's phases, without the updates
        batch = method.prepare(batch)
        step_rng = jax.random.fold_in(state.rng, state.step)
        carry, out = {}, {}
        first = engine.make_inputs(method, batch, state, jax.random.fold_in(step_rng, 0))
        for i, phase in engine.training_phases(method):
            inputs = first._replace(rng=jax.random.fold_in(step_rng, i), carry=carry)
            loss = engine.phase_loss(phase, state.params, inputs)
            trainable = {p: state.params[p] for p in phase.players}
            _, out[phase.name], aux = jax.vjp(loss, trainable, has_aux=True)
            carry = {**carry, **aux.carry}
        return out

    shapes = jax.eval_shape(residuals, state, batch)
    return {
        name: int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(vjp)))
        for name, vjp in shapes.items()
    }


def peak_memory_bytes(device) -> int | None:
    try:
        stats = device.memory_stats()
    except Exception:
        return None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def peak_tflops(dtype: str, override: float | None) -> float | None:
    if override:
        return override
    kind = jax.devices()[0].device_kind
    for chip, peaks in PEAK_TFLOPS.items():
        if chip.lower() in kind.lower():
            return peaks[dtype]
    return None


class Bench:
    """The jitted step of one method/setting on a mesh of ``num_devices``, ready to time."""

    def __init__(self, cfg, num_devices: int | None = None, steps_per_call: int = 1):
        self.cfg = cfg
        self.mesh = parallel.make_mesh(num_devices)
        parallel.check_batch_size(cfg.batch_size, self.mesh)
        self.method = get_method(cfg)
        self.tx = engine.make_optimizer(self.method)
        replicated = parallel.replicated(self.mesh)
        data = parallel.data_sharding(self.mesh)
        host_batch = synthetic_batch(self.method, cfg.batch_size)
        self.batch = jax.device_put(host_batch, data)
        init = loop.jit_init_state(self.method, self.tx, replicated)
        self.state = init(jax.random.PRNGKey(cfg.seed), self.batch)
        self.stored_bytes = stored_for_backward_bytes(self.method, self.state, self.batch)
        step_fn = engine.make_train_step(self.method, self.tx, guard=cfg.divergence.guard)
        self.steps_per_call = steps_per_call
        batch = self.batch
        if steps_per_call > 1:  # the trainer's config.steps_per_call: a scan over K batches
            step_fn = engine.make_multi_step(step_fn)
            data = parallel.stacked_data_sharding(self.mesh)
            stacked = jax.tree.map(lambda x: np.stack([x] * steps_per_call), host_batch)
            batch = self.batch = jax.device_put(stacked, data)
        step = jax.jit(
            step_fn,
            in_shardings=(replicated, data),
            out_shardings=(replicated, replicated),
            donate_argnums=(0,),
            compiler_options=cpu_conv.compiler_options(),
        )
        t0 = time.perf_counter()
        self.compiled = step.lower(self.state, batch).compile()
        self.compile_s = time.perf_counter() - t0
        # XLA's cost analysis of an SPMD program counts one device's share: scale to the step.
        per_device = _cost(self.compiled)
        self.flops = per_device * self.mesh.devices.size if per_device else None
        if steps_per_call > 1:  # XLA's cost analysis counts a loop's body once, not per trip
            self.flops = None

    def run(self, n: int):
        metrics = None
        for _ in range(n):
            self.state, metrics = self.compiled(self.state, self.batch)
        jax.block_until_ready((self.state, metrics))
        return metrics

    def time(self, warmup: int, steps: int, repeats: int) -> list[float]:
        """Seconds per training step (a call runs ``steps_per_call`` of them)."""
        self.run(warmup)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            self.run(steps)
            times.append((time.perf_counter() - t0) / (steps * self.steps_per_call))
        return times


def measure(method, image_size, batch_size, dtype, args, num_devices=None) -> dict:
    cfg = build_config(method, image_size, batch_size, dtype, args.variant)
    cfg.divergence.guard = not args.no_guard
    cfg.train_baselines = not args.no_baselines
    if args.remat and "remat" in cfg.model:
        cfg.model.remat = True
    elif args.remat and not args.all:  # with --all: the methods that have it
        raise SystemExit(f"--remat: {method}'s config has no model.remat")
    cpu_conv.CPU_GRADIENTS = args.cpu_conv_grads  # read when the step is traced
    cpu_conv.CPU_REWRITES = not args.xla_convs
    cpu_conv.CPU_YNN_CONVS = args.ynn_convs  # read when the step is compiled
    bench = Bench(cfg, num_devices, args.steps_per_call)
    # The first step from the seeded init: its losses let runs on other meshes be compared
    # (with --steps-per-call, the sums over the first call's steps).
    first = {k: float(v) for k, v in jax.device_get(bench.run(1)).items()}
    times = bench.time(args.warmup, args.steps, args.repeats)
    med = statistics.median(times)
    peak = peak_tflops(dtype, args.peak_tflops)
    achieved = bench.flops / med if bench.flops else None
    devices = bench.mesh.devices.size
    return dict(
        method=method,
        image_size=int(cfg.image_size),
        batch_size=int(cfg.batch_size),
        dtype=dtype,
        guard=bool(cfg.divergence.guard),
        train_baselines=bool(cfg.train_baselines),
        remat=bool(cfg.model.get("remat", False)),
        steps_per_call=args.steps_per_call,
        cpu_conv_grads=cpu_conv.CPU_GRADIENTS and jax.default_backend() == "cpu",
        cpu_conv_rewrites=cpu_conv.CPU_REWRITES and jax.default_backend() == "cpu",
        compiler_options=cpu_conv.compiler_options(),
        devices=int(devices),
        device_kind=jax.devices()[0].device_kind,
        compile_s=bench.compile_s,
        step_time_median_s=med,
        step_time_min_s=min(times),
        images_per_s=cfg.batch_size / med,
        images_per_s_per_device=cfg.batch_size / med / devices,
        peak_memory_bytes=peak_memory_bytes(jax.devices()[0]),
        compiled_memory_bytes=compiled_memory_bytes(bench.compiled),
        # the largest phase's (phases run one after another)
        stored_for_backward_bytes=max(bench.stored_bytes.values()),
        stored_for_backward_bytes_by_phase=bench.stored_bytes,
        flops_per_step=bench.flops,
        achieved_tflops=achieved / 1e12 if achieved else None,
        mfu=achieved / (peak * 1e12 * devices) if achieved and peak else None,
        params=int(sum(x.size for x in jax.tree.leaves(bench.state.params))),
        first_step_metrics=first,
    )


def torch_reference(method, image_size, batch_size, args) -> dict | None:
    model = METHODS[method]["torch"]
    if model is None:
        return None
    cmd = [
        sys.executable,
        args.torch_ref,
        "--model",
        model,
        "--img",
        str(image_size),
        "--batch",
        str(batch_size),
        "--steps",
        str(args.steps * args.repeats),
        "--warmup",
        str(args.warmup),
        "--device",
        "cuda" if jax.default_backend() == "gpu" else "cpu",
        "--json",
    ]
    if jax.default_backend() == "cpu":
        cmd += ["--threads", str(os.cpu_count())]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"torch reference failed ({' '.join(cmd)}): {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def scaling(method, image_size, batch_size, dtype, args) -> list[dict]:
    """Same global batch over 1, 2, 4, 8 devices; one-step losses must agree across them."""
    rows, first = [], None
    for n in (1, 2, 4, 8):
        if n > jax.device_count() or batch_size % n:
            continue
        row = measure(method, image_size, batch_size, dtype, args, num_devices=n)
        metrics = row["first_step_metrics"]
        if first is None:
            first = metrics
        row["max_abs_loss_diff_vs_1"] = max(abs(metrics[k] - first[k]) for k in first)
        rows.append(row)
    base = rows[0]["images_per_s_per_device"]
    for r in rows:
        r["per_device_efficiency"] = r["images_per_s_per_device"] / base
    return rows


COLUMNS = [
    ("method", "{}"),
    ("image_size", "{}"),
    ("batch_size", "{}"),
    ("dtype", "{}"),
    ("devices", "{}"),
    ("compile_s", "{:.1f}"),
    ("step_time_median_s", "{:.4f}"),
    ("step_time_min_s", "{:.4f}"),
    ("images_per_s", "{:.1f}"),
    ("peak_memory_bytes", "{:.3g}"),
    ("compiled_memory_bytes", "{:.3g}"),
    ("stored_for_backward_bytes", "{:.3g}"),
    ("flops_per_step", "{:.3g}"),
    ("achieved_tflops", "{:.3g}"),
    ("mfu", "{:.1%}"),
    ("torch_images_per_s", "{:.1f}"),
    ("speedup_vs_torch", "{:.2f}x"),
    ("per_device_efficiency", "{:.1%}"),
    ("max_abs_loss_diff_vs_1", "{:.2g}"),
]


def print_table(rows: list[dict], columns=COLUMNS) -> None:
    cols = [(k, f) for k, f in columns if any(r.get(k) is not None for r in rows)]
    cells = [[k for k, _ in cols]]
    for r in rows:
        cells.append([f.format(r[k]) if r.get(k) is not None else "-" for k, f in cols])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    for i, row in enumerate(cells):
        print("| " + " | ".join(c.rjust(w) for c, w in zip(row, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--method", choices=sorted(METHODS))
    p.add_argument("--all", action="store_true", help="every method at its reference settings")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--bf16-rows", action="store_true", help="with --all: also bfloat16 rows")
    p.add_argument("--variant", default=None, help="config variant (default: the method's)")
    p.add_argument("--devices", type=int, default=None, help="mesh size (default: all)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="steps per timed repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument(
        "--steps-per-call",
        type=int,
        default=1,
        help="training steps per dispatch (config.steps_per_call: lax.scan over stacked batches)",
    )
    p.add_argument("--compare-torch", action="store_true")
    p.add_argument(
        "--cpu-conv-grads",
        action="store_true",
        help="on CPU, ganda_jax.nets.cpu_conv's weight gradients (GANDA_CPU_CONV_GRADS=1) instead of XLA's",
    )
    p.add_argument(
        "--xla-convs",
        action="store_true",
        help="on CPU, XLA's own convolutions without ganda_jax.nets.cpu_conv's rewrites "
        "(GANDA_CPU_CONV_REWRITES=0)",
    )
    p.add_argument(
        "--ynn-convs",
        action="store_true",
        help="on CPU, XLA's default YNNPACK convolution kernels (GANDA_CPU_YNN_CONVS=1) "
        "instead of its Eigen ones",
    )
    p.add_argument(
        "--no-guard",
        action="store_true",
        help="time the step without the NaN/inf guard (config.divergence.guard=False)",
    )
    p.add_argument(
        "--no-baselines",
        action="store_true",
        help="without the comparison baselines some methods train in every step "
        "(config.train_baselines=False; the PyTorch references train none)",
    )
    p.add_argument(
        "--remat",
        action="store_true",
        help="recompute the networks' activations in the backward pass (config.model.remat; "
        "cyclegan, cycada)",
    )
    p.add_argument(
        "--torch-ref",
        default=os.path.join(ROOT, "..", "shared", "bench", "torch_ref.py"),
        help="path of torch_ref.py",
    )
    p.add_argument("--scaling", action="store_true", help="1, 2, 4, 8 devices, same global batch")
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    args = p.parse_args(argv)
    if not args.all and not args.method:
        p.error("give --method or --all")

    if args.all:
        plan = [(m, s, b, "float32") for m in METHODS for s, b in METHODS[m]["settings"]]
        if args.bf16_rows:
            plan += [(m, s, b, "bfloat16") for m, s, b, _ in plan]
    else:
        settings = METHODS[args.method]["settings"][0]
        plan = [
            (
                args.method,
                args.image_size or settings[0],
                args.batch_size or settings[1],
                args.dtype,
            )
        ]

    rows = []
    for method, size, batch, dtype in plan:
        if args.scaling:
            rows += scaling(method, size, batch, dtype, args)
            continue
        row = measure(method, size, batch, dtype, args, args.devices)
        if args.compare_torch and dtype == "float32":
            ref = torch_reference(method, row["image_size"], row["batch_size"], args)
            if ref is not None:
                row["torch_images_per_s"] = ref["images_per_s"]
                row["torch_model"] = ref["model"]
                row["speedup_vs_torch"] = row["images_per_s"] / ref["images_per_s"]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)

    print_table(rows)
    if args.json:
        write_json(args.json, rows)
    return 0


def write_json(path: str, rows: list[dict]) -> None:
    """``{"meta": versions, backend, machine, date, argv; "rows": rows}`` to ``path``."""
    meta = dict(
        jax=jax.__version__,
        backend=jax.default_backend(),
        device_kind=jax.devices()[0].device_kind,
        machine=platform.platform(),
        date=time.strftime("%Y-%m-%d"),
        argv=sys.argv,
    )
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
