"""Swapped-prediction loss against a loop-by-loop re-derivation; queue semantics; the objective's merge modes."""
import math

import torch
import torch.nn.functional as F

from goca_fast.method.guidance import GuidanceParams
from goca_fast.method.loss import swapped_prediction
from goca_fast.models.goca_model import StreamOutput
from goca_fast.method.objective import GocaObjective
from goca_fast.method.queue import FeatureQueue, local_queue_length

# the objective of the mode tests: 3 clips, codes for the first two, the official Sinkhorn settings
MIX = dict(merge="mix", num_clips=3, assign_clips=[0, 1], epsilon=0.05, prior_epsilon=0.03, iterations=3, cycles=1,
           prior_sign="kl", prior_start_epoch=0, temperature=0.1)


def loss_by_hand(scores, codes, tau):
    """The official loss (docs/official_behaviour.md#loss) as plain loops:
    CE_i = Σ_{v≠i} mean_b(−Σ_k q_i log softmax(s_v/τ)), /(N−1), mean over i."""
    n = len(scores)
    total = 0.0
    for i, q in codes.items():
        ce = 0.0
        for v in range(n):
            if v == i:
                continue
            for b in range(q.shape[0]):
                z = scores[v][b].double() / tau
                logp = z - math.log(sum(math.exp(x) for x in z.tolist()))
                ce += -(q[b].double() * logp).sum().item() / q.shape[0]
        total += ce / (n - 1)
    return total / len(codes)


def test_swapped_prediction_matches_hand_derivation():
    g = torch.Generator().manual_seed(0)
    scores = [torch.randn(5, 7, generator=g) for _ in range(4)]
    codes = {0: F.softmax(torch.randn(5, 7, generator=g), 1), 2: F.softmax(torch.randn(5, 7, generator=g), 1)}
    got = swapped_prediction(scores, codes, 0.1)
    assert abs(got.item() - loss_by_hand(scores, codes, 0.1)) < 1e-4


def test_gradient_flows_only_through_predicting_scores():
    scores = [torch.randn(3, 4, requires_grad=True) for _ in range(3)]
    codes = {0: F.softmax(torch.randn(3, 4), 1)}
    swapped_prediction(scores, codes, 0.1).backward()
    assert scores[0].grad is None or torch.all(scores[0].grad == 0)
    assert scores[1].grad.abs().sum() > 0 and scores[2].grad.abs().sum() > 0


def test_queue_is_used_only_when_full_and_keeps_newest_first():
    q = FeatureQueue(streams=2, slots=1, length=6, dim=3)
    protos = torch.eye(3)
    s = torch.randn(2, 3)
    assert torch.equal(q.extend_scores(0, 0, s, protos), s)  # empty → not used
    for step in range(3):
        emb = torch.full((2, 1, 2, 3), float(step + 1))
        q.push(emb)
    assert q.full
    # newest batch at the front, the oldest at the end (SwAV/official order)
    assert torch.equal(q.embeddings[0, 0, :, 0], torch.tensor([3.0, 3, 2, 2, 1, 1]))
    ext = q.extend_scores(1, 0, s, protos)
    assert ext.shape == (8, 3) and torch.equal(ext[-2:], s) and torch.equal(ext[:6], q.embeddings[1, 0] @ protos.t())
    q.push(torch.full((2, 1, 2, 3), 4.0))
    assert torch.equal(q.embeddings[0, 0, :, 0], torch.tensor([4.0, 4, 3, 3, 2, 2]))
    state = q.state_dict()
    q2 = FeatureQueue(2, 1, 6, 3)
    q2.load_state_dict(state)
    assert q2.full and torch.equal(q2.embeddings, q.embeddings)


def test_local_queue_length_rounds_like_the_official():
    assert local_queue_length(3840, 10, 64) == (3840 - 3840 % 640) // 64 == 60
    assert local_queue_length(1000, 10, 8) == (1000 - 1000 % 80) // 8 == 120
    assert local_queue_length(50, 10, 8) == 0


def _outputs(num_clips, bs, K, D, seed):
    g = torch.Generator().manual_seed(seed)
    protos = F.normalize(torch.randn(K, D, generator=g), dim=1)
    out = {}
    for s in ("rgb", "flow"):
        z = F.normalize(torch.randn(num_clips * bs, D, generator=g), dim=1).requires_grad_()
        out[s] = StreamOutput(z, z @ protos.t())
    return out, protos


