"""Clip augmentation: one draw per clip, flow geometry shared with RGB, official flow path, eval crops."""
import numpy as np
import pytest
import torch

from goca_fast.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ClipAugment,
    eval_crops,
    flow_to_unit,
    resized_size,
)

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1, 1)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _denorm(x):
    """3×T×H×W normalised -> [0,1]."""
    return x * STD + MEAN


def _random_clip(t=6, h=40, w=56, seed=0, lo=0, hi=256):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, (t, 3, h, w), generator=g, dtype=torch.uint8)


def test_output_shape_and_normalisation():
    aug = ClipAugment(crop_size=32, scale_range=(40, 40), hflip_prob=0, jitter_prob=0, grayscale_prob=0)
    clip = torch.full((4, 3, 40, 56), 128, dtype=torch.uint8)
    out, flow = aug(clip, None, _gen(0))
    assert flow is None and out.shape == (3, 4, 32, 32) and out.dtype == torch.float32
    expected = (128 / 255 - MEAN) / STD
    assert torch.allclose(out, expected.expand_as(out), atol=1e-5)


@pytest.mark.parametrize("seed", range(12))
def test_one_draw_per_clip_identical_frames(seed):
    aug = ClipAugment(crop_size=24, scale_range=(28, 40), jitter_prob=1.0, grayscale_prob=0.5, blur_prob=0.5)
    frame = _random_clip(t=1, seed=seed)
    clip = frame.expand(8, -1, -1, -1).clone()
    out, _ = aug(clip, None, _gen(seed))
    for t in range(1, 8):
        assert torch.equal(out[:, t], out[:, 0])


def test_draw_statistics_and_ranges():
    aug = ClipAugment(crop_size=112, scale_range=(128, 160))
    g = _gen(1)
    ps = [aug.draw(128, 171, g) for _ in range(3000)]
    flip = np.mean([p.flip for p in ps])
    jit = np.mean([p.jitter is not None for p in ps])
    gray = np.mean([p.gray for p in ps])
    assert abs(flip - 0.5) < 0.04 and abs(jit - 0.8) < 0.04 and abs(gray - 0.2) < 0.03
    assert all(p.blur_sigma is None and not p.reverse for p in ps)  # official: never blur / reverse
    shorts = {p.short_side for p in ps}
    assert min(shorts) == 128 and max(shorts) == 160
    # crop offsets: inclusive of the last position (official off-by-one fixed)
    at_128 = [p for p in ps if p.short_side == 128]
    assert {p.top for p in at_128} == set(range(0, 17))
    orders = {p.jitter[0] for p in ps if p.jitter}
    assert len(orders) == 24  # op order randomised
    for p in ps:
        if p.jitter:
            _, b, c, s, h = p.jitter
            assert 0.6 <= b <= 1.4 and 0.6 <= c <= 1.4 and 0.8 <= s <= 1.2 and -0.1 <= h <= 0.1


@pytest.mark.parametrize("hflip_p,expect", [("0", 0.0), ("0.25", 0.25), ("1", 1.0)])
def test_config_hflip_p_sets_the_training_flip_rate(hflip_p, expect):
    """data.hflip_p reaches the training augmentation (0 for classes that a mirror changes: left/right motion)."""
    from pathlib import Path
    from goca_fast.plan.settings import train_augment
    from goca_fast.config import load_config
    demo = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    aug = train_augment(load_config(demo, [f"data.hflip_p={hflip_p}"]).data)
    g = _gen(2)
    rate = np.mean([aug.draw(64, 80, g).flip for _ in range(2000)])
    assert abs(rate - expect) < 0.03


