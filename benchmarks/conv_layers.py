"""Every distinct convolution layer of a method's networks, alone: forward and both gradients.

  python benchmarks/conv_layers.py --method cyclegan --image-size 256 --batch-size 1
  python benchmarks/conv_layers.py --method pixelda --compare-torch --json layers.json
  python benchmarks/conv_layers.py --method cyclegan --ynn-convs     # YNNPACK's kernels

Finds the layers by initializing the method's networks (as ``throughput.py`` configures
them) under ``flax.linen.intercept_methods``: each ``nn.Conv`` and ``layers.ConvTranspose``
call, with its input shape, kernel, strides and padding (reflect padding happens before the
conv, so those show as unpadded). Each distinct layer is then timed at the step's batch size
(init sees a smaller batch in some methods): ``y = conv(x, w)`` alone, and ``y`` with the
gradients with respect to ``x`` and ``w`` for a fixed random ``dy`` (no loss arithmetic):

* ``lax``: ``lax.conv_general_dilated`` / ``lax.conv_transpose`` as written;
* ``ganda``: ``ganda_jax.nets.cpu_conv`` (its CPU rewrites), what the methods use;
* ``torch`` (``--compare-torch``, when torch is installed): ``conv2d`` /
  ``conv_transpose2d`` with the same padding, NCHW, ``--threads`` threads;

the JAX programs compiled with the training steps' options (``cpu_conv.compiler_options()``;
``--ynn-convs`` for XLA's defaults). GFLOP counts ``2 * outputs * k_h * k_w * C_in`` per
pass (a transposed conv: per input pixel). The ``x`` gradient is timed too for the first
layer of a network, whose input needs none in most steps. Prints a table; ``--json PATH``
writes the rows. Where a whole step loses to PyTorch, this says which layers do.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import throughput  # noqa: E402
from jax import lax  # noqa: E402

from ganda_jax.methods import get_method
from ganda_jax.nets import cpu_conv, layers  # noqa: E402

DN = ("NHWC", "HWIO", "NHWC")


def find_layers(cfg) -> list[dict]:
    """The distinct conv layers the method's ``init`` calls, in call order."""
    method = get_method(cfg)
    found, seen, network = [], set(), [""]

    def record(next_fun, args, kwargs, context):
        m = context.module
        if context.method_name == "__call__" and not m.scope.path:
            network[0] = type(m).__name__  # a network's root module: name its layers by it
        if context.method_name == "__call__" and isinstance(m, (nn.Conv, layers.ConvTranspose)):
            x = args[0]
            transposed = isinstance(m, layers.ConvTranspose)
            k = tuple(m.kernel_size)
            strides = m.strides or (1, 1)
            strides = (strides, strides) if isinstance(strides, int) else tuple(strides)
            padding = m.padding
            if not transposed and isinstance(padding, str):
                padding = lax.padtype_to_pads(x.shape[1:3], k, strides, padding)
            elif transposed and isinstance(padding, str):
                padding = [cpu_conv._transpose_padding(kk, s, padding) for kk, s in zip(k, strides)]
            if isinstance(padding, int):
                padding = ((padding, padding), (padding, padding))
            path = [str(p) for p in m.scope.path]
            if isinstance(m.parent, layers.Conv):  # layers.Conv's inner nn.Conv: one layer
                path = path[:-1]
            layer = dict(
                kind="transpose" if transposed else "conv",
                shape=tuple(int(d) for d in x.shape[1:]),
                kernel=k,
                features=int(m.features),
                strides=strides,
                padding=tuple((int(lo), int(hi)) for lo, hi in padding),
                name="/".join((network[0], *path)),
            )
            key = tuple(v for k_, v in layer.items() if k_ != "name")
            if key not in seen:
                seen.add(key)
                found.append(layer)
        return next_fun(*args, **kwargs)

    batch = method.prepare(throughput.synthetic_batch(method, cfg.batch_size))
    with nn.intercept_methods(record):
        jax.eval_shape(lambda: method.init(jax.random.PRNGKey(0), batch))
    return found


def _apply(layer, impl):
    s, pads = layer["strides"], layer["padding"]
    if layer["kind"] == "transpose":
        if impl == "lax":
            return lambda x, w: lax.conv_transpose(x, w, s, pads, dimension_numbers=DN)
        return lambda x, w: cpu_conv.conv_transpose(x, w, s, pads)
    fn = lax.conv_general_dilated if impl == "lax" else cpu_conv.conv_general_dilated
    return lambda x, w: fn(x, w, s, pads, dimension_numbers=DN)


