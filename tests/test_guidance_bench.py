"""The guidance benchmark at CI size: its three data families (motion-only classes, UCF101 layout through
goca-prepare and goca-flow), its statistics (against hand-computed values) and its script (runs, result files) must
keep working. The measured results are in benchmarks/results/guidance-cpu.md, not here."""
import json
import math
import re
import resource
from collections import Counter

import numpy as np
import pytest

pytest.importorskip("skimage")

from benchmarks import guidance_bench  # noqa: E402
from benchmarks.guidance_data import FAMILIES, OBJECT_DIRECTION, TEST_IMAGES, TEST_RASTERS, TRAIN_IMAGES  # noqa: E402
from benchmarks.guidance_data import TRAIN_RASTERS, write_family  # noqa: E402
from goca_fast.data.index import read_index  # noqa: E402
from goca_fast.video.flow_codec import dequantise_flow, read_flow_frames  # noqa: E402

SEED = 3


@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory):
    """One --quick run of the benchmark (every family, kl and no-prior pretraining of one seed, 1 epoch, two runs
    side by side), results in a temp folder; also the CPU seconds of every child process this test waited for."""
    tmp = tmp_path_factory.mktemp("guidance")
    mp = pytest.MonkeyPatch()
    mp.setenv("GOCA_FAST_RESULTS_DIR", str(tmp / "results"))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert guidance_bench.main(["--quick", "--seeds", str(SEED), "--variants", "kl,none", "--jobs", "2",
                                "--work", str(tmp / "work"), "--probe-seeds", str(SEED)]) == 0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    mp.undo()
    (tmp / "children_cpu_s").write_text(str(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime))
    return tmp


def picture_motion(flow: np.ndarray) -> dict[str, float]:
    """Mean flow of a T×H×W×2 field in px: translation (u, v), divergence and rotation about the frame centre
    (rotation > 0 = clockwise on screen, image y pointing down)."""
    _, h, w, _ = flow.shape
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    x, y = x - (w - 1) / 2, y - (h - 1) / 2
    u, v = flow[..., 0], flow[..., 1]
    r2 = x * x + y * y + 1.0
    return {"u": float(u.mean()), "v": float(v.mean()), "div": float(((u * x + v * y) / r2).mean()),
            "rot": float(((v * x - u * y) / r2).mean())}


def object_motion(flow: np.ndarray) -> dict[str, float]:
    """Mean flow (u, v) of the 10 % fastest pixels of each frame pair: the moving object, not the still
    background."""
    mag = np.hypot(flow[..., 0], flow[..., 1]).reshape(len(flow), -1)
    fast = mag >= np.quantile(mag, 0.9, axis=1, keepdims=True)
    vec = flow.reshape(len(flow), -1, 2)[fast]
    return {"u": float(vec[:, 0].mean()), "v": float(vec[:, 1].mean())}


# what a camera motion does to the picture (image y down): pan left -> picture moves right, tilt up -> it moves
# down, zoom in -> it grows (outward flow), roll clockwise -> it turns counter-clockwise; a pan up-left moves it
# down and right
EXPECTED = {"PanLeft": {"u": 1}, "PanRight": {"u": -1}, "TiltUp": {"v": 1}, "TiltDown": {"v": -1},
            "ZoomIn": {"div": 1}, "ZoomOut": {"div": -1}, "RollClockwise": {"rot": -1},
            "RollCounterClockwise": {"rot": 1}, "PanUpLeft": {"u": 1, "v": 1}, "PanUpRight": {"u": -1, "v": 1},
            "PanDownLeft": {"u": 1, "v": -1}, "PanDownRight": {"u": -1, "v": -1},
            # an object moving right / up (-y) / ...: the mean flow of the frame points the same way
            **{c: {k: int(np.sign(d)) for k, d in zip("uv", OBJECT_DIRECTION[c]) if abs(d) > 0.5}
               for c in OBJECT_DIRECTION}}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_flow_from_goca_flow_moves_as_the_class_says(quick_bench, family):
    root = quick_bench / "work" / "quick" / family / "prepared"
    records, classes = read_index(root)[:2]
    assert sorted(classes) == sorted(FAMILIES[family].classes) and len(records) == 2 * len(classes)
    for rec in records:
        flow = dequantise_flow(read_flow_frames(root / rec.flow, list(range(rec.frames - 1))))
        m = picture_motion(flow) if family != "textures-object" else object_motion(flow)
        for key, sign in EXPECTED[rec.cls].items():
            assert sign * m[key] > 0, (family, rec.id, m)
        if set(EXPECTED[rec.cls]) in ({"u"}, {"v"}):  # along one axis only, by > 0.3 px per frame
            (key,) = EXPECTED[rec.cls]
            other = m["v" if key == "u" else "u"]
            assert abs(m[key]) > 0.3 and abs(other) < 0.3 * abs(m[key]), (family, rec.id, m)


