"""Embedded, deterministic synthetic datasets (numpy only, no downloads).

Every generator here is a pure function of its keyword arguments: the same
``(domain, split, num, seed, size)`` always yields bitwise-identical arrays,
and every ``(task, domain, split)`` combination draws from its own random
stream (``np.random.default_rng([seed, task, domain, split])``), so test
splits are held out from train splits.  All rendering is vectorised numpy
(distance fields over a pixel grid, evaluated in chunks), so 10k images take
a few seconds on a laptop CPU.

Three tasks are provided:

``digits``  -- a domain-adaptation pair in the spirit of MNIST -> MNIST-M.
    *source*: clean digits drawn from hand-defined stroke skeletons (polylines
    and elliptic arcs), rasterised with a smooth constant stroke width via a
    distance-to-segment field; small random scale / shift / rotation; bright
    grey strokes on black, replicated to 3 channels.
    *target*: "handwritten" digits -- the same skeletons bent by a smooth random
    displacement field, with random slant (shear), rotation, aspect and a wide
    range of stroke widths -- composited MNIST-M style onto a dim procedural
    colour texture (a random mix of a two-colour gradient, smoothed colour
    noise and a sinusoidal plaid) as ``|texture - ink * colour|`` with a random
    per-image ink colour, plus mild pixel noise.  Style parameters live in
    ``_DIGIT_STYLES``.

``translation_pair`` -- unpaired image translation with hidden ground truth.
    A scene is a horizon (random height and tilt), 0-2 bushes and 1-3
    quadrupeds (ellipse body + neck + head + 4 legs + tail), nearer animals
    drawn larger and on top.  Style A ("horse"): blue sky and green grass with
    vertical gradients, dark-green bushes, brown animals with faint darker
    fur bands.  Style B ("zebra / savanna"): dusky-pink sky, dry olive-tan
    ground, dry brown bushes, animals with high-contrast black/white stripes
    exactly where A has its faint bands, and a black 1-px outline around every
    animal.  The A -> B map is local (a per-pixel palette map plus a 3x3
    neighbourhood for outlines and for telling a band from a lighter animal)
    and deterministic given A.

``segmentation_pair`` -- semantic segmentation under a synthetic -> real shift.
    ``NUM_SEG_CLASSES = 5``: sky/background (0), a ground band below a tilted
    horizon (1), discs (2), boxes (3) and rotated bars (4), with random sizes,
    positions and occlusion.
    *source*: flat per-class colours with small per-image jitter.
    *target*: shifted class palette, per-class procedural textures, a random
    lighting gradient, a colour cast, a 3x3 blur and Gaussian pixel noise.

Measured calibration
--------------------
``digits`` -- the script trains a small CNN (conv3x3(16)-pool-conv3x3(32)-
pool-dense(128)-dense(10), Adam 1e-3, batch 64) on 20k source-train or 20k
target-train images and evaluates on 5k test images of each domain::

    /tmp/venv/bin/python benchmarks/calibrate_digits.py --steps 1500 --seed 0 --json out.json

    trained on    source test  target test
    source             1.0000       0.4304
    target             1.0000       0.9848

(1.5-3 min in total on 2 busy, shared CPU cores.)  ``--seed 1``: source->target 0.4336,
target->target 0.9760; ``--steps 500 --seed 0``: 0.4334 / 0.9534.  So a
source-only model scores ~43 % on target test (chance is 10 %) while the
target task itself is learnable to >95 %: the gap is what adaptation must close.
The target style knob that matters most is the background brightness
``bg_hi``: with full-range (0..255) textures source->target collapses to
~10 %, with dark textures (60..160, the default) it sits at ~43 %.

``translation_pair`` -- identity baseline ``PSNR(A_test, B_test)`` over 1000
test scenes at size 64 (MSE pooled over all pixels): 11.96 dB (seed 0),
11.94 dB (seed 1).  Sanity check: a 4-layer 3x3 convnet (32 channels, 9 px
receptive field) trained with an L1 loss on 2000 *paired* scenes (Adam 2e-3,
batch 16) reaches 24.7 / 31.4 / 35.3 dB test PSNR after 100 / 200 / 300 steps,
so the A -> B map is local and learnable.

Generation speed (2 shared CPU cores): 10k images take ~1-2 s (source) / ~2 s
(target) for ``digits``, ~2-4 s for ``translation_pair`` and ~1.5 s (source) /
~5-6 s (target) for ``segmentation_pair``.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "NUM_SEG_CLASSES",
    "SEG_CLASS_NAMES",
    "digits",
    "segmentation_pair",
    "translation_pair",
]

# ---------------------------------------------------------------------------
# Random streams
# ---------------------------------------------------------------------------

_TASK_IDS = {"digits": 0, "translation": 1, "segmentation": 2}
_DOMAIN_IDS = {"source": 0, "target": 1}
_SPLIT_IDS = {"train": 0, "test": 1}

# Images are rendered in chunks of this many to bound peak memory.
_CHUNK = 512


def _check_common(num: int, seed: int) -> None:
    if not isinstance(num, (int, np.integer)) or num < 0:
        raise ValueError(f"num must be a non-negative int, got {num!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")


def _lookup(table: dict[str, int], key: str, what: str) -> int:
    if key not in table:
        raise ValueError(f"{what} must be one of {sorted(table)}, got {key!r}")
    return table[key]


def _rng(task: str, domain_id: int, split_id: int, seed: int, *extra: int) -> np.random.Generator:
    """Independent stream per (seed, task, domain, split[, extra])."""
    return np.random.default_rng([int(seed), _TASK_IDS[task], domain_id, split_id, *extra])


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _axes(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates: xs [1, 1, size], ys [1, size, 1] (float32)."""
    c = np.arange(size, dtype=np.float32) + 0.5
    return c[None, None, :], c[None, :, None]


