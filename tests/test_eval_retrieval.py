"""Pure evaluation math: R@k against a brute-force hand computation (ties included), clip/crop averaging, top-k
accuracy, class-balanced subsets, class-list checks, LR schedules."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from goca_fast.eval import EvalError
from goca_fast.eval.features import extract_features
from goca_fast.eval.finetune_recipe import finetune_lr
from goca_fast.eval.linear import multistep_lr, topk_accuracy
from goca_fast.eval.monitor import stratified_subset
from goca_fast.eval.retrieval import combine_streams, nearest_neighbours, recall_at_k
from goca_fast.eval.splits import class_check
from helpers import brute_force_recall, one_torch_thread  # noqa: F401 (autouse fixture)


def test_recall_matches_brute_force_on_random_features():
    g = torch.Generator().manual_seed(0)
    q, gal = torch.randn(37, 16, generator=g), torch.randn(90, 16, generator=g)
    qy, gy = torch.randint(0, 6, (37,), generator=g), torch.randint(0, 6, (90,), generator=g)
    ks = (1, 5, 10, 20, 50)
    got = recall_at_k(q, qy, gal, gy, ks, chunk=7)  # chunking must not matter
    want = brute_force_recall(q.double().tolist(), qy.tolist(), gal.double().tolist(), gy.tolist(), ks)
    assert got == pytest.approx(want)


def test_recall_ties_are_broken_by_gallery_order():
    # one-hot features: every similarity is exactly 0 or 1, so many neighbours tie
    e = torch.eye(3)
    gallery = torch.stack([e[0], e[0], e[0], e[1], e[1], e[2]])
    gy = torch.tensor([5, 5, 1, 1, 2, 3])   # the first two gallery items tied with query 0 are of class 5
    query = torch.stack([e[0], e[1], e[2], e[0]])
    qy = torch.tensor([1, 2, 3, 5])
    ks = (1, 2, 3, 4, 6)
    got = recall_at_k(query, qy, gallery, gy, ks)
    want = brute_force_recall(query.tolist(), qy.tolist(), gallery.tolist(), gy.tolist(), ks)
    assert got == want
    # by hand: q0 (class 1) ties with g0, g1, g2 → its class first appears at rank 3; q1 (class 2) ties with
    # g3 (class 1), g4 (class 2) → rank 2; q2 and q3 hit at rank 1
    assert got[1] == 50.0 and got[2] == 75.0 and got[3] == 100.0
    idx, sims = nearest_neighbours(query, gallery, 3)
    assert idx[0].tolist() == [0, 1, 2] and idx[1].tolist() == [3, 4, 0]
    assert sims[0].tolist() == [1.0, 1.0, 1.0]
    nearest, _ = nearest_neighbours(query, gallery, 1)   # the R@1 indicator per query
    assert (gy[nearest[:, 0]] == qy).tolist() == [False, False, True, True]


def test_blocked_top_k_is_the_stable_sort_of_whole_rows():
    """Gallery and query blocks of every size give exactly the order a stable sort of each whole row gives.
    Features with entries ±0.5 in 4 dimensions are unit vectors whose dot products (multiples of 0.25) are exact
    in any summation order, and only 16 distinct: most neighbours tie, across block borders too."""
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        nq, ng, k = (int(torch.randint(1, hi, (1,), generator=g)) for hi in (60, 200, 60))
        q = torch.randint(0, 2, (nq, 4), generator=g).float() - 0.5
        gal = torch.randint(0, 2, (ng, 4), generator=g).float() - 0.5
        chunk, gallery_chunk = (int(torch.randint(1, hi, (1,), generator=g)) for hi in (20, 50))
        idx, sims = nearest_neighbours(q, gal, k, chunk=chunk, gallery_chunk=gallery_chunk)
        sim = q @ gal.t()
        want = torch.sort(-sim, dim=1, stable=True).indices[:, :min(k, ng)]
        assert torch.equal(idx, want)
        assert torch.equal(sims, torch.gather(sim, 1, want))


def test_recall_k_larger_than_gallery_and_errors():
    q, g = torch.randn(4, 3), torch.randn(2, 3)
    r = recall_at_k(q, torch.zeros(4, dtype=torch.long), g, torch.tensor([0, 1]), (1, 50))
    assert r[50] == 100.0
    with pytest.raises(ValueError):
        recall_at_k(torch.empty(0, 3), torch.empty(0, dtype=torch.long), g, torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        recall_at_k(q, torch.zeros(4, dtype=torch.long), torch.randn(2, 5), torch.tensor([0, 1]))


def test_combine_streams_averages_normalised_features():
    a, b = torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 10.0]])
    assert torch.allclose(combine_streams({"rgb": a, "flow": b}), torch.tensor([[0.5, 0.5]]))


class _Echo(nn.Module):
    """A 'model' whose pooled feature of a view is the view's pixel mean per channel × a per-stream scale."""

    def __init__(self):
        super().__init__()
        self.streams = ["rgb", "flow"]
        self.backbones = {"rgb": lambda c: c.mean(dim=(2, 3, 4)), "flow": lambda c: c.mean(dim=(2, 3, 4)) * 2.0}