@pytest.mark.parametrize("family,train,test", [("photos-camera", TRAIN_IMAGES, TEST_IMAGES),
                                               ("rasters-camera", TRAIN_RASTERS, TEST_RASTERS)])
def test_pictures_carry_no_label(tmp_path, family, train, test):
    """With as many videos per class as pictures, every class shows every picture of its split exactly once, and the
    test split's pictures never occur in training."""
    spec = FAMILIES[family].resized(train_per_class=len(train), test_per_class=len(test), frames=2, height=16,
                                    width=16)
    write_family(tmp_path, spec)
    group = re.compile(r"^(\w+)/v_\1_g(\d+)_c\d+\.(mp4|avi)$")
    seen = {}
    for name in ("trainlist01.txt", "testlist01.txt"):
        entries = [line.split()[0] for line in (tmp_path / "ucfTrainTestlist" / name).read_text().splitlines()]
        seen[name] = Counter(group.match(e).groups()[:2] for e in entries)
        assert all((tmp_path / "UCF-101" / e).is_file() for e in entries)
    train_groups = {g for _, g in seen["trainlist01.txt"]}
    test_groups = {g for _, g in seen["testlist01.txt"]}
    assert len(train_groups) == len(train) and len(test_groups) == len(test)
    assert not train_groups & test_groups
    for name, groups in (("trainlist01.txt", train_groups), ("testlist01.txt", test_groups)):
        assert seen[name] == Counter({(c, g): 1 for c in spec.classes for g in groups})


def test_families_differ_in_pictures_motions_sizes_and_codecs():
    specs = list(FAMILIES.values())
    for attr in ("pictures", "classes", "codec", "speed"):
        assert len({str(getattr(s, attr)) for s in specs}) == len(specs), attr
    assert len({(s.height, s.width) for s in specs}) == len(specs)
    assert len({(s.train_per_class * len(s.classes), s.test_per_class * len(s.classes)) for s in specs}) == 3
    assert not set(TRAIN_RASTERS + TEST_RASTERS) & set(TRAIN_IMAGES + TEST_IMAGES)
    # every family's test split holds >= 300 queries (one query <= 0.35 R@1 points)
    assert all(s.test_per_class * len(s.classes) >= 300 for s in specs)


def test_confidence_interval_and_paired_test_against_hand_values():
    # mean 3, sd sqrt(2.5), t(0.975, 4 df) = 2.776445: half width 2.776445 * sqrt(2.5 / 5)
    ci = guidance_bench.mean_ci([1, 2, 3, 4, 5])
    half = 2.776445 * math.sqrt(2.5 / 5)
    assert ci["mean"] == 3 and ci["sd"] == pytest.approx(math.sqrt(2.5), abs=1e-4)
    assert ci["ci95"] == pytest.approx([3 - half, 3 + half], abs=1e-3)
    # differences 2, 3, 2: t = (7/3) / (sqrt(1/3) / sqrt(3)) = 7 on 2 df, whose CDF is 1/2 + t / (2 sqrt(t^2 + 2))
    d = guidance_bench.paired([3, 5, 4], [1, 2, 2])
    assert d["per_seed"] == [2, 3, 2] and d["mean"] == pytest.approx(7 / 3, abs=1e-4)
    assert d["p"] == pytest.approx(1 - 7 / math.sqrt(51), rel=1e-6)
    assert guidance_bench.paired([2, 2], [1, 1])["p"] == 0.0 and guidance_bench.paired([1, 1], [1, 1])["p"] == 1.0


def _run(rgb, flow, fused, random_rgb=None):
    recall = {"rgb": {"1": rgb}, "flow": {"1": flow}, "both": {"1": (rgb + flow) / 2}, "fused": {"1": fused}}
    codes = {role: {"agreement": 50.0, "agreement_by_chance": 12.5, "rgb_flow_nmi": 0.3,
                    "class_nmi": {"rgb": 0.2, "flow": 0.6}} for role in ("train", "test")}
    out = {"recall": recall, "codes": codes, "queries": 300, "gallery": 100}
    if random_rgb is not None:
        out["random_init"] = {"rgb": {"1": random_rgb}, "flow": {"1": 90.0}, "both": {"1": 60.0}}
    return out


