"""The guidance benchmark at CI size: its data generator (real photographs, motion-only classes, UCF101 layout through
goca-prepare and goca-flow) and its script (pretraining runs, results table) must keep working. The ≥ 5 / ≥ 15
point results are in benchmarks/results/guidance-cpu.md, not here."""
import json
import re
import resource
from collections import Counter

import numpy as np
import pytest

pytest.importorskip("skimage")

from benchmarks import guidance_bench  # noqa: E402
from goca_fast.data.index import read_index  # noqa: E402
from goca_fast.video.flow_codec import dequantise_flow, read_flow_frames  # noqa: E402


@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory):
    """One --quick run of the benchmark (data + kl and no-prior pretraining, 1 epoch, the two runs side by side),
    results in a temp folder; also the CPU seconds of every child process this test process waited for."""
    tmp = tmp_path_factory.mktemp("guidance")
    mp = pytest.MonkeyPatch()
    mp.setenv("GOCA_FAST_RESULTS_DIR", str(tmp / "results"))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert guidance_bench.main(["--quick", "--seeds", "3", "--variants", "kl,none", "--jobs", "2",
                                "--work", str(tmp / "work")]) == 0
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


# what a camera motion does to the picture (image y down): pan left -> picture moves right, tilt up -> it moves
# down, zoom in -> it grows (outward flow), roll clockwise -> it turns counter-clockwise
EXPECTED = {"PanLeft": ("u", 1), "PanRight": ("u", -1), "TiltUp": ("v", 1), "TiltDown": ("v", -1),
            "ZoomIn": ("div", 1), "ZoomOut": ("div", -1), "RollClockwise": ("rot", -1),
            "RollCounterClockwise": ("rot", 1)}


@pytest.mark.slow
def test_flow_from_goca_flow_moves_as_the_class_says(quick_bench):
    root = quick_bench / "work" / "quick" / "prepared"
    records, classes = read_index(root)[:2]
    assert sorted(classes) == sorted(EXPECTED) and len(records) == 16
    for rec in records:
        flow = dequantise_flow(read_flow_frames(root / rec.flow, list(range(rec.frames - 1))))
        m = picture_motion(flow)
        key, sign = EXPECTED[rec.cls]
        others = [abs(m[k]) for k in ("u", "v") if k != key]
        assert sign * m[key] > 0, (rec.id, m)
        if key in ("u", "v"):  # a pan or tilt moves the picture along its axis only, by > 0.3 px per frame
            assert abs(m[key]) > 0.3 and max(others) < 0.3 * abs(m[key]), (rec.id, m)


def test_photographs_carry_no_label(tmp_path):
    """With as many videos per class as photographs, every class shows every photograph of its split exactly once,
    and the test split's photographs never occur in training."""
    from benchmarks.guidance_data import CLASSES, TEST_IMAGES, TRAIN_IMAGES, CameraMotionSpec, write_camera_motion_set
    write_camera_motion_set(tmp_path, CameraMotionSpec(train_per_class=len(TRAIN_IMAGES),
                                                       test_per_class=len(TEST_IMAGES), frames=2, height=16, width=16))
    group = re.compile(r"^(\w+)/v_\1_g(\d+)_c\d+\.mp4$")
    seen = {}
    for name in ("trainlist01.txt", "testlist01.txt"):
        entries = [line.split()[0] for line in (tmp_path / "ucfTrainTestlist" / name).read_text().splitlines()]
        seen[name] = Counter(group.match(e).groups() for e in entries)
        assert all((tmp_path / "UCF-101" / e).is_file() for e in entries)
    train_groups = {g for _, g in seen["trainlist01.txt"]}
    test_groups = {g for _, g in seen["testlist01.txt"]}
    assert len(train_groups) == len(TRAIN_IMAGES) and len(test_groups) == len(TEST_IMAGES)
    assert not train_groups & test_groups
    for name, groups in (("trainlist01.txt", train_groups), ("testlist01.txt", test_groups)):
        assert seen[name] == Counter({(c, g): 1 for c in CLASSES for g in groups})


def test_results_table_has_every_variant(quick_bench):
    """The table holds every variant and seed, with the numbers each run's own pretraining (knn.json) and goca-eval
    (eval/knn.json) wrote; each run's CPU seconds are its own (measured side by side, they still add up to no more
    than what all children of this process used)."""
    out = json.loads((quick_bench / "results" / "guidance-quick-cpu.json").read_text())
    variants = [(r["variant"], r["seeds"]) for r in out["rows"]]
    assert variants == [("kl", 1), ("none", 1), ("random init", 1), ("kl", "seed 3"), ("none", "seed 3")]
    runs_dir = quick_bench / "work" / "quick" / "runs"
    rows = {(r["variant"], r["seeds"]): r for r in out["rows"]}
    for variant in ("kl", "none"):
        knn = json.loads((runs_dir / f"{variant}-s3" / "knn.json").read_text())["knn"]
        fused = json.loads((runs_dir / f"{variant}-s3" / "eval" / "knn.json").read_text())["recall"]["fused"]
        for key in ((variant, 1), (variant, "seed 3")):
            assert float(rows[key]["RGB R@1"]) == pytest.approx(knn["GOCA"]["rgb"]["1"], abs=0.05)
            assert float(rows[key]["flow R@1"]) == pytest.approx(knn["GOCA"]["flow"]["1"], abs=0.05)
            assert float(rows[key]["fused R@1"]) == pytest.approx(fused["1"], abs=0.05)
        if variant == "kl":
            assert float(rows[("random init", 1)]["RGB R@1"]) == pytest.approx(knn["random init"]["rgb"]["1"],
                                                                                abs=0.05)
    runs = out["runs"]
    assert set(runs) == {"kl", "none"}
    cpu = [r["3"]["cpu_s"] for r in runs.values()]
    assert all(c > 1.0 for c in cpu)  # a python process that imports torch and trains costs more than 1 CPU s
    assert sum(cpu) <= float((quick_bench / "children_cpu_s").read_text()) + 0.5
    assert (quick_bench / "results" / "guidance-quick-cpu.md").read_text().startswith("# guidance-quick")