def _col(v) -> np.ndarray:
    """[N] -> [N, 1, 1] for broadcasting (floats become float32)."""
    v = np.asarray(v)
    if v.dtype.kind == "f":
        v = v.astype(np.float32)
    return v[:, None, None]


# ---------------------------------------------------------------------------
# Stroke rasterisation
# ---------------------------------------------------------------------------


def _arc(cx, cy, rx, ry, deg0, deg1, n=None):
    """Points on an elliptic arc (y axis points down, angles in degrees)."""
    if n is None:
        n = max(2, round(abs(deg1 - deg0) / 30.0))
    t = np.deg2rad(np.linspace(deg0, deg1, n + 1))
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _pts(*xy):
    return np.asarray(xy, dtype=np.float64).reshape(-1, 2)


# Digit skeletons in a unit box: x in [0, 1] left->right, y in [0, 1] top->bottom.
# Each digit is a list of polylines (arcs are sampled into polylines).
_DIGIT_STROKES: list[list[np.ndarray]] = [
    # 0: an upright ellipse.
    [_arc(0.5, 0.5, 0.36, 0.47, 0, 360, 12)],
    # 1: a stem with a small flag.
    [_pts(0.30, 0.22, 0.55, 0.02, 0.55, 0.98)],
    # 2: hook over the top, diagonal, base line.
    [np.concatenate([_arc(0.5, 0.28, 0.34, 0.26, 195, 370, 6), _pts(0.10, 0.98, 0.92, 0.98)])],
    # 3: two right-facing bowls.
    [_arc(0.48, 0.26, 0.34, 0.24, -160, 90, 8), _arc(0.48, 0.73, 0.38, 0.25, -90, 160, 8)],
    # 4: stem, diagonal and crossbar.
    [_pts(0.68, 0.98, 0.68, 0.02, 0.06, 0.68, 0.94, 0.68)],
    # 5: top bar, left stem, bottom bowl.
    [np.concatenate([_pts(0.86, 0.02, 0.24, 0.02), _arc(0.50, 0.66, 0.38, 0.31, -145, 150, 9)])],
    # 6: descending curve into a closed lower loop.
    [
        np.concatenate([_pts(0.80, 0.05), _arc(0.80, 0.70, 0.66, 0.65, -95, -180, 3)]),
        _arc(0.50, 0.70, 0.36, 0.28, 0, 360, 10),
    ],
    # 7: top bar and long diagonal.
    [_pts(0.06, 0.02, 0.94, 0.02, 0.38, 0.98)],
    # 8: two stacked loops.
    [_arc(0.5, 0.25, 0.30, 0.23, 0, 360, 10), _arc(0.5, 0.73, 0.38, 0.25, 0, 360, 10)],
    # 9: upper loop with a descending tail.
    [_arc(0.48, 0.30, 0.36, 0.28, 0, 360, 10), _pts(0.84, 0.30, 0.70, 0.98)],
]


def _segments_from_polylines(polylines: list[np.ndarray]) -> np.ndarray:
    segs = [np.stack([p[:-1], p[1:]], axis=1) for p in polylines]
    return np.concatenate(segs, axis=0)  # [S, 2(endpoints), 2(xy)]


def _build_digit_segments() -> tuple[np.ndarray, np.ndarray]:
    """Pads all digit skeletons to a common segment count.

    Returns (segments [10, S, 2, 2], valid [10, S] bool).
    """
    per_digit = [_segments_from_polylines(p) for p in _DIGIT_STROKES]
    smax = max(len(s) for s in per_digit)
    out = np.zeros((10, smax, 2, 2))
    valid = np.zeros((10, smax), dtype=bool)
    for d, s in enumerate(per_digit):
        out[d, : len(s)] = s
        valid[d, : len(s)] = True
        out[d, len(s) :] = s[-1]  # degenerate copies of a real segment: harmless for min-distance
    return out, valid


_DIGIT_SEGMENTS, _DIGIT_VALID = _build_digit_segments()
_DIGIT_NSEG = _DIGIT_VALID.sum(axis=1)


def _segment_distance_sq(xs, ys, segs: np.ndarray, nseg: np.ndarray) -> np.ndarray:
    """Squared distance from pixel centres to the nearest of each image's segments.

    xs: [1, 1, W], ys: [1, H, 1] pixel coordinates.  segs: [N, S, 2, 2]
    endpoints, with only the first ``nseg[n]`` segments of image n valid; the
    images must be sorted by ``nseg`` in descending order, so that the images
    still having a k-th segment form a prefix.  Returns [N, H, W].
    """
    n = segs.shape[0]
    best = np.full((n, ys.shape[1], xs.shape[2]), np.inf, np.float32)
    for k in range(int(nseg.max(initial=0))):
        m = int(np.count_nonzero(nseg > k))  # prefix of images with a k-th segment
        a, b = segs[:m, k, 0], segs[:m, k, 1]
        dx, dy = _col(b[:, 0] - a[:, 0]), _col(b[:, 1] - a[:, 1])
        inv = 1.0 / (dx * dx + dy * dy + 1e-6)
        qx, qy = xs - _col(a[:, 0]), ys - _col(a[:, 1])  # [m,1,W], [m,H,1]
        t = np.clip(qx * (dx * inv) + qy * (dy * inv), 0.0, 1.0)  # projection onto the segment
        ex = qx - t * dx
        ey = qy - t * dy
        np.minimum(best[:m], ex * ex + ey * ey, out=best[:m])
    return best


