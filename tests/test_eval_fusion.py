"""RGB+flow fusion (goca_fast.eval.fusion) on feature sets whose R@1 is worked out by hand."""
import math

import pytest
import torch

from goca_fast.eval.fusion import choose_weights, fusion_weights, leave_one_out_scores, weighted_concat
from goca_fast.eval.retrieval import combine_streams, recall_at_k

E1, E2 = [1.0, 0.0], [0.0, 1.0]
# gallery labels 0, 0, 1, 1. Flow is perfect; RGB describes each video, not its class: it pairs v0 with v3 and
# v1 with v2 (the other class), and each query's RGB feature points at a video of the other class too.
GALLERY = {"rgb": torch.tensor([E1, E2, E2, E1]), "flow": torch.tensor([E1, E1, E2, E2])}
GALLERY_LABELS = torch.tensor([0, 0, 1, 1])
QUERY = {"rgb": torch.tensor([E2, E1]), "flow": torch.tensor([E1, E2])}
QUERY_LABELS = torch.tensor([0, 1])


def leave_one_out_r1(features: torch.Tensor, labels: torch.Tensor) -> float:
    return leave_one_out_scores(features, labels)[0]


def leave_one_out_map(features: torch.Tensor, labels: torch.Tensor) -> float:
    return leave_one_out_scores(features, labels)[1]


def r1(query: torch.Tensor, gallery: torch.Tensor) -> float:
    return recall_at_k(query, QUERY_LABELS, gallery, GALLERY_LABELS, ks=(1,))[1]


def test_official_average_falls_below_flow_and_concat_does_not():
    # by hand: averaged features are q0 = q1 = (½, ½) (the cross terms mix the two spaces), so both queries retrieve
    # v1 (first of the tied v1, v3): 50 %; flow alone 100 %; RGB alone: q0 -> v1 (label 0) right, q1 -> v0 wrong
    assert r1(QUERY["flow"], GALLERY["flow"]) == 100.0
    assert r1(QUERY["rgb"], GALLERY["rgb"]) == 50.0
    assert r1(combine_streams(QUERY), combine_streams(GALLERY)) == 50.0
    # concat: sim = ½ cos_rgb + ½ cos_flow; q0: v1 gets ½·1 + ½·1 = 1, every other video ½ or 0 -> right; q1: v3
    half = {"rgb": 0.5, "flow": 0.5}
    assert r1(weighted_concat(QUERY, half), weighted_concat(GALLERY, half)) == 100.0


def test_weight_chosen_on_the_gallery_by_leave_one_out():
    # leave-one-out in the gallery with RGB weight w: v0's same-class neighbour v1 scores (1 - w), the other-class
    # v3 scores w, so every video is right for w < ½ (100 %); at w = ½ ties go to the lower index: v0, v1 right,
    # v2, v3 wrong (50 %); above ½ all wrong. The best grid point nearest equal weights is w = 0.45.
    assert choose_weights(GALLERY, GALLERY_LABELS) == {"rgb": 0.45, "flow": 0.55}
    assert leave_one_out_r1(weighted_concat(GALLERY, {"rgb": 0.5, "flow": 0.5}), GALLERY_LABELS) == 50.0
    assert leave_one_out_r1(weighted_concat(GALLERY, {"rgb": 0.6, "flow": 0.4}), GALLERY_LABELS) == 0.0
    assert fusion_weights("concat", GALLERY, GALLERY_LABELS) == {"rgb": 0.5, "flow": 0.5}


def test_weighted_concat_cosine_is_the_weighted_sum_of_stream_cosines():
    g = torch.Generator().manual_seed(0)
    a = {"rgb": torch.randn(5, 7, generator=g), "flow": torch.randn(5, 3, generator=g)}
    b = {"rgb": torch.randn(4, 7, generator=g), "flow": torch.randn(4, 3, generator=g)}
    w = {"rgb": 0.3, "flow": 0.7}

    def cos(x, y):
        return torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(y, dim=1).t()

    fused = weighted_concat(a, w) @ weighted_concat(b, w).t()
    assert torch.allclose(fused, 0.3 * cos(a["rgb"], b["rgb"]) + 0.7 * cos(a["flow"], b["flow"]), atol=1e-6)
    assert torch.allclose(weighted_concat(a, w).norm(dim=1), torch.ones(5), atol=1e-6)


