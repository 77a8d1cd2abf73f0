"""goca-prototypes: separation beats random prototypes by a margin; the file is what the trainer loads."""
import numpy as np
import pytest

from goca_fast.models.heads import load_prototypes, max_cosine
from goca_fast.cli.prototypes import main
from goca_fast.method.prototypes import hyperspherical_prototypes, nearest_neighbour_angles, random_prototypes


def test_separation_beats_random_by_a_margin():
    p = hyperspherical_prototypes(200, 16, steps=400, seed=1)
    assert p.shape == (200, 16) and p.dtype == np.float32
    assert np.allclose(np.linalg.norm(p, axis=1), 1, atol=1e-5)
    ours, rand = nearest_neighbour_angles(p), nearest_neighbour_angles(random_prototypes(200, 16, 1))
    assert ours.min() > rand.max()                 # every prototype beats the best random one
    assert ours.min() > rand.min() + 15            # and the worst case improves by a wide margin (degrees)


def test_nearest_neighbour_angles_and_loss_known_cases():
    sq = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]], dtype=np.float32)  # a square: all 90 degrees
    assert np.allclose(nearest_neighbour_angles(sq), 90)
    import torch
    assert max_cosine(torch.tensor(sq)).item() == pytest.approx(0.0, abs=1e-6)
    simplex = hyperspherical_prototypes(3, 2, steps=300, seed=0)  # 3 points on a circle: 120 degrees apart
    assert np.allclose(nearest_neighbour_angles(simplex), 120, atol=2.0)


def test_cli_writes_npy_png_and_trainer_loads_it(tmp_path, capsys):
    out = tmp_path / "p" / "prototypes.npy"
    assert main(["--num", "50", "--dim", "8", "--steps", "200", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "nearest-neighbour angle (deg) min" in text and "random: min" in text
    arr = load_prototypes(str(out))
    assert arr.shape == (50, 8)
    png = out.with_suffix(".png")
    import cv2
    assert cv2.imread(str(png)) is not None
    with pytest.raises(SystemExit) as e:
        main(["--num", "1"])
    assert e.value.code == 2 and "goca-prototypes: error" in capsys.readouterr().err
