"""Temporal sampling against independent re-derivations of the official rule
(docs/official_behaviour.md#temporal-sampling)."""
import numpy as np
import pytest

from goca_fast.data.sampling import (
    adapted_stride,
    sample_train_clips,
    uniform_eval_clips,
)


def _starts(clips):
    return [int(c[0]) for c in clips]


@pytest.mark.parametrize("n", [1, 5, 17, 40, 64, 150, 300])
@pytest.mark.parametrize("lengths,stride", [([16, 16, 8, 8, 8, 8], 2), ([32, 32], 2), ([8] * 5, 8), ([4], 1)])
def test_frames_in_range_and_spacing(n, lengths, stride):
    for seed in range(30):
        clips = sample_train_clips(n, lengths, stride, 16, np.random.default_rng(seed))
        assert len(clips) == len(lengths)
        s = adapted_stride(n, lengths[0], stride)
        for c, L in zip(clips, lengths):
            assert c.dtype == np.int64 and c.shape == (L,)
            assert c.min() >= 0 and c.max() < n
            if (L - 1) * s < n:  # fits: exact spacing
                assert np.all(np.diff(c) == s)
            else:  # too short: non-decreasing, repeats the last frame
                assert np.all(np.diff(c) >= 0) and c[-1] == n - 1


def test_min_distance_property_over_many_seeds():
    # 6 clips of span 31 in 300 frames with minn 16: always room for distinct starts >= 16 apart.
    for seed in range(300):
        clips = sample_train_clips(300, [16, 16, 8, 8, 8, 8], 2, 16, np.random.default_rng(seed))
        st = np.array(_starts(clips))
        d = np.abs(st[:, None] - st[None, :]) + np.eye(len(st), dtype=int) * 10**6
        assert d.min() >= 16


def test_stride_adaptation_by_hand():
    # n=20, L0=8, s=4: 8*4=32 > 20 -> floor(20/8)=2. Span (8-1)*2=14, starts in [0, 6).
    assert adapted_stride(20, 8, 4) == 2
    assert adapted_stride(32, 8, 4) == 4
    assert adapted_stride(5, 8, 4) == 1
    seen = set()
    for seed in range(200):
        (c,) = sample_train_clips(20, [8], 4, 0, np.random.default_rng(seed))
        assert np.all(np.diff(c) == 2)
        seen.add(int(c[0]))
    assert seen == set(range(6))
    # stride carried over from the first clip to later (longer) clips, which then clamp.
    c0, c1 = sample_train_clips(20, [8, 16], 4, 0, np.random.default_rng(0))
    assert np.all(np.diff(c0) == 2)
    assert c1[0] == 0 and c1.max() == 19


def test_min_distance_shrinks_when_no_room():
    # n=40, L=8, s=2: starts in [0, 26). Three clips 30 apart cannot fit -> minn decremented.
    for seed in range(50):
        clips = sample_train_clips(40, [8, 8, 8], 2, 30, np.random.default_rng(seed))
        for c in clips:
            assert 0 <= c[0] < 26 and c.max() < 40


def _rejection_second_start(n, L, s, minn, first, rng, draws):
    """Independent re-derivation: uniform in [0, n-(L-1)s) rejecting [c-minn, c+minn)."""
    high = n - (L - 1) * s
    out = []
    while len(out) < draws:
        x = int(rng.integers(high))
        if not (first - minn <= x < first + minn):
            out.append(x)
    return np.array(out)


def test_start_distribution_matches_rejection_sampling():
    n, L, s, minn = 60, 8, 2, 10
    high = n - (L - 1) * s  # 46
    draws = 20000
    ours_first, ours_second = [], []
    for seed in range(draws):
        c0, c1 = sample_train_clips(n, [L, L], s, minn, np.random.default_rng(seed))
        ours_first.append(int(c0[0]))
        if int(c0[0]) == 20:
            ours_second.append(int(c1[0]))
    h0 = np.bincount(ours_first, minlength=high)
    assert len(h0) == high
    # first start: uniform over [0, high); every bin within 5 sigma of draws/high.
    exp = draws / high
    assert np.all(np.abs(h0 - exp) < 5 * np.sqrt(exp))
    # second start given first=20: compare histograms with the rejection sampler.
    ref = _rejection_second_start(n, L, s, minn, 20, np.random.default_rng(1), 50000)
    ours = np.array(ours_second)
    assert len(ours) > 200
    support_ref = set(ref.tolist())
    assert set(ours.tolist()) <= support_ref
    assert not support_ref & set(range(10, 30))
    p_ref = np.bincount(ref, minlength=high) / len(ref)
    p_ours = np.bincount(ours, minlength=high) / len(ours)
    # total variation distance small (both ~uniform over 26 allowed values)
    assert 0.5 * np.abs(p_ref - p_ours).sum() < 0.2


def test_deterministic_given_rng():
    a = sample_train_clips(200, [16, 8], 2, 16, np.random.default_rng(7))
    b = sample_train_clips(200, [16, 8], 2, 16, np.random.default_rng(7))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_bad_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        sample_train_clips(0, [8], 2, 0, rng)
    with pytest.raises(ValueError):
        sample_train_clips(10, [], 2, 0, rng)
    with pytest.raises(ValueError):
        sample_train_clips(10, [8], 0, 0, rng)
    with pytest.raises(ValueError):
        uniform_eval_clips(10, 8, 2, 0)


def test_uniform_eval_clips():
    ev = uniform_eval_clips(100, 8, 4, 5)
    # span 28, last start 100-28-1 = 71, linspace(0, 71, 5) = 0, 17.75, 35.5, 53.25, 71
    assert ev.stride == 4 and not ev.padded
    assert [int(c[0]) for c in ev.indices] == [0, 18, 36, 53, 71]
    for c in ev.indices:
        assert np.all(np.diff(c) == 4) and c.max() <= 99
    # stride shrink: 8*8=64 > 40 -> floor(40/8)=5, span 35, last start 4
    ev = uniform_eval_clips(40, 8, 8, 3)
    assert ev.stride == 5 and [int(c[0]) for c in ev.indices] == [0, 2, 4]
    # one clip: centred
    ev = uniform_eval_clips(100, 8, 4, 1)
    assert int(ev.indices[0][0]) == 35
    # padding: 5 frames, 8-frame clips -> stride 1, last frame repeated
    ev = uniform_eval_clips(5, 8, 2, 2)
    assert ev.padded and ev.stride == 1
    for c in ev.indices:
        assert c.tolist() == [0, 1, 2, 3, 4, 4, 4, 4]
    # exactly L frames: fits, not padded
    ev = uniform_eval_clips(8, 8, 2, 2)
    assert not ev.padded and ev.indices[0].tolist() == list(range(8))
