"""Tests for ganda_jax.data.synthetic (numpy only, no JAX needed)."""

from __future__ import annotations

import numpy as np
import pytest

from ganda_jax.data import synthetic as S


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


def _row_set(x: np.ndarray) -> set[bytes]:
    return {img.tobytes() for img in x}


# ---------------------------------------------------------------------------
# Module-level caches: generate each configuration once per test session.
# ---------------------------------------------------------------------------

_CACHE: dict = {}


def _get(fn, **kw):
    key = (fn.__name__, tuple(sorted(kw.items())))
    if key not in _CACHE:
        _CACHE[key] = fn(**kw)
    return _CACHE[key]


# ---------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("domain", ["source", "target"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_digits_shapes_dtypes_labels(domain, split):
    d = _get(S.digits, domain=domain, split=split, num=2000)
    assert set(d) == {"image", "label"}
    assert d["image"].shape == (2000, 32, 32, 3) and d["image"].dtype == np.uint8
    assert d["label"].shape == (2000,) and d["label"].dtype == np.int32
    counts = np.bincount(d["label"], minlength=10)
    assert len(counts) == 10 and counts.min() == counts.max() == 200  # exactly balanced
    # Not all labels in a row: they are shuffled.
    assert (np.diff(d["label"]) != 0).mean() > 0.8


def test_digits_source_is_grey_on_black():
    img = _get(S.digits, domain="source", split="train", num=2000)["image"]
    assert np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 0], img[..., 2])
    border = np.concatenate([img[:, 0], img[:, -1], img[:, :, 0], img[:, :, -1]], axis=1)
    assert border.mean() < 5  # black background
    assert img.max(axis=(1, 2, 3)).min() >= 150  # every digit has bright ink
    ink_frac = (img[..., 0] > 127).mean(axis=(1, 2))
    assert 0.03 < ink_frac.min() and ink_frac.max() < 0.4


def test_digits_target_is_coloured_and_textured():
    src = _get(S.digits, domain="source", split="train", num=2000)["image"].astype(np.float32)
    tgt = _get(S.digits, domain="target", split="train", num=2000)["image"].astype(np.float32)
    # Colour: channels differ per pixel.
    assert np.abs(tgt[..., 0] - tgt[..., 1]).mean() > 10

    # Background texture: the source border is flat black, the target's is not.
    def border_std(x):
        b = np.concatenate([x[:, :3], x[:, -3:]], axis=1)
        return b.std(axis=(1, 2, 3)).mean()

    assert border_std(src) < 5 and border_std(tgt) > 12
    # Domain shift in the per-image mean statistics.
    assert tgt.mean() - src.mean() > 20


def test_digits_class_templates_differ():
    """Mean source images of different classes are clearly distinct."""
    d = _get(S.digits, domain="source", split="train", num=2000)
    means = np.stack([d["image"][d["label"] == c, :, :, 0].mean(0) for c in range(10)]) / 255.0
    dist = np.sqrt(((means[:, None] - means[None]) ** 2).sum(axis=(2, 3)))
    off_diag = dist[~np.eye(10, dtype=bool)]
    assert off_diag.min() > 2.0


@pytest.mark.parametrize("domain", ["source", "target"])
def test_digits_deterministic_and_seeded(domain):
    a = S.digits(domain=domain, split="train", num=64, seed=3)
    b = S.digits(domain=domain, split="train", num=64, seed=3)
    c = S.digits(domain=domain, split="train", num=64, seed=4)
    assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["label"], b["label"])
    assert not np.array_equal(a["image"], c["image"])


@pytest.mark.parametrize("domain", ["source", "target"])
def test_digits_train_test_disjoint(domain):
    tr = _get(S.digits, domain=domain, split="train", num=2000)["image"]
    te = _get(S.digits, domain=domain, split="test", num=2000)["image"]
    assert not (_row_set(tr) & _row_set(te))
    assert len(_row_set(tr)) == len(tr)  # and no duplicates inside a split


def test_digits_domains_use_distinct_streams():
    src = S.digits(domain="source", split="train", num=100)
    tgt = S.digits(domain="target", split="train", num=100)
    assert not np.array_equal(src["label"], tgt["label"])


def test_digits_zero_and_bad_args():
    d = S.digits(domain="source", split="test", num=0)
    assert d["image"].shape == (0, 32, 32, 3) and d["label"].shape == (0,)
    with pytest.raises(ValueError):
        S.digits(domain="mnist", split="train", num=4)
    with pytest.raises(ValueError):
        S.digits(domain="source", split="val", num=4)
    with pytest.raises(ValueError):
        S.digits(domain="source", split="train", num=4, seed=-1)
    with pytest.raises(TypeError):
        S.digits("source", "train", 4)  # keyword-only


# ---------------------------------------------------------------------------
# translation_pair
# ---------------------------------------------------------------------------


def _translation_union(split: str, num: int, seed: int, size: int, which: str) -> np.ndarray:
    """Animal silhouettes of the hidden scenes behind A (which='A') or B."""
    domain_id = 0 if which == "A" else (0 if split == "test" else 1)
    rng = S._rng("translation", domain_id, S._SPLIT_IDS[split], seed)
    scenes = S._sample_scenes(rng, num, size)
    return S._translation_regions(scenes, size, slice(0, num))[1]