def _rasterise_strokes(
    segs: np.ndarray, nseg: np.ndarray, half_width: np.ndarray, size: int
) -> np.ndarray:
    """Anti-aliased stroke coverage in [0, 1], shape [N, size, size].

    segs: [N, S, 2, 2] endpoints in pixel coordinates, of which the first
    ``nseg[n]`` are used; half_width: [N] pixels.  The coverage falls off
    linearly over 1 px around ``distance == half_width``.
    """
    n = segs.shape[0]
    xs, ys = _axes(size)
    order = np.argsort(-nseg, kind="stable")  # longest skeletons first (see _segment_distance_sq)
    segs = segs[order].astype(np.float32)
    nseg, hw = nseg[order], half_width[order].astype(np.float32)
    out = np.empty((n, size, size), dtype=np.float32)
    for s in range(0, n, _CHUNK):
        e = min(n, s + _CHUNK)
        d = np.sqrt(_segment_distance_sq(xs, ys, segs[s:e], nseg[s:e]))
        out[order[s:e]] = np.clip(_col(hw[s:e]) + 0.5 - d, 0.0, 1.0)
    return out


# ---------------------------------------------------------------------------
# Procedural colour textures
# ---------------------------------------------------------------------------


def _upsample_matrix(out_size: int, in_size: int) -> np.ndarray:
    """Bilinear interpolation matrix [out_size, in_size] (align-corners style)."""
    pos = np.linspace(0.0, in_size - 1.0, out_size)
    lo = np.clip(np.floor(pos).astype(int), 0, in_size - 2)
    frac = pos - lo
    m = np.zeros((out_size, in_size))
    m[np.arange(out_size), lo] = 1.0 - frac
    m[np.arange(out_size), lo + 1] = frac
    return m.astype(np.float32)


def _upsample(grid: np.ndarray, size: int) -> np.ndarray:
    """Bilinearly upsamples lattices [n, k, k, c] -> [n, size, size, c] with one GEMM."""
    n, k, _, c = grid.shape
    up = _upsample_matrix(size, k)
    kron = np.kron(up, up)  # [size*size, k*k]
    g = grid.astype(np.float32).transpose(0, 3, 1, 2).reshape(n * c, k * k)
    return (g @ kron.T).reshape(n, c, size, size).transpose(0, 2, 3, 1)


def _smooth_noise(
    rng: np.random.Generator, n: int, size: int, cells: int, channels: int = 3
) -> np.ndarray:
    """Smoothed noise in [0, 1]: a random [cells x cells] lattice, bilinearly upsampled."""
    return _upsample(rng.random((n, cells, cells, channels), dtype=np.float32), size)