def test_deterministic_from_generator():
    aug = ClipAugment(crop_size=24, scale_range=(28, 40))
    clip = _random_clip()
    a, _ = aug(clip, None, _gen(5))
    b, _ = aug(clip, None, _gen(5))
    c, _ = aug(clip, None, _gen(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def _paired_inputs(seed, t=5, h=40, w=56):
    """RGB whose R,G channels equal the flow's u,v bytes (u kept far from 128 so sign is visible)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randint(170, 256, (t, 1, h, w), generator=g, dtype=torch.uint8)
    v = torch.randint(0, 256, (t, 1, h, w), generator=g, dtype=torch.uint8)
    b = torch.randint(0, 256, (t, 1, h, w), generator=g, dtype=torch.uint8)
    return torch.cat([u, v, b], 1), torch.cat([u, v], 1)


@pytest.mark.parametrize("seed", range(16))
def test_flow_shares_geometry_and_negates_u_on_flip(seed):
    aug = ClipAugment(crop_size=24, scale_range=(28, 44), jitter_prob=0, grayscale_prob=0)
    rgb, flow = _paired_inputs(seed)
    out_rgb, out_flow = aug(rgb, flow, _gen(seed))
    p = ClipAugment(crop_size=24, scale_range=(28, 44), jitter_prob=0, grayscale_prob=0).draw(40, 56, _gen(seed))
    assert out_flow.shape == (2, 5, 24, 24)
    # what the flow must be if it got the RGB's geometry: the RGB's u/v bytes mapped to px/20
    # byte -> px/20 is affine, so it commutes with resize/crop; RGB is resized as uint8 (fixed-point
    # weights, then rounding: within about one byte)
    expect_u = _denorm(out_rgb)[0] * 255 * (2 / 255) - 1
    expect_v = _denorm(out_rgb)[1] * 255 * (2 / 255) - 1
    sign = -1.0 if p.flip else 1.0
    one_byte = 1.5 * 2 / 255
    assert torch.allclose(out_flow[0], sign * expect_u, atol=one_byte)
    assert torch.allclose(out_flow[1], expect_v, atol=one_byte)
    assert out_flow.abs().max() <= 1.0 + 1e-6
    if p.flip:
        assert out_flow[0].max() < 0  # u bytes >= 170 -> positive u, negated by the flip


def test_flip_happens_and_matches_manual_geometry():
    aug = ClipAugment(crop_size=40, scale_range=(40, 40), jitter_prob=0, grayscale_prob=0, hflip_prob=1.0)
    rgb, flow = _paired_inputs(0, h=40, w=40)
    out_rgb, out_flow = aug(rgb, flow, _gen(0))
    # scale = size, crop = full: output is exactly the flipped input
    assert torch.allclose(_denorm(out_rgb).permute(1, 0, 2, 3), rgb.float().flip(-1) / 255, atol=1e-5)
    assert torch.allclose(out_flow[0], -flow_to_unit(flow[:, 0]).flip(-1), atol=1e-6)
    assert torch.allclose(out_flow[1], flow_to_unit(flow[:, 1]).flip(-1), atol=1e-6)


def test_time_reversal():
    aug = ClipAugment(crop_size=40, scale_range=(40, 40), jitter_prob=0, grayscale_prob=0, hflip_prob=0,
                      time_reverse_prob=1.0)
    rgb, flow = _paired_inputs(2, h=40, w=40)
    out_rgb, out_flow = aug(rgb, flow, _gen(0))
    assert torch.allclose(_denorm(out_rgb).permute(1, 0, 2, 3), rgb.float().flip(0) / 255, atol=1e-5)
    assert torch.allclose(out_flow.permute(1, 0, 2, 3), -flow_to_unit(flow).flip(0), atol=1e-6)


def test_scale_flow_multiplies_by_resize_factor():
    aug = ClipAugment(crop_size=20, scale_range=(20, 20), jitter_prob=0, grayscale_prob=0, hflip_prob=0,
                      scale_flow=True)
    flow = torch.full((2, 2, 40, 60), 200, dtype=torch.uint8)
    _, out = aug(torch.zeros(2, 3, 40, 60, dtype=torch.uint8), flow, _gen(0))
    assert torch.allclose(out, flow_to_unit(flow)[0, 0, 0, 0] * 0.5 * torch.ones_like(out), atol=1e-5)


def test_grayscale_equal_channels():
    aug = ClipAugment(crop_size=24, scale_range=(28, 28), jitter_prob=0, grayscale_prob=1.0)
    out, _ = aug(_random_clip(), None, _gen(0))
    d = _denorm(out)
    assert torch.allclose(d[0], d[1], atol=1e-5) and torch.allclose(d[1], d[2], atol=1e-5)


def test_official_flow_mode_three_channels_independent():
    rgb, flow = _paired_inputs(3)
    plain = ClipAugment(crop_size=24, scale_range=(28, 44), jitter_prob=0, grayscale_prob=0, hflip_prob=0,
                        flow_mode="official")
    out_rgb, out_flow = plain(rgb, flow, _gen(0))
    assert out_flow.shape == (3, 5, 24, 24)
    d = _denorm(out_flow) * 255
    assert torch.allclose(d[0], torch.full_like(d[0], 128.0), atol=1e-3)  # R = 128
    # independent crop: the flow's G/B (v/u) are not the RGB's R/G at the same place for most seeds
    differs = 0
    for seed in range(10):
        o_rgb, o_flow = plain(rgb, flow, _gen(seed))
        same = torch.allclose(_denorm(o_flow)[2], _denorm(o_rgb)[0], atol=1e-4)
        differs += not same
    assert differs >= 7
    # colour jitter is applied to flow too in official mode
    jit = ClipAugment(crop_size=24, scale_range=(28, 28), jitter_prob=1.0, grayscale_prob=0, hflip_prob=0,
                      flow_mode="official")
    _, jf = jit(rgb, flow, _gen(1))
    assert not torch.allclose(_denorm(jf)[0], torch.full_like(jf[0], 128 / 255), atol=1e-3)


def test_bad_config():
    with pytest.raises(ValueError):
        ClipAugment(crop_size=112, scale_range=(100, 160))
    with pytest.raises(ValueError):
        ClipAugment(flow_mode="joint")
    aug = ClipAugment(crop_size=24, scale_range=(28, 28))
    with pytest.raises(ValueError, match="does not match"):
        aug(_random_clip(t=4), torch.zeros(3, 2, 40, 56, dtype=torch.uint8), _gen(0))


def test_resized_size():
    assert resized_size(240, 320, 128) == (128, 170)
    assert resized_size(320, 240, 128) == (170, 128)
    assert resized_size(64, 64, 32) == (32, 32)


def test_eval_crops_landscape_portrait_flow():
    # landscape: columns encode x; crops at left / centre / right
    t, h, w = 3, 40, 100
    x = torch.arange(w, dtype=torch.float32).view(1, 1, 1, w).expand(t, 3, h, w) / 255
    out = eval_crops(x, short_side=40, crop_size=40)
    assert out.shape == (3, 3, t, 40, 40)
    cols = ((out[:, 0, 0, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]) * 255).round()  # V×W, first row, R
    assert cols[0, 0] == 0 and cols[1, 0] == 30 and cols[2, -1] == 99
    # portrait: rows encode y; crops at top / centre / bottom
    y = torch.arange(w, dtype=torch.float32).view(1, 1, w, 1).expand(t, 3, w, h) / 255
    out = eval_crops(y, short_side=40, crop_size=40, positions=(0, 1, 2))
    rows = ((out[:, 0, 0, :, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]) * 255).round()  # V×H, first col
    assert rows[0, 0] == 0 and rows[1, 0] == 30 and rows[2, -1] == 99
    # resized short side and centre-only
    out = eval_crops(torch.zeros(2, 3, 80, 200, dtype=torch.uint8), short_side=40, crop_size=32, positions=(1,))
    assert out.shape == (1, 3, 2, 32, 32)
    # flow: 2 channels, px/20, no normalisation; official: 3 channels
    f = torch.full((2, 2, 40, 60), 255, dtype=torch.uint8)
    of = eval_crops(f, 40, 32, kind="flow")
    assert of.shape == (3, 2, 2, 32, 32) and torch.allclose(of, torch.ones_like(of))
    assert eval_crops(f, 40, 32, kind="flow", flow_mode="official").shape == (3, 3, 2, 32, 32)
    with pytest.raises(ValueError):
        eval_crops(f, 30, 32, kind="flow")


def test_train_augment_takes_every_field_from_the_data_section():
    from goca_fast.config import load_config
    from goca_fast.plan.settings import train_augment
    d = load_config(None, ["data.blur_p=0.5", "data.time_reverse_p=0.3", "data.flow_mode=official",
                           "data.crop_size=96", "data.scale_range=[100,140]", "data.color_jitter_p=0.7",
                           "data.grayscale_p=0.1"]).data
    a = train_augment(d)
    assert (a.crop, a.scale_range, a.jitter_prob, a.grayscale_prob, a.blur_prob, a.time_reverse_prob,
            a.flow_mode) == ((96, 96), (100, 140), 0.7, 0.1, 0.5, 0.3, "official")