def test_targets_follow_the_paired_differences():
    seeds = [1, 2, 3]
    # KL beats no prior by 6, 7, 8 and random init by 16, 17, 18; fused equals the better stream (flow)
    runs = {"kl": {s: _run(30 + s, 90, 90, random_rgb=14.0) for s in seeds},
            "none": {s: _run(24, 90, 90) for s in seeds}}
    sm = guidance_bench.family_summary(runs, seeds)
    assert sm["paired"]["kl_minus_none"]["per_seed"] == [7, 8, 9]
    assert sm["targets"] == {"kl_minus_none": {"need": ">= 5 and CI above 0", "met": True},
                             "kl_minus_random": {"need": ">= 15 and CI above 0", "met": True},
                             "fused_minus_better_stream": {"need": ">= 0", "met": True}}
    # a mean above 5 whose interval reaches below 0 does not meet the target; fused below flow does not either
    runs["none"] = {1: _run(10, 90, 90), 2: _run(40, 90, 90), 3: _run(20, 90, 90)}
    runs["kl"][3] = _run(33, 90, 85, random_rgb=14.0)
    sm = guidance_bench.family_summary(runs, seeds)
    assert sm["paired"]["kl_minus_none"]["per_seed"] == [21, -8, 13]  # mean 8.7, sd 15: the CI spans 0
    assert sm["paired"]["kl_minus_none"]["ci95"][0] < 0 and not sm["targets"]["kl_minus_none"]["met"]
    assert not sm["targets"]["fused_minus_better_stream"]["met"]
    assert sm["variants"]["random init"]["rgb"]["mean"] == 14.0 and sm["queries"] == [300]


@pytest.mark.slow
def test_results_hold_every_family_and_variant_with_the_runs_numbers(quick_bench):
    """The result files hold every family and variant with the numbers each run's goca-eval (eval/knn.json,
    eval/codes.json) and, for the random-init row, its pretraining (knn.json) wrote; each run's CPU seconds are its
    own (measured side by side, they still add up to no more than what all children of this process used)."""
    out = json.loads((quick_bench / "results" / "guidance-quick-cpu.json").read_text())
    assert set(out["summary"]) == set(FAMILIES) and out["meta"]["tuned_on"] == "photos-camera"
    cpu = []
    for family in FAMILIES:
        runs_dir = quick_bench / "work" / "quick" / family / "runs"
        summary = out["summary"][family]
        assert set(summary["variants"]) == {"kl", "none", "random init"}
        for variant in ("kl", "none"):
            evaluated = json.loads((runs_dir / f"{variant}-s{SEED}" / "eval" / "knn.json").read_text())["recall"]
            for stream in ("rgb", "flow", "both", "fused"):
                assert summary["variants"][variant][stream]["mean"] == pytest.approx(evaluated[stream]["1"],
                                                                                     abs=1e-3)
            codes = json.loads((runs_dir / f"{variant}-s{SEED}" / "eval" / "codes.json").read_text())
            assert summary["codes"][variant]["test_agreement"]["mean"] == pytest.approx(codes["test"]["agreement"])
            cpu.append(out["runs"][family][variant][str(SEED)]["cpu_s"])
        own = json.loads((runs_dir / f"kl-s{SEED}" / "knn.json").read_text())["knn"]["random init"]
        assert summary["variants"]["random init"]["rgb"]["mean"] == pytest.approx(own["rgb"]["1"], abs=1e-3)
        kl, none = (summary["variants"][v]["rgb"]["mean"] for v in ("kl", "none"))
        assert summary["paired"]["kl_minus_none"]["per_seed"] == [pytest.approx(kl - none, abs=0.01)]
        assert summary["queries"] == [len(FAMILIES[family].classes)]
        # the supervised probe: what goca-eval finetune wrote for the KL run's RGB network
        tuned = json.loads((runs_dir / f"kl-s{SEED}" / "eval" / "probe" / "finetune.json").read_text())
        probe = out["supervised_probe"][family][str(SEED)]
        assert probe["top1"] == pytest.approx(tuned["accuracy"]["rgb"]["top1"]) and "flow" not in tuned["accuracy"]
        assert probe["classes"] == len(FAMILIES[family].classes) and probe["cpu_s"] > 1.0
    assert all(c > 1.0 for c in cpu)  # a python process that imports torch and trains costs more than 1 CPU s
    assert sum(cpu) <= float((quick_bench / "children_cpu_s").read_text()) + 0.5
    md = (quick_bench / "results" / "guidance-quick-cpu.md").read_text()
    assert md.startswith("# guidance-quick") and "## textures-object (untouched" in md
    assert "## Supervised probe" in md and md.count(f"| {SEED} |") == len(FAMILIES)
    assert (quick_bench / "results" / "guidance-quick-cpu.png").stat().st_size > 1000