def median_seconds(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after one call to compile and warm up."""
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def flops(layer, batch: int, out_hw) -> float:
    kh, kw = layer["kernel"]
    cin, cout = layer["shape"][-1], layer["features"]
    if layer["kind"] == "transpose":  # each input pixel scatters a k x k x cout patch
        h, w = layer["shape"][:2]
        return 2.0 * batch * h * w * cin * kh * kw * cout
    return 2.0 * batch * out_hw[0] * out_hw[1] * cout * kh * kw * cin


def jax_time(layer, batch, impl, repeats, options):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, *layer["shape"])), jnp.float32)
    w_shape = (*layer["kernel"], layer["shape"][-1], layer["features"])
    w = jnp.asarray(0.05 * rng.standard_normal(w_shape), jnp.float32)
    f = _apply(layer, impl)
    out = jax.eval_shape(f, x, w)
    dy = jnp.asarray(rng.standard_normal(out.shape), jnp.float32)

    def both(x, w, dy):
        y, vjp = jax.vjp(f, x, w)
        return y, vjp(dy)

    both = jax.jit(both, compiler_options=options)
    fwd = jax.jit(f, compiler_options=options)
    return out.shape[1:3], {
        "forward": median_seconds(lambda: jax.block_until_ready(fwd(x, w)), repeats),
        "forward + both grads": median_seconds(
            lambda: jax.block_until_ready(both(x, w, dy)), repeats
        ),
    }


def torch_time(layer, batch, repeats, threads):
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    h, wd, cin = layer["shape"]
    kh, kw = layer["kernel"]
    cout, s = layer["features"], layer["strides"]
    x = torch.randn(batch, cin, h, wd, requires_grad=True)
    (pt, pb), (pl, pr) = layer["padding"]
    if layer["kind"] == "transpose":
        # lax pads the dilated input by (lo, hi); torch by (k-1-p, k-1-p+output_padding):
        # (2, 1) is (1, 2) shifted by a pixel, the same cost
        w = torch.randn(cin, cout, kh, kw, requires_grad=True)
        pad = (kh - 1 - min(pt, pb), kw - 1 - min(pl, pr))
        out_pad = (abs(pb - pt), abs(pr - pl))
        if min(pad) < 0 or out_pad[0] >= s[0] or out_pad[1] >= s[1]:
            return None

        def f():
            return torch.nn.functional.conv_transpose2d(
                x, w, stride=s, padding=pad, output_padding=out_pad
            )
    else:
        w = torch.randn(cout, cin, kh, kw, requires_grad=True)

        def f():  # conv2d's own padding where symmetric, as the torch models use it
            if (pt, pl) == (pb, pr):
                return torch.nn.functional.conv2d(x, w, stride=s, padding=(pt, pl))
            xp = torch.nn.functional.pad(x, (pl, pr, pt, pb))
            return torch.nn.functional.conv2d(xp, w, stride=s)

    with torch.no_grad():
        dy = torch.randn_like(f())

    def fwd():
        with torch.no_grad():
            f()

    def both():
        f().backward(dy)

    return {
        "forward": median_seconds(fwd, repeats),
        "forward + both grads": median_seconds(both, repeats),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--method", required=True, choices=sorted(throughput.METHODS))
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--variant", default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compare-torch", action="store_true")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--ynn-convs", action="store_true", help="XLA:CPU's default YNNPACK kernels")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    size, batch = throughput.METHODS[a.method]["settings"][0]
    cfg = throughput.build_config(
        a.method, a.image_size or size, a.batch_size or batch, "float32", a.variant
    )
    cpu_conv.CPU_YNN_CONVS = a.ynn_convs
    options = cpu_conv.compiler_options()
    rows = []
    for layer in find_layers(cfg):
        out_hw, lax_t = jax_time(layer, cfg.batch_size, "lax", a.repeats, options)
        _, ganda_t = jax_time(layer, cfg.batch_size, "ganda", a.repeats, options)
        torch_t = (
            torch_time(layer, cfg.batch_size, a.repeats, a.threads) if a.compare_torch else None
        )
        rows.append(
            dict(
                layer,
                batch=cfg.batch_size,
                gflop_per_pass=flops(layer, cfg.batch_size, out_hw) / 1e9,
                lax_s=lax_t,
                ganda_s=ganda_t,
                torch_s=torch_t,
            )
        )
    print(
        f"{a.method} {cfg.image_size}px batch {cfg.batch_size}, float32, backend "
        f"{jax.default_backend()}, compiler options {options or 'XLA defaults'}; ms, median of "
        f"{a.repeats}; fwd+grads = forward and both gradients"
    )
    print(
        "| layer | input | k / s | pads | GFLOP/pass | lax fwd | ganda fwd | torch fwd "
        "| lax fwd+grads | ganda fwd+grads | torch fwd+grads | torch / ganda |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    key_f, key_b = "forward", "forward + both grads"
    for r in rows:
        t = r["torch_s"] or {}
        ms = lambda d, k: f"{1e3 * d[k]:.1f}" if d and k in d else "-"  # noqa: E731
        ratio = f"{t[key_b] / r['ganda_s'][key_b]:.2f}x" if t else "-"
        shape = "x".join(str(d) for d in r["shape"])
        print(
            f"| {r['kind']} {r['name']} | {r['batch']}x{shape} -> {r['features']} "
            f"| {r['kernel'][0]}x{r['kernel'][1]} / {r['strides'][0]} | {r['padding']} "
            f"| {r['gflop_per_pass']:.2f} | {ms(r['lax_s'], key_f)} | {ms(r['ganda_s'], key_f)} "
            f"| {ms(t, key_f)} | {ms(r['lax_s'], key_b)} | {ms(r['ganda_s'], key_b)} "
            f"| {ms(t, key_b)} | {ratio} |"
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"jax": jax.__version__, "options": options, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