def test_clip_crop_averaging():
    torch.manual_seed(0)
    n, v = 3, 6   # 3 videos, 2 clips × 3 crops
    rgb = torch.rand(n, v, 3, 2, 4, 4) + 0.1
    flow = torch.rand(n, v, 2, 2, 4, 4) + 0.1
    batch = SimpleNamespace(rgb=rgb, flow=flow, label=torch.tensor([0, 1, 2]), index=torch.tensor([0, 1, 2]),
                            padded=torch.tensor([False, True, False]), skipped=1)
    out = extract_features(_Echo(), [batch, None], torch.device("cpu"), keep_views=True)
    for s, x in (("rgb", rgb), ("flow", flow)):
        per_view = x.mean(dim=(3, 4, 5)) * (1.0 if s == "rgb" else 2.0)          # n×v×C
        want = torch.nn.functional.normalize(per_view, dim=2).mean(dim=1)         # normalise each view, then average
        assert torch.allclose(out.features[s], want, atol=1e-6)
        assert torch.allclose(out.views[s], per_view, atol=1e-6)
    assert out.padded.tolist() == [False, True, False] and out.skipped == 1
    assert torch.equal(out.labels, torch.tensor([0, 1, 2])) and out.index.tolist() == [0, 1, 2]


def test_topk_accuracy_and_ties():
    probs = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 1, 0])
    acc = topk_accuracy(probs, labels, (1, 2, 5))
    assert acc[1] == pytest.approx(100 / 3)   # row 1 ties 0/1: class order puts 0 first → miss
    assert acc[2] == pytest.approx(200 / 3) and acc[5] == 100.0


def test_stratified_subset_balanced_and_deterministic():
    labels = [0] * 10 + [1] * 3 + [2] * 7
    sub = stratified_subset(labels, 9, seed=1)
    assert sub == sorted(sub) and len(sub) == 9 and sub == stratified_subset(labels, 9, seed=1)
    counts = [sum(labels[i] == c for i in sub) for c in range(3)]
    assert counts == [3, 3, 3]
    assert stratified_subset(labels, 0) == list(range(20))
    assert [sum(labels[i] == c for i in stratified_subset(labels, 14)) for c in range(3)] == [6, 3, 5]


def test_class_check():
    assert class_check([0, 1, 2], [0, 1], ["a", "b", "c"], "train", "test") == [
        "1 classes of 'train' have no video in 'test'"]
    w = class_check([0, 1], [1, 2], ["a", "b", "c"], "train", "test")
    assert "never occur in 'train' (c)" in w[0]
    with pytest.raises(EvalError, match="share no class"):
        class_check([0], [1], ["a", "b"], "train", "test")


def test_schedules():
    assert multistep_lr(0.1, 59, (60, 80), 0.1) == 0.1
    assert multistep_lr(0.1, 60, (60, 80), 0.1) == pytest.approx(0.01)
    assert multistep_lr(0.1, 99, (60, 80), 0.1) == pytest.approx(0.001)
    assert finetune_lr(1.0, 0.0, 100, 5, "step") == pytest.approx(0.01)
    assert finetune_lr(1.0, 2.5, 100, 5, "step") == pytest.approx(0.5)
    assert finetune_lr(1.0, 70, 100, 5, "step") == pytest.approx(0.1)
    assert finetune_lr(1.0, 5, 100, 5, "cosine") == pytest.approx(1.0)
    assert finetune_lr(1.0, 100, 100, 5, "cosine") == pytest.approx(0.0, abs=1e-12)