def _sky_a(a: np.ndarray) -> np.ndarray:
    """Style A's sky is the only clearly blue region."""
    return a[..., 2] > a[..., 0] + 30


def _sky_b(b: np.ndarray) -> np.ndarray:
    """Style B's dusky sky is the only light (blue > 140) yet warm (red - blue in 20..60) region."""
    warmth = b[..., 0] - b[..., 2]
    return (b[..., 2] > 140) & (warmth >= 20) & (warmth <= 60)


def _animal_b(b: np.ndarray) -> np.ndarray:
    """Style B's zebras: neutral (red ~ blue) and either near-white or near-black."""
    return (np.abs(b[..., 0] - b[..., 2]) < 12) & ((b[..., 0] > 200) | (b[..., 0] < 60))


@pytest.mark.parametrize("split", ["train", "test"])
def test_translation_shapes_dtypes(split):
    d = _get(S.translation_pair, split=split, num=500)
    assert set(d) == {"A", "B"}
    for k in "AB":
        assert d[k].shape == (500, 64, 64, 3) and d[k].dtype == np.uint8


def test_translation_custom_size():
    d = S.translation_pair(split="test", num=8, size=32)
    assert d["A"].shape == d["B"].shape == (8, 32, 32, 3)
    with pytest.raises(ValueError):
        S.translation_pair(split="test", num=2, size=8)


def test_translation_identity_psnr_is_low():
    d = _get(S.translation_pair, split="test", num=500)
    p = _psnr(d["A"], d["B"])
    assert 10.0 <= p <= 15.0, p


def test_translation_test_split_is_paired():
    """Test split: A[i] and B[i] share a scene (same silhouettes, same horizon)."""
    d = _get(S.translation_pair, split="test", num=500)
    a, b = d["A"].astype(np.int32), d["B"].astype(np.int32)
    # The A and B sky masks must coincide pixel for pixel.
    agree = (_sky_a(a) == _sky_b(b)).mean(axis=(1, 2))
    assert agree.min() > 0.97
    # Silhouettes from the hidden scene line up with B's black/white animals.
    union = _translation_union("test", 500, 0, 64, "A")
    animal_b = _animal_b(b)
    assert (animal_b[union]).mean() > 0.95
    assert (animal_b[~union]).mean() < 0.01


def test_translation_mapping_is_a_function_of_a():
    """Identical A colours in the test split map to (nearly) identical B colours.

    Excludes pixels next to animal boundaries (outline) -- the rest of the map
    is a pure per-pixel palette lookup, so it must be consistent.
    """
    d = _get(S.translation_pair, split="test", num=500)
    a = d["A"].reshape(-1, 3)
    b = d["B"].reshape(-1, 3).astype(np.int32)
    union = _translation_union("test", 500, 0, 64, "A")
    interior = ~S._boundary(union).reshape(-1)
    keys = a[interior].astype(np.int64) @ np.array([1 << 16, 1 << 8, 1])
    vals = b[interior]
    order = np.argsort(keys, kind="stable")
    keys, vals = keys[order], vals[order]
    starts = np.r_[0, np.flatnonzero(np.diff(keys)) + 1]
    spread = np.maximum.reduceat(vals, starts, axis=0) - np.minimum.reduceat(vals, starts, axis=0)
    counts = np.diff(np.r_[starts, len(keys)])
    # Almost every pixel's A colour determines its B colour exactly.
    consistent = (spread.max(axis=1) <= 2) * counts
    assert consistent.sum() / counts.sum() > 0.99


def test_translation_train_split_is_unpaired():
    tr = _get(S.translation_pair, split="train", num=500)
    union_a = _translation_union("train", 500, 0, 64, "A")
    union_b = _translation_union("train", 500, 0, 64, "B")
    inter = (union_a & union_b).sum(axis=(1, 2))
    uni = (union_a | union_b).sum(axis=(1, 2))
    iou = inter / np.maximum(uni, 1)
    assert np.median(iou) < 0.4  # silhouettes of A[i] and B[i] are unrelated (paired: 1.0)
    # And those hidden scenes really are the ones rendered.
    a, b = tr["A"].astype(np.int32), tr["B"].astype(np.int32)
    assert _animal_b(b)[union_b].mean() > 0.95
    # Horizons are independent too: the sky masks rarely line up.
    agree = (_sky_a(a) == _sky_b(b)).mean(axis=(1, 2))
    assert agree.mean() < 0.95 and (agree > 0.99).mean() < 0.1
    # The train A's are distinct from the test A's.
    te = _get(S.translation_pair, split="test", num=500)
    assert not (_row_set(tr["A"]) & _row_set(te["A"]))
    assert not (_row_set(tr["B"]) & _row_set(te["B"]))