def test_knn_scores_reports_the_fused_row_beside_the_official_average():
    from goca_fast.eval.features import SplitFeatures
    from goca_fast.eval.knn import knn_scores

    def split(name, feats, labels):
        return SplitFeatures(name, [f"{name}{i}" for i in range(len(labels))], labels, torch.zeros(len(labels)),
                             feats, None, len(labels), [], [], ["a", "b"])

    weights = {}
    out = knn_scores(split("train", GALLERY, GALLERY_LABELS), split("test", QUERY, QUERY_LABELS), ["rgb", "flow"],
                     ks=(1,), fusion="weighted", weights_out=weights)
    assert {s: r[1] for s, r in out.items()} == {"rgb": 50.0, "flow": 100.0, "both": 50.0, "fused": 100.0}
    assert weights == {"rgb": 0.45, "flow": 0.55}
    assert "fused" not in knn_scores(split("train", GALLERY, GALLERY_LABELS), split("test", QUERY, QUERY_LABELS),
                                     ["rgb", "flow"], ks=(1,))


def _unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_leave_one_out_map_by_hand():
    # 2-d unit vectors at 0°, 10°, 55° (class 0) and 30°, 95° (class 1); cosine order = angle order. Each row's
    # ranking of the others and its AP: v0: v1 v3 v2 v4 -> (1 + 2/3)/2; v1: v0 v3 v2 v4 -> 5/6; v2: v3 v4 v1 v0 ->
    # (1/3 + 2/4)/2; v3: v1 v2 v0 v4 -> 1/4; v4: v2 v3 v1 v0 -> 1/2. Mean: 2.8333/5.
    x = torch.tensor([_unit(a) for a in (0, 10, 55, 30, 95)])
    expect = 100 * (5 / 6 + 5 / 6 + 5 / 12 + 1 / 4 + 1 / 2) / 5
    assert leave_one_out_map(x, torch.tensor([0, 0, 0, 1, 1])) == pytest.approx(expect)


def test_r1_ties_are_broken_by_map_not_by_the_nearest_equal_weights():
    # flow: class 0 at 0°, 20°, 40°, class 1 at 90°, 110°, 130° (R@1 and mAP 100 alone); RGB: one-hot "twins"
    # (v0, v3), (v1, v4), (v2, v5) across the classes. Fused cosine = w·rgb + (1−w)·flow. For v0: v1 0.940(1−w), v2
    # 0.766(1−w), its twin v3 w. R@1 stays 100 % while w < 0.940(1−w) (w ≤ 0.45 on the grid), mAP while
    # w < 0.766(1−w) (w ≤ 0.40); at 0.45 v0, v2, v3, v5 rank their second neighbour third (AP 5/6), v1 and v4
    # keep AP 1: mAP (4·5/6 + 2)/6. The nearest-equal-weights rule alone would pick 0.45; mAP picks 0.40.
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    gallery = {"rgb": torch.eye(3)[[0, 1, 2, 0, 1, 2]],
               "flow": torch.tensor([_unit(a) for a in (0, 20, 40, 90, 110, 130)])}
    at = {w: weighted_concat(gallery, {"rgb": w, "flow": 1 - w}) for w in (0.4, 0.45, 0.5)}
    assert leave_one_out_r1(at[0.45], labels) == 100.0 and leave_one_out_r1(at[0.5], labels) < 100.0
    assert leave_one_out_map(at[0.4], labels) == pytest.approx(100.0)
    assert leave_one_out_map(at[0.45], labels) == pytest.approx(100 * (4 * 5 / 6 + 2) / 6)
    assert choose_weights(gallery, labels) == {"rgb": 0.4, "flow": 0.6}
