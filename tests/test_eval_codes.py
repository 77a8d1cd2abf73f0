"""`goca-eval codes`: the code statistics against hand-computed cases, and the command against a recomputation
from the head embeddings it cached."""
import json
import math
from collections import Counter

import numpy as np
import pytest
import torch

from goca_fast.cli.eval import main as cli_main
from goca_fast.eval.codes import code_report, nearest_prototype, normalized_mutual_information, purity, run_codes
from goca_fast.plan.evaluation import load_eval_model
from helpers import one_torch_thread  # noqa: F401 (autouse fixture)
from helpers import cached_features, make_run, run_eval, tiny_run


def nmi_by_definition(a, b) -> float:
    """I(a; b) / mean(H(a), H(b)) from the joint and marginal frequencies, python floats."""
    n = len(a)
    pa, pb, pab = Counter(a), Counter(b), Counter(zip(a, b))
    mutual = sum(c / n * math.log((c / n) / (pa[x] / n * pb[y] / n)) for (x, y), c in pab.items())
    ha = -sum(c / n * math.log(c / n) for c in pa.values())
    hb = -sum(c / n * math.log(c / n) for c in pb.values())
    return mutual / (0.5 * (ha + hb))


def test_nmi_of_hand_made_labelings():
    # the same partition under other names: 1; a balanced independent one: 0
    assert normalized_mutual_information(torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([5, 5, 3, 3, 9, 9])) == \
        pytest.approx(1.0)
    assert normalized_mutual_information(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])) == \
        pytest.approx(0.0, abs=1e-12)
    # a partial overlap: H(a) = ln 2, H(b) = H(1/3, 2/3), I = ln 2 + H(b) − H(joint) with joint (2, 1, 3)/6
    a, b = [0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1]
    ha, hb = math.log(2), -(1 / 3 * math.log(1 / 3) + 2 / 3 * math.log(2 / 3))
    hj = -(2 / 6 * math.log(2 / 6) + 1 / 6 * math.log(1 / 6) + 3 / 6 * math.log(3 / 6))
    want = (ha + hb - hj) / (0.5 * (ha + hb))
    assert normalized_mutual_information(torch.tensor(a), torch.tensor(b)) == pytest.approx(want, rel=1e-12)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 5, 300).tolist(), rng.integers(0, 3, 300).tolist()
    y = [v if i % 3 else u for i, (u, v) in enumerate(zip(x, y))]  # partly dependent
    assert normalized_mutual_information(torch.tensor(x), torch.tensor(y)) == pytest.approx(nmi_by_definition(x, y),
                                                                                            rel=1e-9)
    assert normalized_mutual_information(torch.zeros(4), torch.zeros(4)) == 1.0
    assert normalized_mutual_information(torch.zeros(4), torch.tensor([0, 1, 0, 1])) == 0.0
    with pytest.raises(ValueError, match="equal length"):
        normalized_mutual_information(torch.zeros(3), torch.zeros(4))


def test_purity_agreement_and_chance_of_hand_made_codes():
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    # code 4 holds labels 0, 0, 1 (majority 2 of 3), code 7 holds 0, 1, 1 (2 of 3): 4 of 6
    assert purity(torch.tensor([4, 4, 7, 4, 7, 7]), labels) == pytest.approx(100 * 4 / 6)
    rgb, flow = torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 1, 1, 1, 2, 0])
    r = code_report({"rgb": rgb, "flow": flow}, labels)
    assert r["agreement"] == pytest.approx(100 * 4 / 6, abs=0.01)
    # chance: p = (1/3, 1/3, 1/3) for rgb, q = (2/6, 3/6, 1/6) for flow: sum p q = 1/3
    assert r["agreement_by_chance"] == pytest.approx(100 / 3, abs=0.01)
    assert r["prototypes_used"] == {"rgb": 3, "flow": 3} and r["views"] == 6
    assert r["class_nmi"]["rgb"] == pytest.approx(nmi_by_definition(rgb.tolist(), labels.tolist()), abs=1e-4)


def test_nearest_prototype_is_the_largest_cosine():
    protos = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]])
    z = torch.tensor([[3.0, 0.1], [0.2, 0.1], [0.1, 5.0], [-2.0, -1.5]])
    # cosines to the unit prototypes: (0.2, 0.1) is nearer (1, 0) by angle although (0, 2) is longer
    assert nearest_prototype(z, protos).tolist() == [0, 0, 1, 2]


@pytest.mark.slow
def test_codes_command_matches_a_recomputation_from_its_head_embeddings(tmp_path, capsys):
    """The tiny random-init run: every reported number recomputed from the head views the command cached, with the
    checkpoint's prototypes, python-side."""
    res = run_eval(run_codes, tiny_run(), out_dir=str(tmp_path), use_cache=True)
    loaded, _ = load_eval_model(str(tiny_run()), device=torch.device("cpu"))
    protos = loaded.model.prototypes.weight.detach().double().numpy()
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    for role, split in (("train", "train"), ("test", "test")):
        meta, _, views = cached_features(tmp_path / "features", split)
        v = next(iter(views.values())).shape[1]
        labels = [y for y in meta["labels"] for _ in range(v)]
        codes = {s: [int(np.argmax(protos @ x)) for x in views[s].astype(np.float64).reshape(-1, views[s].shape[-1])]
                 for s in ("rgb", "flow")}
        got = res[role]
        assert got["views"] == len(labels) == res[role]["videos"] * v
        assert got["agreement"] == pytest.approx(100 * np.mean(np.equal(codes["rgb"], codes["flow"])), abs=0.01)
        for s in ("rgb", "flow"):
            if len(set(codes[s])) > 1:
                assert got["class_nmi"][s] == pytest.approx(nmi_by_definition(codes[s], labels), abs=1e-4)
            assert got["prototypes_used"][s] == len(set(codes[s]))
    assert json.loads((tmp_path / "codes.json").read_text())["test"] == res["test"]
    # the command line: same file, exit 0; a backbone-only checkpoint is a one-line error
    assert cli_main(["codes", str(tiny_run()), "--out", str(tmp_path / "cli"), "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "cli" / "codes.json").read_text())["test"] == res["test"]
    out = capsys.readouterr().out
    assert "RGB code = flow code on" in out


def test_codes_of_a_checkpoint_without_heads_is_a_clear_error(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    ckpt = run / "checkpoints" / "latest.pth"
    state = torch.load(ckpt, weights_only=False)
    state["model"] = {k: v for k, v in state["model"].items() if not k.startswith(("heads.", "prototypes."))}
    torch.save(state, ckpt)
    assert cli_main(["codes", str(run), "--device", "cpu", "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("goca-eval: error:") and "head" in err[0], err