def test_prior_mode_loss_is_the_mean_of_per_stream_losses_with_goca_codes():
    from goca_fast.method.assign import goca_codes
    out, protos = _outputs(4, 6, 10, 8, 1)
    obj = GocaObjective(**{**MIX, "merge": "prior", "num_clips": 4})
    res = obj(out, protos, epoch=0)
    assert res.prior_on
    blocks = {s: list(out[s].scores.chunk(4)) for s in out}
    expect = 0.0
    codes = {s: {} for s in out}
    for i in (0, 1):
        codes["rgb"][i], codes["flow"][i] = goca_codes(blocks["rgb"][i], blocks["flow"][i], GuidanceParams(0.05,
                                                       0.03, 3))
    for s in out:
        expect += loss_by_hand([b.detach() for b in blocks[s]], codes[s], 0.1) / 2
    assert abs(res.loss.item() - expect) < 1e-4
    # before prior_start_epoch the streams are assigned independently
    assert not obj(out, protos, epoch=-1).prior_on


def test_mix_mode_predicts_across_modalities_and_official_scale_divides_again():
    from goca_fast.method.assign import sinkhorn
    out, protos = _outputs(3, 4, 6, 5, 2)
    obj = GocaObjective(**MIX)
    res = obj(out, protos, epoch=0)
    blocks = list(out["rgb"].scores.chunk(3)) + list(out["flow"].scores.chunk(3))
    codes = {j: sinkhorn(blocks[j], 0.05, 3) for j in (0, 1, 3, 4)}
    assert abs(res.loss.item() - loss_by_hand([b.detach() for b in blocks], codes, 0.1)) < 1e-4
    off = GocaObjective(**{**MIX, "official_loss_scale": True})
    assert abs(off(out, protos, 0).loss.item() - res.loss.item() / 2) < 1e-6


def test_objective_with_queue_prepends_and_returns_the_update():
    out, protos = _outputs(2, 4, 6, 5, 3)
    obj = GocaObjective(**{**MIX, "merge": "prior", "num_clips": 2, "assign_clips": [0]})
    q = FeatureQueue(2, 1, 8, 5)
    q.push(F.normalize(torch.randn(2, 1, 8, 5), dim=-1))
    res = obj(out, protos, 0, q)
    assert res.queue_update.shape == (2, 1, 4, 5)
    assert res.codes["rgb"][0].shape == (4, 6)


def test_prior_to_rgb_guides_rgb_by_flows_own_codes_and_leaves_flow_alone():
    """prior_to='rgb': flow codes = flow's plain iterate, RGB codes = RGB's iterate with flow's codes as prior, both
    over the queue-extended rows (float64 re-derivation); the symmetric default guides flow too."""
    import numpy as np
    from helpers import plain_iterate64
    out, protos = _outputs(2, 4, 6, 5, 4)
    q = FeatureQueue(2, 1, 8, 5)
    q.push(F.normalize(torch.randn(2, 1, 8, 5, generator=torch.Generator().manual_seed(5)), dim=-1))
    settings = {**MIX, "merge": "prior", "num_clips": 2, "assign_clips": [0], "prior_epsilon": 0.3}
    res = GocaObjective(**settings, prior_to="rgb")(out, protos, 0, q)
    ext = {s: torch.cat([q.embeddings[si, 0] @ protos.t(), out[s].scores[:4].detach()]).numpy()
           for si, s in enumerate(("rgb", "flow"))}
    p_f = plain_iterate64(ext["flow"], 0.05, 3)
    q_r = plain_iterate64(ext["rgb"], 0.05, 3, P=p_f, eps2=0.3)
    np.testing.assert_allclose(res.codes["flow"][0].numpy(), p_f[-4:], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(res.codes["rgb"][0].numpy(), q_r[-4:], rtol=1e-4, atol=1e-6)
    both = GocaObjective(**settings)(out, protos, 0, q)
    assert not np.allclose(both.codes["flow"][0].numpy(), p_f[-4:], rtol=1e-3, atol=1e-4)
    assert torch.allclose(both.codes["rgb"][0], res.codes["rgb"][0], rtol=1e-4, atol=1e-6)  # cycle 1: same RGB


def test_prior_to_rgb_refuses_two_cycles():
    import pytest
    with pytest.raises(ValueError, match="cycles must be 1"):
        GocaObjective(**{**MIX, "merge": "prior", "cycles": 2}, prior_to="rgb")