def _colour_texture_params(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Draws the per-image parameters of ``_colour_textures`` (leading axis n)."""
    f32 = lambda x: np.asarray(x, np.float32)
    return {
        # (a) two-colour gradient along a random direction.
        "theta": f32(rng.uniform(0, 2 * np.pi, n)),
        "c0": f32(rng.uniform(0, 255, (n, 3))),
        "c1": f32(rng.uniform(0, 255, (n, 3))),
        # (b) smoothed colour noise: a coarse and a fine lattice, randomly blended.
        "coarse": rng.random((n, 4, 4, 3), dtype=np.float32),
        "fine": rng.random((n, 9, 9, 3), dtype=np.float32),
        "pick": rng.random(n, dtype=np.float32),
        # (c) sinusoidal plaid with per-channel phases.
        "fx": f32(rng.uniform(1.0, 5.0, n)),
        "fy": f32(rng.uniform(1.0, 5.0, n)),
        "px": f32(rng.uniform(0, 2 * np.pi, (n, 3))),
        "py": f32(rng.uniform(0, 2 * np.pi, (n, 3))),
        # Convex mixing weights of (a), (b), (c).
        "w": f32(rng.dirichlet([0.6, 0.6, 0.6], n)),
    }


def _colour_textures(p: dict[str, np.ndarray], size: int) -> np.ndarray:
    """Procedural colour backgrounds in [0, 255], float32 [n, size, size, 3].

    A per-image convex mix of three families: a two-colour linear gradient,
    smoothed colour noise (bilinearly upsampled random lattices) and a
    sinusoidal colour plaid.  Each family is separable in x and y, so it
    costs about one full-size array operation.
    """
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    xs, ys = c[None, None, :, None], c[None, :, None, None]  # [1,1,W,1], [1,H,1,1]

    def col(v):  # [n] or [n, 3] -> [n, 1, 1, 1 or 3]
        return v[:, None, None, None] if v.ndim == 1 else v[:, None, None, :]

    w0, w1, w2 = (col(p["w"][:, k]) for k in range(3))

    proj = (xs - 0.5) * col(np.cos(p["theta"])) + (ys - 0.5) * col(np.sin(p["theta"])) + 0.5
    out = w0 * col(p["c0"]) + (w0 * col(p["c1"] - p["c0"])) * np.clip(proj, 0.0, 1.0)

    pick = col(p["pick"])
    for grid, wt in ((p["coarse"], pick), (p["fine"], 1.0 - pick)):
        out += _upsample(grid * (255.0 * wt * w1), size)

    sx = np.sin(2 * np.pi * col(p["fx"]) * xs + col(p["px"]))  # [n,1,W,3]
    sy = np.sin(2 * np.pi * col(p["fy"]) * ys + col(p["py"]))  # [n,H,1,3]
    out += w2 * 127.5 + (w2 * 63.75) * (sx + sy)
    return out


# ---------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------

_DIGIT_SIZE = 32

# Style parameters of the two digit domains; (lo, hi) pairs are uniform ranges
# sampled per image.  Geometry: ``wobble`` is the amplitude (in digit-box
# units) of the smooth displacement field, ``height`` the digit height in px,
# ``aspect`` width / height, ``shear`` the slant (x shift per unit of -y),
# ``rotate`` degrees, ``shift`` px, ``half_width`` the half stroke width in px.
# Appearance: source ``level`` is the grey level of the ink.  Target: the
# colour texture is squeezed into [lo, hi] with lo ~ ``bg_lo`` and hi ~
# ``bg_hi`` (0..255; dim backgrounds keep source->target accuracy ~43 %, full
# 0..255 textures drop it to ~10 %), ``ink`` is the per-channel ink colour
# range and ``noise`` the std of additive Gaussian pixel noise.
_DIGIT_STYLES = {
    "source": {
        "wobble": (0.0, 0.0),
        "height": (19.0, 23.0),
        "aspect": (0.58, 0.68),
        "shear": (0.0, 0.0),
        "rotate": (-6.0, 6.0),
        "shift": (-1.5, 1.5),
        "half_width": (1.3, 1.7),
        "level": (200.0, 255.0),
    },
    "target": {
        "wobble": (0.02, 0.06),
        "height": (17.0, 25.0),
        "aspect": (0.45, 0.85),
        "shear": (-0.35, 0.35),
        "rotate": (-15.0, 15.0),
        "shift": (-3.5, 3.5),
        "half_width": (0.8, 2.4),
        "bg_lo": (0.0, 0.0),
        "bg_hi": (60.0, 160.0),
        "ink": (140.0, 255.0),
        "noise": 6.0,
    },
}


def _digit_geometry(
    rng: np.random.Generator, labels: np.ndarray, style: dict
) -> tuple[np.ndarray, np.ndarray]:
    """Random per-image placement of the digit skeletons.

    Returns (segments [N, S, 2, 2] in pixel coordinates, half stroke width [N]).
    """
    n = len(labels)
    segs = _DIGIT_SEGMENTS[labels].copy()  # [N,S,2,2] unit-box coordinates
    u, v = segs[..., 0], segs[..., 1]
    U = lambda key, shape=n: rng.uniform(*style[key], shape)

    # Hand-like wobble: a smooth random displacement field over the unit box
    # (shared endpoints move together, so strokes stay connected).
    amp = U("wobble", (n, 2, 1, 1))
    freq = rng.uniform(0.6, 1.6, (n, 2, 1, 1))
    phase = rng.uniform(0, 2 * np.pi, (n, 2, 1, 1))
    du = amp[:, 0] * np.sin(2 * np.pi * freq[:, 0] * v + phase[:, 0])
    dv = amp[:, 1] * np.sin(2 * np.pi * freq[:, 1] * u + phase[:, 1])
    u, v = u + du, v + dv
    height, aspect, shear = U("height"), U("aspect"), U("shear")
    angle = np.deg2rad(U("rotate"))
    shift = U("shift", (n, 2))
    half_width = U("half_width")

    # Centre, scale to pixels, shear (slant: x moves with -y), rotate, translate.
    x = (u - 0.5) * (height * aspect)[:, None, None]
    y = (v - 0.5) * height[:, None, None]
    x = x - shear[:, None, None] * y
    ca, sa = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    xr = ca * x - sa * y + _DIGIT_SIZE / 2 + shift[:, 0, None, None]
    yr = sa * x + ca * y + _DIGIT_SIZE / 2 + shift[:, 1, None, None]
    return np.stack([xr, yr], axis=-1), half_width


def digits(*, domain: str, split: str, num: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Synthetic digit classification data for domain adaptation.

    Args:
      domain: ``'source'`` (clean grey strokes on black) or ``'target'``
        (jittered, slanted strokes of varying width over colour textures,
        composited MNIST-M style).
      split: ``'train'`` or ``'test'`` (disjoint random streams).
      num: number of images.
      seed: non-negative integer seed.

    Returns:
      ``{'image': uint8 [num, 32, 32, 3], 'label': int32 [num]}``; labels are
      exactly balanced (counts differ by at most one) and shuffled.
    """
    _check_common(num, seed)
    dom = _lookup(_DOMAIN_IDS, domain, "domain")
    spl = _lookup(_SPLIT_IDS, split, "split")
    rng = _rng("digits", dom, spl, seed)
    labels = rng.permutation(np.arange(num) % 10).astype(np.int32)
    style = _DIGIT_STYLES[domain]
    segs, half_width = _digit_geometry(rng, labels, style)
    ink = _rasterise_strokes(segs, _DIGIT_NSEG[labels], half_width, _DIGIT_SIZE)
    ink = ink[..., None]  # [N, H, W, 1]

    if domain == "source":
        level = rng.uniform(*style["level"], (num, 1, 1, 1)).astype(np.float32)
        img = np.broadcast_to(ink * level, (num, _DIGIT_SIZE, _DIGIT_SIZE, 3))
        return {"image": _to_uint8(img), "label": labels}

    # MNIST-M style composite, |texture - ink * colour|: the texture is
    # inverted under the strokes.  Per-image parameters are drawn up front;
    # pixels are produced in chunks to bound memory.
    tex_params = _colour_texture_params(rng, num)
    lo = rng.uniform(*style["bg_lo"], num).astype(np.float32)
    hi = np.maximum(rng.uniform(*style["bg_hi"], num), lo).astype(np.float32)
    colour = rng.uniform(*style["ink"], (num, 1, 1, 3)).astype(np.float32)
    images = np.empty((num, _DIGIT_SIZE, _DIGIT_SIZE, 3), np.uint8)
    for s in range(0, num, _CHUNK):
        i = slice(s, min(num, s + _CHUNK))
        tex = _colour_textures({k: v[i] for k, v in tex_params.items()}, _DIGIT_SIZE)
        tex = _col(lo[i])[..., None] + _col((hi[i] - lo[i]) / 255.0)[..., None] * tex
        img = np.abs(tex - ink[i] * colour[i])
        img += style["noise"] * rng.standard_normal(img.shape, dtype=np.float32)
        images[i] = _to_uint8(img)
    return {"image": images, "label": labels}


# ---------------------------------------------------------------------------
# Shared scene helpers (translation_pair and segmentation_pair)
#
# Shapes are evaluated on a *separable* pixel grid: x-terms have shape
# [N, 1, W] and y-terms [N, H, 1], so most shape tests cost a single
# full-size broadcast operation.
# ---------------------------------------------------------------------------


def _ellipse(xs, ys, cx, cy, rx, ry) -> np.ndarray:
    """Axis-aligned filled ellipse, [N, H, W] bool."""
    return ((xs - _col(cx)) / _col(rx)) ** 2 + ((ys - _col(cy)) / _col(ry)) ** 2 <= 1.0


def _box(xs, ys, x0, x1, y0, y1) -> np.ndarray:
    """Axis-aligned filled rectangle [x0, x1] x [y0, y1], [N, H, W] bool."""
    return ((xs >= _col(x0)) & (xs <= _col(x1))) & ((ys >= _col(y0)) & (ys <= _col(y1)))


def _rotated_box(xs, ys, cx, cy, hw, hh, angle) -> np.ndarray:
    """Filled rectangle of half-sizes (hw, hh) rotated by ``angle``, [N, H, W] bool."""
    ca, sa = _col(np.cos(angle)), _col(np.sin(angle))
    dx, dy = xs - _col(cx), ys - _col(cy)
    u = ca * dx + sa * dy
    v = ca * dy - sa * dx
    return (np.abs(u) <= _col(hw)) & (np.abs(v) <= _col(hh))


def _ground_mask(xs, ys, h0, slope, size) -> np.ndarray:
    """Below a tilted horizon passing through (size / 2, h0), [N, H, W] bool."""
    return (ys - _col(h0)) >= _col(slope) * (xs - size / 2)


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it (image border excluded)."""
    p = np.pad(mask, ((0, 0), (1, 1), (1, 1)), mode="edge")
    inner = p[:, :-2, 1:-1] & p[:, 2:, 1:-1] & p[:, 1:-1, :-2] & p[:, 1:-1, 2:]
    return mask & ~inner


def _paint(regions: np.ndarray, base: np.ndarray, slope: np.ndarray, size: int) -> np.ndarray:
    """Colours a region map with per-image, per-region vertical gradients.

    The colour of region ``r`` in image ``n`` at row ``y`` is
    ``base[n, r] + slope[n, r] * (y + 0.5) / size``.

    regions: int [N, H, W]; base, slope: [N, R, 3].  Returns uint8 [N, H, W, 3].
    Implemented as one 1-D lookup into a packed-RGBA (uint32) table indexed by
    (image, region, row), which is much faster than float fancy indexing.
    """
    n, r = base.shape[:2]
    t = (np.arange(size, dtype=np.float32) + 0.5) / size
    lut = (
        base[:, :, None, :].astype(np.float32)
        + slope[:, :, None, :].astype(np.float32) * t[None, None, :, None]
    )
    rgba = np.zeros((n, r, size, 4), np.uint8)
    rgba[..., :3] = _to_uint8(lut)
    packed = rgba.view(np.uint32).reshape(-1)  # one uint32 per (image, region, row)
    rows = np.arange(size, dtype=np.intp)[None, :, None]
    flat = (
        regions.astype(np.intp) + (r * np.arange(n, dtype=np.intp))[:, None, None]
    ) * size + rows
    return np.take(packed, flat).view(np.uint8).reshape(regions.shape + (4,))[..., :3]


def _sheared_ellipse(xs, ys, cx, cy, rx, ry, shear) -> np.ndarray:
    """Ellipse whose horizontal centre moves by ``shear`` px per px of y, [N, H, W] bool."""
    dy = ys - _col(cy)
    u = (xs - _col(cx) - _col(shear) * dy) / _col(rx)
    return u * u + (dy / _col(ry)) ** 2 <= 1.0


# ---------------------------------------------------------------------------
# translation_pair
# ---------------------------------------------------------------------------

_MAX_ANIMALS = 3
_MAX_BUSHES = 2

# Region ids of the translation scenes (style independent).
_R_SKY, _R_GROUND, _R_BUSH = 0, 1, 2
_R_FUR = 3  # animal j light fur = 3 + 2j, dark band = 4 + 2j
_NUM_TR_REGIONS = _R_FUR + 2 * _MAX_ANIMALS

# Palettes.  Sky and ground are vertical gradients (top colour, bottom colour),
# linear in y, so within each region the B colour is an affine function of the
# A colour and no absolute position is needed to predict B from A.
_A_SKY = ((80, 130, 215), (175, 210, 245))
_B_SKY = ((190, 150, 155), (240, 210, 190))
_A_GRASS = ((105, 175, 80), (45, 110, 40))
_B_GROUND = ((190, 185, 115), (130, 120, 60))
_A_BUSH = (35, 85, 40)
_B_BUSH = (110, 85, 45)
_A_BODY = (150, 95, 55)  # times a per-animal tone in [0.94, 1.06]
_A_BAND = 0.72  # A's faint fur bands: body colour times this
_B_LIGHT = (225, 222, 215)
_B_DARK = (45, 42, 45)
_B_OUTLINE = (10, 10, 10)


def _sample_scenes(rng: np.random.Generator, n: int, size: int) -> dict[str, np.ndarray]:
    """Random scene parameters (in pixels) for ``n`` translation scenes."""
    s = float(size)
    h0 = rng.uniform(0.35, 0.55, n) * s
    slope = rng.uniform(-0.2, 0.2, n)
    n_animals = rng.integers(1, _MAX_ANIMALS + 1, n)
    n_bushes = rng.integers(0, _MAX_BUSHES + 1, n)

    k = _MAX_ANIMALS
    cx = rng.uniform(0.15, 0.85, (n, k)) * s
    horizon_at = h0[:, None] + slope[:, None] * (cx - s / 2)
    depth = rng.uniform(0.0, 1.0, (n, k))  # 0 = at the horizon, 1 = nearest the viewer
    feet = horizon_at + 0.06 * s + depth * (0.97 * s - horizon_at - 0.06 * s)
    rx = 0.19 * s * (0.6 + 0.6 * depth) * rng.uniform(0.85, 1.15, (n, k))
    ry = rx * rng.uniform(0.45, 0.6, (n, k))
    leg = ry * rng.uniform(1.0, 1.4, (n, k))
    animals = {
        "cx": cx,
        "cy": feet - leg - 0.5 * ry,
        "rx": rx,
        "ry": ry,
        "feet": feet,
        "facing": rng.choice([-1.0, 1.0], (n, k)),
        "active": np.arange(k)[None, :] < n_animals[:, None],
        "tone": rng.uniform(0.94, 1.06, (n, k)),
        "stripe_angle": rng.uniform(-0.5, 0.5, (n, k)),  # ~vertical stripes
        "stripe_period": rng.uniform(0.10, 0.16, (n, k)) * s,
        "stripe_phase": rng.uniform(0, 2 * np.pi, (n, k)),
    }
    # Draw far animals first so that nearer ones occlude them.
    order = np.argsort(np.where(animals["active"], depth, -1.0), axis=1)
    animals = {key: np.take_along_axis(v, order, axis=1) for key, v in animals.items()}

    b = _MAX_BUSHES
    bx = rng.uniform(0.05, 0.95, (n, b)) * s
    br = rng.uniform(0.04, 0.09, (n, b)) * s
    by = h0[:, None] + slope[:, None] * (bx - s / 2) + rng.uniform(0.0, 0.5, (n, b)) * br
    bush_active = np.arange(b)[None, :] < n_bushes[:, None]
    return dict(h0=h0, slope=slope, bx=bx, by=by, br=br, bush_active=bush_active, **animals)


def _animal_mask(xs, ys, sc: dict, i, j: int) -> np.ndarray:
    """Silhouette of animal ``j`` in scenes ``i`` (a slice), [n, H, W] bool.

    Ellipse body, slanted-ellipse neck, ellipse head on the facing side,
    four vertical legs and a thin tail.
    """
    g = lambda key: sc[key][i, j]
    cx, cy, rx, ry, feet, f = g("cx"), g("cy"), g("rx"), g("ry"), g("feet"), g("facing")
    m = _ellipse(xs, ys, cx, cy, rx, ry)
    # Neck: a slanted ellipse from the front of the body up to the head.
    hx, hy = cx + f * 1.15 * rx, cy - 1.2 * ry
    nx0, ny0 = cx + f * 0.6 * rx, cy - 0.3 * ry
    m |= _sheared_ellipse(
        xs,
        ys,
        (nx0 + hx) / 2,
        (ny0 + hy) / 2,
        np.maximum(0.32 * ry, 1.0),
        0.5 * (ny0 - hy) + 0.2 * ry,
        (nx0 - hx) / (ny0 - hy),
    )
    m |= _ellipse(
        xs, ys, hx + f * 0.25 * ry, hy, np.maximum(0.6 * ry, 1.5), np.maximum(0.38 * ry, 1.2)
    )
    # Four legs and a short tail (vertical bars).
    lw = np.maximum(0.09 * rx, 0.8)
    for off in (-0.7, -0.4, 0.4, 0.75):
        lx = cx + off * rx
        m |= _box(xs, ys, lx - lw, lx + lw, cy, feet)
    tx, tw = cx - f * 1.0 * rx, np.maximum(0.05 * rx, 0.6)
    m |= _box(xs, ys, tx - tw, tx + tw, cy - 0.1 * ry, cy + 0.8 * ry)
    return m & _col(g("active"))


def _translation_regions(sc: dict, size: int, i) -> tuple[np.ndarray, np.ndarray]:
    """Region map (uint8 [n, H, W], ids ``_R_*``) and animal union mask for scenes ``i``."""
    xs, ys = _axes(size)
    regions = _ground_mask(xs, ys, sc["h0"][i], sc["slope"][i], size).astype(
        np.uint8
    )  # sky 0 / ground 1
    for j in range(_MAX_BUSHES):
        br = sc["br"][i, j]
        m = _ellipse(xs, ys, sc["bx"][i, j], sc["by"][i, j], br, 0.8 * br) & _col(
            sc["bush_active"][i, j]
        )
        regions[m] = _R_BUSH
    union = np.zeros(regions.shape, bool)
    for j in range(_MAX_ANIMALS):
        m = _animal_mask(xs, ys, sc, i, j)
        union |= m
        # Fur bands: a sinusoid along a per-animal direction anchored at the body centre.
        ang = sc["stripe_angle"][i, j]
        w = 2 * np.pi / sc["stripe_period"][i, j]
        phase = (
            _col(w * np.cos(ang)) * (xs - _col(sc["cx"][i, j]))
            + _col(w * np.sin(ang)) * (ys - _col(sc["cy"][i, j]))
            + _col(sc["stripe_phase"][i, j])
        )
        band = np.sin(phase) < 0
        regions = np.where(m, (_R_FUR + 2 * j + band).astype(np.uint8), regions)
    return regions, union


def _translation_palette(sc: dict, i, style: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-image region colours ``(base, slope)``, each [n, regions, 3]."""
    n = len(sc["h0"][i])
    base = np.zeros((n, _NUM_TR_REGIONS, 3), np.float32)
    slope = np.zeros_like(base)
    sky, ground = (_A_SKY, _A_GRASS) if style == "A" else (_B_SKY, _B_GROUND)
    for r, (top, bottom) in ((_R_SKY, sky), (_R_GROUND, ground)):
        base[:, r] = top
        slope[:, r] = np.subtract(bottom, top)
    base[:, _R_BUSH] = _A_BUSH if style == "A" else _B_BUSH
    for j in range(_MAX_ANIMALS):
        if style == "A":
            body = np.asarray(_A_BODY, np.float32) * sc["tone"][i, j][:, None]
            base[:, _R_FUR + 2 * j] = body
            base[:, _R_FUR + 2 * j + 1] = body * _A_BAND
        else:
            base[:, _R_FUR + 2 * j] = _B_LIGHT
            base[:, _R_FUR + 2 * j + 1] = _B_DARK
    return base, slope


def _render_translation(sc: dict, size: int, styles: tuple[str, ...]) -> list[np.ndarray]:
    """Renders scenes ``sc`` in each of ``styles`` ('A' / 'B') -> uint8 [N, size, size, 3] each."""
    n = len(sc["h0"])
    outs = [np.empty((n, size, size, 3), np.uint8) for _ in styles]
    for s in range(0, n, _CHUNK):
        i = slice(s, min(n, s + _CHUNK))
        regions, union = _translation_regions(sc, size, i)
        for out, style in zip(outs, styles):
            out[i] = _paint(regions, *_translation_palette(sc, i, style), size)
            if style == "B":
                out[i][_boundary(union)] = _B_OUTLINE
    return outs


def translation_pair(
    *, split: str, num: int, seed: int = 0, size: int = 64
) -> dict[str, np.ndarray]:
    """Unpaired image-translation data with hidden paired ground truth.

    Scenes (tilted horizon, 0-2 bushes, 1-3 quadrupeds) are rendered in style
    A ("horse": blue sky, green grass, brown animals with faint darker fur
    bands) and style B ("zebra / savanna": dusky-pink sky, dry olive-tan ground, dry
    bushes, black/white striped animals with stripes exactly where A has its
    bands, black 1-px outlines).  The map A -> B is local and deterministic
    given A.

    Args:
      split: ``'train'`` -- A and B are rendered from independent scenes
        (unpaired); ``'test'`` -- ``B[i]`` is scene ``i`` of ``A`` rendered in
        style B (hidden ground truth for PSNR evaluation).
      num: number of images per domain.
      seed: non-negative integer seed.
      size: image side in pixels (scene geometry scales with it), >= 16.

    Returns:
      ``{'A': uint8 [num, size, size, 3], 'B': uint8 [num, size, size, 3]}``.
    """
    _check_common(num, seed)
    spl = _lookup(_SPLIT_IDS, split, "split")
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    scenes_a = _sample_scenes(_rng("translation", 0, spl, seed), num, size)
    if split == "test":  # paired: one scene, two renderings
        a, b = _render_translation(scenes_a, size, ("A", "B"))
    else:  # unpaired: B comes from an independent stream of scenes
        scenes_b = _sample_scenes(_rng("translation", 1, spl, seed), num, size)
        (a,), (b,) = (
            _render_translation(scenes_a, size, ("A",)),
            _render_translation(scenes_b, size, ("B",)),
        )
    return {"A": a, "B": b}


def translation_test_regions(*, num: int, seed: int = 0, size: int = 64) -> dict[str, np.ndarray]:
    """Region masks of ``translation_pair(split='test', ...)``'s scenes, each bool [num, H, W].

    ``sky``, ``ground``, ``bush``, ``fur_light`` and ``fur_band`` (inside an animal, off its
    outline: light / dark stripes in B), ``outline`` (B's 1-px black animal outline); and
    ``animal``, int [num, H, W]: the visible animal's index in its scene, -1 off animals.
    For breaking a translation's error down by region (``benchmarks/translation_errors.py``).
    """
    _check_common(num, seed)
    sc = _sample_scenes(_rng("translation", 0, _SPLIT_IDS["test"], seed), num, size)
    regions, union = _translation_regions(sc, size, slice(0, num))
    outline = _boundary(union)
    fur = (regions >= _R_FUR) & ~outline
    band = (regions - _R_FUR) % 2 == 1
    return {
        "sky": (regions == _R_SKY) & ~outline,
        "ground": (regions == _R_GROUND) & ~outline,
        "bush": (regions == _R_BUSH) & ~outline,
        "fur_light": fur & ~band,
        "fur_band": fur & band,
        "outline": outline,
        "animal": np.where(regions >= _R_FUR, (regions.astype(int) - _R_FUR) // 2, -1),
    }


# ---------------------------------------------------------------------------
# segmentation_pair
# ---------------------------------------------------------------------------

SEG_CLASS_NAMES = ("background", "ground", "disc", "box", "bar")
NUM_SEG_CLASSES = len(SEG_CLASS_NAMES)
_BG, _GROUND, _DISC, _BOX, _BAR = range(NUM_SEG_CLASSES)
_MAX_OBJECTS = 5

# Per-class colours.  Source: flat "synthetic" palette.  Target: a shifted
# "real" palette (then textured, lit, tinted, blurred and noised).
_SEG_SOURCE_COLOURS = np.array(
    [(130, 180, 235), (105, 105, 110), (215, 55, 45), (235, 200, 45), (55, 165, 75)], np.float32
)
_SEG_TARGET_COLOURS = np.array(
    [(200, 195, 175), (95, 110, 70), (150, 80, 150), (190, 120, 60), (60, 110, 140)], np.float32
)
# Amplitude of the multiplicative texture per class in the target domain.
_SEG_TEXTURE = np.array([0.15, 0.45, 0.25, 0.35, 0.3], np.float32)


def _sample_seg_scenes(rng: np.random.Generator, n: int, size: int) -> dict[str, np.ndarray]:
    """Random layouts: tilted horizon plus 2-5 discs / boxes / bars."""
    s = float(size)
    k = _MAX_OBJECTS
    kind = rng.integers(_DISC, _BAR + 1, (n, k))
    is_bar = kind == _BAR
    is_box = kind == _BOX
    # Half sizes: discs use (a, a); boxes roughly square; bars long and thin.
    a = rng.uniform(0.06, 0.16, (n, k)) * s
    b = a * rng.uniform(0.7, 1.4, (n, k))
    hw = np.where(is_bar, rng.uniform(0.02, 0.045, (n, k)) * s, a)
    hh = np.where(is_bar, rng.uniform(0.15, 0.35, (n, k)) * s, np.where(is_box, b, a))
    angle = np.where(is_bar, rng.uniform(0, np.pi, (n, k)), rng.uniform(-0.35, 0.35, (n, k)))
    return {
        "h0": rng.uniform(0.3, 0.6, n) * s,
        "slope": rng.uniform(-0.25, 0.25, n),
        "kind": kind,
        "active": np.arange(k)[None, :] < rng.integers(2, k + 1, n)[:, None],
        "cx": rng.uniform(0.08, 0.92, (n, k)) * s,
        "cy": rng.uniform(0.1, 0.95, (n, k)) * s,
        "hw": hw,
        "hh": hh,
        "angle": angle,
    }


def _seg_masks(sc: dict, size: int, i) -> np.ndarray:
    """Class map (uint8 [n, H, W]) of scenes ``i``; later objects occlude earlier ones."""
    xs, ys = _axes(size)
    ground = _ground_mask(xs, ys, sc["h0"][i], sc["slope"][i], size)
    mask = np.where(ground, _GROUND, _BG).astype(np.uint8)
    for j in range(_MAX_OBJECTS):
        g = lambda key, j=j: sc[key][i, j]
        kind = g("kind")
        disc = _ellipse(xs, ys, g("cx"), g("cy"), g("hw"), g("hh"))
        rect = _rotated_box(xs, ys, g("cx"), g("cy"), g("hw"), g("hh"), g("angle"))
        m = np.where(_col(kind == _DISC), disc, rect) & _col(g("active"))
        mask = np.where(m, _col(kind.astype(np.uint8)), mask)
    return mask


def _blur3(img: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur over axes 1 and 2 (edge padding), float32."""
    for axis in (1, 2):
        x = img
        img = 0.5 * x
        lo = [slice(None)] * x.ndim
        hi = [slice(None)] * x.ndim
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        img[tuple(hi)] += 0.25 * x[tuple(lo)]  # left/top neighbour
        img[tuple(lo)] += 0.25 * x[tuple(hi)]  # right/bottom neighbour
        for edge in (0, -1):  # edge padding: the missing neighbour is the pixel itself
            e = [slice(None)] * x.ndim
            e[axis] = edge
            img[tuple(e)] += 0.25 * x[tuple(e)]
    return img


def _render_seg(rng: np.random.Generator, mask: np.ndarray, size: int, target: bool) -> np.ndarray:
    """Renders a chunk of class maps in the source or target style -> uint8 [n, H, W, 3]."""
    n = len(mask)
    palette = _SEG_TARGET_COLOURS if target else _SEG_SOURCE_COLOURS
    jitter = rng.uniform(-15, 15, (n, NUM_SEG_CLASSES, 3)).astype(np.float32)
    base = np.clip(palette[None] + jitter, 0, 255)
    img = _paint(mask, base, np.zeros_like(base), size)
    if not target:
        return img

    # Per-class multiplicative texture: a mix of fine and coarse smoothed noise
    # plus a sinusoidal grain, scaled by each class' texture amplitude.
    fine = _smooth_noise(rng, n, size, 16, 1)[..., 0]
    coarse = _smooth_noise(rng, n, size, 5, 1)[..., 0]
    xs, ys = _axes(size)
    freq = _col(rng.uniform(0.3, 0.9, n))
    grain = np.sin(freq * (xs + 0.5 * ys) + _col(rng.uniform(0, 2 * np.pi, n)))
    tex = 0.5 * (fine - 0.5) + 0.7 * (coarse - 0.5) + 0.15 * grain
    shade = 1.0 + 2.0 * _SEG_TEXTURE[mask] * tex
    # Lighting: a linear brightness ramp in a random direction.
    theta = _col(rng.uniform(0, 2 * np.pi, n))
    ramp = ((xs / size - 0.5) * np.cos(theta) + (ys / size - 0.5) * np.sin(theta)) * _col(
        rng.uniform(0.4, 0.9, n)
    )
    shade *= _col(rng.uniform(0.8, 1.1, n)) + ramp
    # Colour cast (per-channel gain), blur, sensor noise.
    cast = rng.uniform(0.8, 1.2, (n, 1, 1, 3)).astype(np.float32)
    img = _blur3(img * shade[..., None] * cast)
    img += 8.0 * rng.standard_normal(img.shape, dtype=np.float32)
    return _to_uint8(img)


def segmentation_pair(
    *, domain: str, split: str, num: int, seed: int = 0, size: int = 64
) -> dict[str, np.ndarray]:
    """Synthetic -> "real" semantic segmentation data.

    Scenes: background/sky (class 0) above a tilted horizon, ground (1) below
    it, and 2-5 objects -- discs (2), slightly rotated boxes (3) and long
    thin bars at any angle (4) -- at random positions and sizes, later ones
    occluding earlier ones.

    Args:
      domain: ``'source'`` -- flat per-class colours with small per-image
        jitter; ``'target'`` -- shifted class palette, per-class
        multiplicative textures, a random lighting ramp, a colour cast, a
        3x3 blur and Gaussian noise.
      split: ``'train'`` or ``'test'`` (disjoint random streams).
      num: number of images.
      seed: non-negative integer seed.
      size: image side in pixels, >= 16.

    Returns:
      ``{'image': uint8 [num, size, size, 3], 'mask': uint8 [num, size, size]}``
      with mask values in ``0 .. NUM_SEG_CLASSES - 1`` (names in
      ``SEG_CLASS_NAMES``).
    """
    _check_common(num, seed)
    dom = _lookup(_DOMAIN_IDS, domain, "domain")
    spl = _lookup(_SPLIT_IDS, split, "split")
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    rng = _rng("segmentation", dom, spl, seed)
    scenes = _sample_seg_scenes(rng, num, size)
    images = np.empty((num, size, size, 3), np.uint8)
    masks = np.empty((num, size, size), np.uint8)
    for s in range(0, num, _CHUNK):
        i = slice(s, min(num, s + _CHUNK))
        masks[i] = _seg_masks(scenes, size, i)
        images[i] = _render_seg(rng, masks[i], size, target=dom == 1)
    return {"image": images, "mask": masks}