def test_translation_deterministic_and_seeded():
    a = S.translation_pair(split="train", num=16, seed=5)
    b = S.translation_pair(split="train", num=16, seed=5)
    c = S.translation_pair(split="train", num=16, seed=6)
    for k in "AB":
        assert np.array_equal(a[k], b[k])
        assert not np.array_equal(a[k], c[k])


def test_translation_styles_differ_in_palette():
    d = _get(S.translation_pair, split="test", num=500)
    a, b = d["A"].astype(np.float32), d["B"].astype(np.float32)
    # A: blue sky, green grass -> more blue and green than red on average.
    assert a[..., 2].mean() > a[..., 0].mean() and a[..., 1].mean() > a[..., 0].mean()
    # B: warm palette -> red dominates.
    assert b[..., 0].mean() > b[..., 1].mean() > b[..., 2].mean()


# ---------------------------------------------------------------------------
# segmentation_pair
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("domain", ["source", "target"])
def test_segmentation_shapes_and_classes(domain):
    d = _get(S.segmentation_pair, domain=domain, split="train", num=300)
    assert set(d) == {"image", "mask"}
    assert d["image"].shape == (300, 64, 64, 3) and d["image"].dtype == np.uint8
    assert d["mask"].shape == (300, 64, 64) and d["mask"].dtype == np.uint8
    assert d["mask"].max() < S.NUM_SEG_CLASSES
    counts = np.bincount(d["mask"].ravel(), minlength=S.NUM_SEG_CLASSES)
    assert len(counts) == S.NUM_SEG_CLASSES == len(S.SEG_CLASS_NAMES)
    assert (counts / counts.sum()).min() > 0.01  # every class present across the batch
    # Every image has sky and ground and at least one object.
    per_image = np.stack([(d["mask"] == c).any(axis=(1, 2)) for c in range(S.NUM_SEG_CLASSES)], 1)
    assert per_image[:, 0].mean() > 0.95 and per_image[:, 1].all()
    assert per_image[:, 2:].any(axis=1).all()


def test_segmentation_source_is_flat_per_class():
    d = _get(S.segmentation_pair, domain="source", split="train", num=300)
    img, mask = d["image"].astype(np.float32), d["mask"]
    for c in range(S.NUM_SEG_CLASSES):
        for i in range(20):
            px = img[i][mask[i] == c]
            if len(px):
                assert px.std(axis=0).max() < 1e-3  # one flat colour per class and image


def test_segmentation_masks_align_with_source_colours():
    """A nearest-class-colour classifier fitted on source gets source right but fails on target."""
    src = _get(S.segmentation_pair, domain="source", split="train", num=300)
    tgt = _get(S.segmentation_pair, domain="target", split="train", num=300)

    def fit(d):
        x = d["image"].reshape(-1, 3).astype(np.float32)
        y = d["mask"].reshape(-1)
        return np.stack([x[y == c].mean(0) for c in range(S.NUM_SEG_CLASSES)])

    def acc(centroids, d):  # class-balanced pixel accuracy
        x = d["image"].reshape(-1, 3).astype(np.float32)
        y = d["mask"].reshape(-1)
        pred = np.argmin(((x[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
        return np.mean([(pred[y == c] == c).mean() for c in range(S.NUM_SEG_CLASSES)])

    cs = fit(src)
    assert acc(cs, src) > 0.95
    assert acc(cs, tgt) < acc(fit(tgt), tgt) - 0.25  # domain shift
    # Target images are noisy/textured: flat class regions are no longer flat.
    img, mask = tgt["image"].astype(np.float32), tgt["mask"]
    assert img[0][mask[0] == 1].std(axis=0).mean() > 8


def test_segmentation_deterministic_disjoint_splits():
    for domain in ("source", "target"):
        a = S.segmentation_pair(domain=domain, split="train", num=12, seed=2)
        b = S.segmentation_pair(domain=domain, split="train", num=12, seed=2)
        c = S.segmentation_pair(domain=domain, split="train", num=12, seed=3)
        t = S.segmentation_pair(domain=domain, split="test", num=12, seed=2)
        assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["mask"], b["mask"])
        assert not np.array_equal(a["mask"], c["mask"])
        assert not (_row_set(a["mask"]) & _row_set(t["mask"]))
    with pytest.raises(ValueError):
        S.segmentation_pair(domain="real", split="train", num=2)


def test_translation_test_regions_partition_the_scene_and_match_b_colours():
    d = S.translation_pair(split="test", num=6, size=32)
    r = S.translation_test_regions(num=6, size=32)
    animal = r.pop("animal")
    count = sum(m.astype(int) for m in r.values())
    np.testing.assert_array_equal(count, 1)  # every pixel in exactly one region
    for name, colour in (
        ("outline", S._B_OUTLINE),
        ("fur_light", S._B_LIGHT),
        ("fur_band", S._B_DARK),
    ):
        assert r[name].any(), name
        np.testing.assert_array_equal(d["B"][r[name]], np.broadcast_to(colour, (r[name].sum(), 3)))
    np.testing.assert_array_equal(animal >= 0, r["fur_light"] | r["fur_band"] | r["outline"])
    assert animal.max() < S._MAX_ANIMALS
