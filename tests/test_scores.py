"""Tests of the similarity scores: exact values on constructed cases and brute-force comparisons."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nbhelpers import scores as S
from nbhelpers.features import FeatureSet


def _pairs_with_cosines(cosines, dim: int, gen: torch.Generator):
    """Unit vectors a_j, b_j with cos(a_j, b_j) = cosines[j] exactly (up to rounding)."""
    c = torch.as_tensor(cosines, dtype=torch.float64)
    a = F.normalize(torch.randn(len(c), dim, generator=gen, dtype=torch.float64), dim=1)
    u = torch.randn(len(c), dim, generator=gen, dtype=torch.float64)
    u = F.normalize(u - (u * a).sum(1, keepdim=True) * a, dim=1)  # orthogonal to a
    b = c[:, None] * a + torch.sqrt(1 - c**2)[:, None] * u
    return a, b


COSINES = [0.95, 0.61, 0.59, 0.2, -0.5, 0.7, 0.6001, 0.5999, 0.99, 0.0]  # 5 of 10 above 0.6


def test_reproducibility_score_exact_and_paired_by_seed(gen):
    a, b = _pairs_with_cosines(COSINES, 32, gen)
    seeds = np.arange(100, 110)
    fa = FeatureSet(a, seeds)
    assert S.reproducibility_score(fa, FeatureSet(b, seeds)) == pytest.approx(0.5)
    assert S.reproducibility_score(fa, FeatureSet(b, seeds), threshold=0.1) == pytest.approx(0.8)
    # b stored in another order: the score pairs by seed, not position
    perm = torch.from_numpy(np.random.default_rng(0).permutation(10))
    fb_perm = FeatureSet(b[perm], seeds[perm.numpy()])
    assert S.reproducibility_score(fa, fb_perm) == pytest.approx(0.5)
    assert S.reproducibility_score((a, seeds), (b[perm], torch.from_numpy(seeds)[perm])) == pytest.approx(0.5)
    # pairing by position after the permutation would give another value
    assert S.reproducibility_score((a, seeds), (b[perm], seeds)) != pytest.approx(0.5)
    # features need not be unit norm
    assert S.reproducibility_score((3 * a, seeds), (0.1 * b, seeds)) == pytest.approx(0.5)
    common, xa, xb = S.pair_by_seed(fa, fb_perm)
    assert common.tolist() == seeds.tolist()
    torch.testing.assert_close(S.paired_cosine(xa, xb), torch.tensor(COSINES, dtype=torch.float64))


def test_seed_mismatch_errors_and_intersection(gen):
    a, b = _pairs_with_cosines(COSINES, 16, gen)
    sa = np.arange(10)
    sb = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 42])
    with pytest.raises(ValueError, match=r"only in a: 9.*only in b: 42"):
        S.reproducibility_score((a, sa), (b, sb))
    # the common seeds 0..8 hold 5 of the pairs above 0.6 (seed 9 has cosine 0)
    assert S.reproducibility_score((a, sa), (b, sb), on_mismatch="intersect") == pytest.approx(5 / 9)
    with pytest.raises(ValueError, match="no seed in common"):
        S.reproducibility_score((a, sa), (b, sa + 1000), on_mismatch="intersect")
    with pytest.raises(ValueError, match="repeated seeds"):
        S.reproducibility_score((a, np.zeros(10, dtype=int)), (b, sa))
    with pytest.raises(ValueError, match="paired by seed"):
        S.reproducibility_score(a, b)
    with pytest.raises(ValueError, match="without seeds"):
        S.reproducibility_score(FeatureSet(a), (b, sa))
    with pytest.raises(ValueError, match="10 integers"):
        S.reproducibility_score((a, sa[:5]), (b, sa))
    with pytest.raises(ValueError, match="on_mismatch"):
        S.reproducibility_score((a, sa), (b, sa), on_mismatch="ignore")
    many = np.arange(1000, 1010)
    with pytest.raises(ValueError, match=r"\(10 in all\)"):
        S.reproducibility_score((a, sa), (b, many))


def test_pairwise_agreement_custom_criterion(gen):
    x = torch.randn(6, 3, 4, 4, generator=gen)
    seeds = np.arange(6)
    flags = S.pairwise_agreement(
        (x, seeds), (x + 0.0, seeds), lambda xa, xb: (xa - xb).flatten(1).norm(dim=1) == 0
    )
    assert flags == 1.0
    with pytest.raises(ValueError, match="one flag per pair"):
        S.pairwise_agreement((x, seeds), (x, seeds), lambda xa, xb: torch.ones(2, dtype=torch.bool))


def test_relative_distance_and_rp_relative(gen):
    xb = torch.randn(5, 2, 3, 3, generator=gen, dtype=torch.float64)
    scale = torch.tensor([0.0, 0.05, 0.099, 0.2, 0.5], dtype=torch.float64)
    direction = F.normalize(torch.randn(5, 18, generator=gen, dtype=torch.float64), dim=1)
    xa = xb + (scale * xb.flatten(1).norm(dim=1))[:, None, None, None] * direction.reshape(5, 2, 3, 3)
    torch.testing.assert_close(S.relative_distance(xa, xb), scale)
    seeds = np.array([7, 3, 5, 1, 9])
    assert S.rp_relative((xa, seeds), (xb, seeds)) == pytest.approx(3 / 5)
    assert S.rp_relative((xa, seeds), (xb, seeds), threshold=1 / 3) == pytest.approx(4 / 5)
    zero = torch.zeros(1, 4)
    assert S.relative_distance(zero, zero).item() == 0.0


def test_mae_score_uint8_and_model_space():
    base = np.full((4, 3, 8, 8), 100, dtype=np.uint8)
    deltas = np.array([0, 10, 25, 40])  # MAE 0, 0.039, 0.098, 0.157 in [0, 1] units
    other = base + deltas[:, None, None, None].astype(np.uint8)
    seeds = np.array([3, 1, 2, 0])
    torch.testing.assert_close(
        S.mean_abs_difference(torch.from_numpy(other), torch.from_numpy(base)),
        torch.tensor(deltas / 255, dtype=torch.float64),
    )
    assert S.MAE_THRESHOLD == 0.1
    assert S.mae_score((other, seeds), (base, seeds)) == pytest.approx(3 / 4)
    assert S.mae_score((other, seeds), (base, seeds), threshold=0.05) == pytest.approx(2 / 4)
    # model-space floats give the same differences
    to_model = lambda u: torch.from_numpy(u).double() / 127.5 - 1
    assert S.mae_score((to_model(other), seeds), (to_model(base), seeds)) == pytest.approx(3 / 4)


def test_generalization_score_constructed(gen):
    train = F.normalize(torch.randn(50, 256, generator=gen), dim=1)
    copies = train[[3, 7, 7, 40]] + 0.01 * torch.randn(4, 256, generator=gen)
    fresh = F.normalize(torch.randn(12, 256, generator=gen), dim=1)  # |cos| to train ~ 0.06 << 0.6
    generated = torch.cat([copies, fresh])
    assert S.memorized_fraction(generated, train) == pytest.approx(4 / 16)
    assert S.generalization_score(generated, train) == pytest.approx(12 / 16)
    assert S.generalization_score(FeatureSet(generated), FeatureSet(train), chunk_size=5) == pytest.approx(
        12 / 16
    )
    assert S.generalization_score(generated, train, threshold=0.99999) == pytest.approx(1.0)
    _, idx = S.max_similarity(copies, train)
    assert idx.tolist() == [3, 7, 7, 40]


@pytest.mark.parametrize("chunk", [(1, 130), (45, 1), 7, (3, 50), (64, 13), 10_000])
def test_max_similarity_equals_brute_force(gen, chunk):
    q = torch.randn(45, 12, generator=gen)
    k = torch.randn(130, 12, generator=gen) * torch.rand(130, 1, generator=gen)
    values, idx = S.max_similarity(q.numpy(), k, chunk_size=chunk)
    sim = F.normalize(q.double(), dim=1) @ F.normalize(k.double(), dim=1).T
    torch.testing.assert_close(values.double(), sim.max(1).values, rtol=0, atol=1e-6)
    assert torch.equal(idx, sim.argmax(1))
    v64, i64 = S.max_similarity(q, k, chunk_size=chunk, dtype=torch.float64)
    torch.testing.assert_close(v64, sim.max(1).values, rtol=0, atol=1e-12)
    assert torch.equal(i64, idx)


def test_max_similarity_ties_keep_first_index():
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 3.0]])
    _, idx = S.max_similarity(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), keys, chunk_size=(2, 1))
    assert idx.tolist() == [0, 1]


@pytest.mark.parametrize("chunk", [1, 5, (16, 3), 1000])
def test_nn_ratio_equals_brute_force(gen, chunk):
    train = torch.randint(0, 256, (40, 3, 4, 4), generator=gen, dtype=torch.uint8)
    gen_model = torch.randn(25, 3, 4, 4, generator=gen, dtype=torch.float64)
    gen_model[:3] = train[[5, 6, 7]].double() / 127.5 - 1  # exact copies, in model space
    ratio = S.nn_ratio(gen_model, train, chunk_size=chunk)
    diff = gen_model.flatten(1)[:, None, :] - (train.double() / 127.5 - 1).flatten(1)[None]
    d = diff.norm(dim=2)  # explicit differences: exact zeros for the copies
    top = d.topk(2, largest=False).values
    torch.testing.assert_close(ratio[3:], top[3:, 0] / top[3:, 1], rtol=0, atol=1e-12)
    assert ratio[:3].tolist() == [0.0, 0.0, 0.0]
    dist, idx = S.nearest_neighbors(gen_model, train, k=3, chunk_size=chunk)
    torch.testing.assert_close(dist, d.topk(3, largest=False).values, rtol=0, atol=1e-12)
    assert idx[:3, 0].tolist() == [5, 6, 7]
    assert float((ratio < 1 / 3).double().mean()) >= 3 / 25


def test_nn_inputs_errors(gen):
    with pytest.raises(ValueError, match="k must be"):
        S.nearest_neighbors(torch.zeros(2, 3), torch.zeros(1, 3), k=2)
    with pytest.raises(ValueError, match="values"):
        S.nn_ratio(torch.zeros(2, 3), torch.zeros(4, 5))
    with pytest.raises(ValueError, match="features per row"):
        S.max_similarity(torch.zeros(2, 3), torch.zeros(4, 5))
    with pytest.raises(ValueError, match="uint8 or floating"):
        S.max_similarity(torch.zeros(2, 3, dtype=torch.int32), torch.zeros(4, 3))


@pytest.mark.parametrize("flag", ["below", "above"])
@pytest.mark.parametrize("decimals", [None, 2])
def test_calibrate_null_is_the_loosest_threshold_within_the_false_rate(flag, decimals):
    """Brute force over candidate thresholds: the calibrated one flags <= 1 % of the null, and any
    looser threshold on the rounding grid flags more."""
    rng = np.random.default_rng(1)
    null = rng.uniform(0.0, 1.0, 300)  # 1 % of 300: 3 may be flagged
    if flag == "above":
        null = -null
    t = S.calibrate_null(null, 0.01, flag=flag, decimals=decimals)
    assert S.flagged(null, t, flag).mean() <= 0.01
    step = 1e-9 if decimals is None else 10.0**-decimals
    looser = t + step if flag == "below" else t - step
    assert S.flagged(null, looser, flag).mean() > 0.01
    if decimals is not None:
        assert round(t, decimals) == pytest.approx(t)
    rates = S.flag_rates(null, [t, looser], flag)
    assert rates[0] <= 0.01 < rates[1]


def test_criterion_flags_and_errors():
    copy = S.Criterion("copy", "relative", 0.07)
    assert copy.flags([0.0, 0.07, 0.08]).tolist() == [True, True, False] and copy.flag == "below"
    same = S.Criterion("same", "cosine", 0.6)
    assert same.flags([0.6, 0.61]).tolist() == [False, True] and "cos" in str(same)
    assert S.calibrate_null([0.5, 0.7, 0.9], max_false_rate=0.0) == 0.49
    with pytest.raises(ValueError, match="question"):
        S.Criterion("both", "relative", 0.1)
    with pytest.raises(ValueError, match="finite"):
        S.calibrate_null([0.5, np.nan])
    with pytest.raises(ValueError, match="flag"):
        S.calibrate_null([0.5], flag="left")


MEMORY_SCRIPT = textwrap.dedent(
    """
    import resource, sys, torch
    torch.set_num_threads(1)
    from nbhelpers.scores import max_similarity
    g = torch.Generator().manual_seed(0)
    q = torch.randn(20000, 64, generator=g)
    k = torch.randn(5000, 64, generator=g)
    max_similarity(q[:1024], k[:1024], chunk_size=512)  # warm up allocator and BLAS buffers
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    values, idx = max_similarity(q, k, chunk_size=512)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) / 1024)
    """
)


@pytest.mark.slow
def test_max_similarity_memory_is_bounded():
    """20000 x 5000 similarities would take 400 MB at once; chunked, the peak grows by a few MB."""
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, check=True)
    growth_mib = float(out.stdout.strip().splitlines()[-1])
    assert growth_mib < 100, growth_mib


def test_nn_relative_distance_and_noisy_copies():
    """An exact copy scores 0; a planted copy with relative noise s scores about s; far points score high."""
    g = torch.Generator().manual_seed(0)
    train = torch.randn(50, 3, 8, 8, generator=g, dtype=torch.float64)
    rel, idx = S.nn_relative_distance(train[[3, 7]], train)
    assert rel.tolist() == [0.0, 0.0] and idx.tolist() == [3, 7]
    copies = S.noisy_copies(train, 200, 0.05, torch.Generator().manual_seed(1))
    rel_c, _ = S.nn_relative_distance(copies, train)
    assert rel_c.median() == pytest.approx(0.05, rel=0.1)
    rel_f, _ = S.nn_relative_distance(torch.randn(20, 3, 8, 8, generator=g, dtype=torch.float64), train)
    assert float(rel_f.min()) > 0.5
    u8 = ((train.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    rel_u, _ = S.nn_relative_distance(u8[:4], u8)
    assert rel_u.tolist() == [0.0] * 4


def test_share_se_is_binomial_and_kept_off_zero():
    assert S.share_se(0.5, 100) == pytest.approx(0.05)
    assert S.share_se(0.0, 100) == pytest.approx(np.sqrt(0.25 / 100 / 100))
    with pytest.raises(ValueError):
        S.share_se(0.5, 0)
