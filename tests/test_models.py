"""Backbones, heads, prototypes and multi-crop grouping."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from goca_fast.method.assign import sinkhorn
from goca_fast.models import GocaModel, ModelSpec, build_backbone, prototype_separation, run_grouped
from goca_fast.models.heads import Prototypes
from helpers import plain_iterate64, rel_err


@pytest.mark.parametrize("arch,pool,dim", [("r2plus1d_18", "1x2x2", 2048), ("r3d_18", "global", 512),
                                           ("s3d", "global", 1024), ("tiny", "global", 128)])
def test_backbone_feature_dims_and_flow_stem(arch, pool, dim):
    net = build_backbone(arch, in_channels=2, pool=pool)
    size = 64 if arch != "s3d" else 96
    out = net.eval()(torch.randn(1, 2, 8, size, size))
    assert out.shape == (1, dim) and net.out_dim == dim


def test_official_r2plus1d_pooling_gives_2048():
    net = build_backbone("r2plus1d_18", 3, "1x2x2").eval()
    assert net(torch.randn(1, 3, 16, 112, 112)).shape == (1, 2048)


def test_grouped_forward_equals_one_pass_per_group():
    """Equal-length clips share one backbone pass (BN statistics per group, as the official multi-crop)."""
    torch.manual_seed(0)
    net = build_backbone("tiny", 3, "global").train()
    clips = [torch.randn(2, 3, 8, 32, 32), torch.randn(2, 3, 8, 32, 32), torch.randn(2, 3, 4, 32, 32)]
    got = run_grouped(net, clips)
    net2 = build_backbone("tiny", 3, "global").train()
    net2.load_state_dict(net.state_dict())
    want = torch.cat([net2(torch.cat(clips[:2])), net2(clips[2])])
    assert torch.allclose(got, want, atol=1e-5)


def test_model_outputs_unit_embeddings_and_cosine_scores():
    m = GocaModel(ModelSpec("tiny", pool="global", hidden_dim=32, embed_dim=16, num_prototypes=10))
    m.prototypes.normalize_()
    clips = {"rgb": [torch.randn(3, 3, 4, 32, 32)] * 2, "flow": [torch.randn(3, 2, 4, 32, 32)] * 2}
    out = m(clips)
    for s in ("rgb", "flow"):
        z = out[s].embeddings
        assert torch.allclose(z.norm(dim=1), torch.ones(6), atol=1e-5)
        assert out[s].scores.abs().max() <= 1.0 + 1e-5
        assert torch.allclose(out[s].scores, z @ m.prototypes.weight.t())
    assert m.head("rgb") is not m.head("flow")
    shared = GocaModel(ModelSpec("tiny", pool="global", hidden_dim=32, embed_dim=16, num_prototypes=10,
                                 shared_head=True))
    assert shared.head("rgb") is shared.head("flow")


def test_avg_merge_gives_one_normalised_stream():
    m = GocaModel(ModelSpec("tiny", pool="global", hidden_dim=32, embed_dim=16, num_prototypes=10, merge="avg"))
    out = m({"rgb": [torch.randn(2, 3, 4, 32, 32)] * 2, "flow": [torch.randn(2, 2, 4, 32, 32)] * 2})
    assert list(out) == ["avg"] and torch.allclose(out["avg"].embeddings.norm(dim=1), torch.ones(4), atol=1e-5)


def test_precomputed_prototypes_are_loaded_and_frozen():
    init = np.random.default_rng(0).normal(size=(10, 16)).astype(np.float32)
    m = GocaModel(ModelSpec("tiny", pool="global", hidden_dim=32, embed_dim=16, num_prototypes=10),
                  prototypes_init=init)
    assert m.prototypes.frozen and not m.prototypes.weight.requires_grad
    assert np.allclose(m.prototypes.weight.detach().numpy(), init)
    with pytest.raises(ValueError, match="expected"):
        GocaModel(ModelSpec("tiny", pool="global", embed_dim=8, num_prototypes=10), prototypes_init=init)


def test_prototype_separation_by_hand():
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    # nearest others: p0→p1 (cos 0), p1→p0/p2 (0), p2→p1 (0): mean of max(1+cos) = 1
    assert abs(prototype_separation(w).item() - 1.0) < 1e-6
    w2 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert abs(prototype_separation(w2).item() - 2.0) < 1e-6


def test_scores_are_fp32_under_bf16_autocast_so_the_codes_are_fp32_accurate():
    """bf16 scores at ε=0.02 give ~1 % code error; the prototype product runs in fp32 whatever the autocast."""
    g = torch.Generator().manual_seed(0)
    protos = Prototypes(128, 1000)
    protos.normalize_()
    z = F.normalize(torch.randn(512, 128, generator=g), dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = protos(z)
    exact = z.double() @ protos.weight.detach().double().t()
    assert scores.dtype == torch.float32
    assert (scores.double() - exact).abs().max() <= 1e-6  # fp32 rounding of a 128-term dot product
    reference = plain_iterate64(exact.numpy(), 0.02, 3)
    bf16_scores = (z.bfloat16() @ protos.weight.detach().bfloat16().t()).float()  # what autocast alone gives
    assert rel_err(sinkhorn(scores, 0.02, 3), reference) <= 1e-5
    assert rel_err(sinkhorn(bf16_scores, 0.02, 3), reference) >= 1e-3


def test_model_under_bf16_autocast_keeps_the_network_bf16_and_the_scores_fp32():
    torch.manual_seed(1)
    m = GocaModel(ModelSpec("tiny", pool="global", hidden_dim=32, embed_dim=16, num_prototypes=10)).eval()
    m.prototypes.normalize_()
    clips = {"rgb": [torch.randn(3, 3, 4, 32, 32)] * 2, "flow": [torch.randn(3, 2, 4, 32, 32)] * 2}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        head_out = m.head("rgb")(m.features(clips)["rgb"])
        out = m(clips)
    assert head_out.dtype == torch.bfloat16  # the network itself still runs in bf16
    w = m.prototypes.weight.detach().double()
    for s in ("rgb", "flow"):
        z = out[s].embeddings
        assert z.dtype == out[s].scores.dtype == torch.float32
        assert torch.allclose(z.double().norm(dim=1), torch.ones(6, dtype=torch.float64), atol=1e-6)
        assert (out[s].scores.double() - z.double() @ w.t()).abs().max() <= 1e-6


def test_linear_head_is_one_linear_map_of_the_pooled_features():
    """model.head=linear: embedding = normalise(W·f + b) of the backbone features f, by hand; the default stays the
    official 3-linear MLP; an unknown head is a config error."""
    from goca_fast.plan.run import build_model, plan_settings
    from goca_fast.config import ConfigError, load_config
    torch.manual_seed(0)
    cfg = load_config("configs/guidance.yaml", ["model.head=linear"])
    m = build_model(plan_settings(cfg)).eval()
    clips = {"rgb": [torch.randn(2, 3, 8, 32, 32)] * 2, "flow": [torch.randn(2, 2, 8, 32, 32)] * 2}
    out = m(clips)
    feats = m.features(clips)
    for s in ("rgb", "flow"):
        lin = m.head(s)
        assert isinstance(lin, torch.nn.Linear) and lin.weight.shape == (cfg.model.embed_dim, 128)
        z = feats[s] @ lin.weight.T + lin.bias
        z = z / z.norm(dim=1, keepdim=True)
        assert torch.allclose(out[s].embeddings, z, atol=1e-6)
        assert torch.allclose(out[s].scores, z @ m.prototypes.weight.T, atol=1e-6)
    mlp = build_model(plan_settings(load_config("configs/demo.yaml"))).head("rgb")  # no model.head: the default
    assert [type(x).__name__ for x in mlp] == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU",
                                               "Linear"]
    with pytest.raises(ConfigError, match="model.head"):
        load_config("configs/guidance.yaml", ["model.head=conv"])
