"""Where XLA spends a convolution's training time: forward, input gradient, weight gradient.

  python benchmarks/conv_backward.py                        # 64x32x32x64, 3x3 -> 64 (PixelDA's G)
  python benchmarks/conv_backward.py --batch 1 --size 256 --channels 64 --json out.json

Times one 3x3 SAME convolution (NHWC) under ``jax.jit``: the forward pass, the
gradient with respect to the input, and the gradient with respect to the weights
(each including the forward pass it needs), the weight gradient written as nine
shifted-slice GEMMs (im2col by hand, checked against XLA's), and reports GFLOP/s counting
2 * N * H * W * Cin * Cout * 9 FLOPs per pass. With torch installed, the same
forward and forward + backward in PyTorch (``--threads`` threads) for a ratio in
the same run. Compiled with the training steps' options (``cpu_conv.compiler_options()``;
``--ynn-convs`` for XLA's defaults). Prints a table; ``--json PATH`` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from conv_layers import median_seconds  # noqa: E402

from ganda_jax.nets import cpu_conv  # noqa: E402

cpu_conv.CPU_GRADIENTS = True  # the rows below compare it with XLA's

DN = ("NHWC", "HWIO", "NHWC")


def _jit(fn):
    """``jax.jit`` with the training steps' compiler options (``cpu_conv.compiler_options()``:
    XLA's own convolutions on CPU; ``--ynn-convs`` for XLA's default YNNPACK ones)."""
    return jax.jit(fn, compiler_options=cpu_conv.compiler_options())


def jax_rows(n, size, c, repeats):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((n, size, size, c)), jnp.float32)
    w = jnp.asarray(0.05 * rng.standard_normal((3, 3, c, c)), jnp.float32)

    def loss(w, x):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN)
        return jnp.sum(y * y)

    fwd = _jit(loss)
    gx = _jit(jax.grad(loss, argnums=1))
    gw = _jit(jax.grad(loss, argnums=0))
    both = _jit(jax.grad(loss, argnums=(0, 1)))

    def im2col_weight_grad(w, x):
        """The weight gradient as nine shifted slices of x, one GEMM each (a candidate for a
        CPU custom VJP); checked against XLA's below."""
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN)
        dy = (2 * y).reshape(-1, c)
        xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        taps = [
            jnp.einsum("mi,mo->io", xp[:, i : i + size, j : j + size].reshape(-1, c), dy)
            for i in range(3)
            for j in range(3)
        ]
        return jnp.stack(taps).reshape(3, 3, c, c)

    def loss_ganda(w, x):
        y = cpu_conv.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN)
        return jnp.sum(y * y)

    ganda_gx = _jit(jax.grad(loss_ganda, argnums=1))
    ganda_gw = _jit(jax.grad(loss_ganda, argnums=0))
    ganda_both = _jit(jax.grad(loss_ganda, argnums=(0, 1)))
    for name, mine, xla in (("input", ganda_gx, gx), ("weight", ganda_gw, gw)):
        ref, got = xla(w, x), mine(w, x)
        err = float(jnp.max(jnp.abs(ref - got)) / jnp.max(jnp.abs(ref)))
        if err > 1e-4:
            raise AssertionError(
                f"ganda_jax.nets.cpu_conv {name} gradient differs from XLA's: {err:.2g}"
            )

    im2col = _jit(im2col_weight_grad)
    ref, got = gw(w, x), im2col(w, x)
    err = float(jnp.max(jnp.abs(ref - got)) / jnp.max(jnp.abs(ref)))
    if err > 1e-4:
        raise AssertionError(f"im2col weight gradient differs from XLA's: {err:.2g}")
    rows = []
    for name, fn, passes in (
        ("forward", fwd, 1),
        ("forward + input grad", gx, 2),
        ("forward + weight grad", gw, 2),
        ("forward + weight grad (im2col GEMMs)", im2col, 2),
        ("forward + both grads", both, 3),
        ("forward + input grad (ganda_jax.nets.cpu_conv)", ganda_gx, 2),
        ("forward + weight grad (ganda_jax.nets.cpu_conv)", ganda_gw, 2),
        ("forward + both grads (ganda_jax.nets.cpu_conv)", ganda_both, 3),
    ):
        t = median_seconds(lambda fn=fn: jax.block_until_ready(fn(w, x)), repeats)
        rows.append(dict(framework="jax", what=name, passes=passes, seconds=t))
    return rows


def torch_rows(n, size, c, repeats, threads):
    try:
        import torch
    except ImportError:
        return []
    torch.set_num_threads(threads)
    x = torch.randn(n, c, size, size, requires_grad=True)
    w = torch.randn(c, c, 3, 3, requires_grad=True)

    def fwd():
        with torch.no_grad():
            torch.nn.functional.conv2d(x, w, padding=1).square().sum()

    def both():
        torch.nn.functional.conv2d(x, w, padding=1).square().sum().backward()

    return [
        dict(framework="torch", what="forward", passes=1, seconds=median_seconds(fwd, repeats)),
        dict(
            framework="torch",
            what="forward + both grads",
            passes=3,
            seconds=median_seconds(both, repeats),
        ),
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--ynn-convs", action="store_true", help="XLA:CPU's default YNNPACK kernels")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    cpu_conv.CPU_YNN_CONVS = a.ynn_convs
    flop = 2 * a.batch * a.size * a.size * a.channels * a.channels * 9
    rows = jax_rows(a.batch, a.size, a.channels, a.repeats)
    rows += torch_rows(a.batch, a.size, a.channels, a.repeats, a.threads)
    print(
        f"conv 3x3, NHWC {a.batch}x{a.size}x{a.size}x{a.channels} -> {a.channels}, "
        f"{flop / 1e9:.2f} GFLOP per pass, backend {jax.default_backend()}, compiler options "
        f"{cpu_conv.compiler_options() or 'XLA defaults'}"
    )
    print("| framework | what | ms | GFLOP/s |")
    print("|---|---|---|---|")
    for r in rows:
        r["gflop_per_s"] = r["passes"] * flop / r["seconds"] / 1e9
        ms, rate = r["seconds"] * 1e3, r["gflop_per_s"]
        print(f"| {r['framework']} | {r['what']} | {ms:.1f} | {rate:.1f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                {
                    "jax": jax.__version__,
                    "backend": jax.default_backend(),
                    "compiler_options": cpu_conv.compiler_options(),
                    "rows": rows,
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
