"""`goca-eval codes`: which prototype each stream gives held-out clips, and how well the RGB network predicts the
flow network's codes there: the diagnostic of the guidance.

The prior trains the RGB stream to reproduce the flow stream's assignment. Whether that transfers is a question about
videos the networks never trained on: if the RGB codes of test clips match their flow codes, the RGB network has
learned what the flow clusters mean (motion); if they match only on training videos, it has memorised them. Per
view (clip × crop) a stream's code is the prototype nearest its head embedding (the prototypes are shared by both
streams, so the codes are comparable). Per split it reports

    agreement         % of views whose RGB code is their flow code (chance for unrelated codes: sum_k p_k q_k)
    rgb_flow_nmi      normalised mutual information between the two streams' codes
    class_nmi         per stream, NMI between its codes and the class labels (1 = the codes are the classes)
    purity            per stream, % of views whose code's most frequent class is their own class
    prototypes_used   per stream, distinct codes

    goca-eval codes RUN_DIR_OR_CHECKPOINT [--clips 3 --crops 1] [--data-root DIR]
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from goca_fast.data.index import read_index
from goca_fast.data.views import ViewOverrides
from goca_fast.eval import EvalError
from goca_fast.eval.cache import FeatureCache, split_features
from goca_fast.eval.features import ExtractSettings
from goca_fast.eval.loading import EvalSetup, default_output_dir
from goca_fast.eval.splits import split_records
from goca_fast.runtime.device import resolve_amp


def _entropy(counts: torch.Tensor) -> float:
    p = counts[counts > 0].double() / counts.sum()
    return float(-(p * p.log()).sum())


def normalized_mutual_information(a: torch.Tensor, b: torch.Tensor) -> float:
    """NMI of two integer labelings of the same items, I(a; b) / mean(H(a), H(b)) (the arithmetic normalisation);
    1.0 when both are constant (nothing to disagree on), 0.0 when only one is."""
    a, b = torch.as_tensor(a).long().flatten(), torch.as_tensor(b).long().flatten()
    if a.numel() != b.numel() or a.numel() == 0:
        raise ValueError(f"need two non-empty labelings of equal length, got {a.numel()} and {b.numel()}")
    _, ai = torch.unique(a, return_inverse=True)
    _, bi = torch.unique(b, return_inverse=True)
    joint = torch.zeros(int(ai.max()) + 1, int(bi.max()) + 1, dtype=torch.float64)
    joint.index_put_((ai, bi), torch.ones_like(ai, dtype=torch.float64), accumulate=True)
    ha, hb = _entropy(joint.sum(1)), _entropy(joint.sum(0))
    if ha == 0.0 and hb == 0.0:
        return 1.0
    if ha == 0.0 or hb == 0.0:
        return 0.0
    mutual = ha + hb - _entropy(joint.flatten())
    return max(0.0, mutual / (0.5 * (ha + hb)))


def purity(codes: torch.Tensor, labels: torch.Tensor) -> float:
    """% of items whose code's most frequent label is their own label."""
    codes, labels = torch.as_tensor(codes).long(), torch.as_tensor(labels).long()
    hits = 0
    for c in torch.unique(codes):
        hits += int(torch.bincount(labels[codes == c]).max())
    return 100.0 * hits / max(1, codes.numel())


def nearest_prototype(embeddings: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Index of the nearest prototype (cosine) of each row of `embeddings` (…×D) → (…) int64."""
    z = F.normalize(embeddings.float(), dim=-1)
    return (z @ F.normalize(prototypes.float(), dim=1).T).argmax(dim=-1)


def code_report(codes: dict[str, torch.Tensor], labels: torch.Tensor) -> dict:
    """The statistics of the module docstring for one split: `codes` stream → views (flat), `labels` per view."""
    labels = torch.as_tensor(labels).long().flatten()
    out: dict = {"views": int(labels.numel()),
                 "class_nmi": {s: round(normalized_mutual_information(c, labels), 4) for s, c in codes.items()},
                 "purity": {s: round(purity(c, labels), 2) for s, c in codes.items()},
                 "prototypes_used": {s: int(torch.unique(c).numel()) for s, c in codes.items()}}
    if "rgb" in codes and "flow" in codes:
        rgb, flow = codes["rgb"].flatten(), codes["flow"].flatten()
        out["agreement"] = round(100.0 * float((rgb == flow).double().mean()), 2)
        k = int(max(rgb.max(), flow.max())) + 1
        p = torch.bincount(rgb, minlength=k).double() / rgb.numel()
        q = torch.bincount(flow, minlength=k).double() / flow.numel()
        out["agreement_by_chance"] = round(100.0 * float((p * q).sum()), 2)
        out["rgb_flow_nmi"] = round(normalized_mutual_information(rgb, flow), 4)
    return out


@dataclass(frozen=True)
class CodesOptions:
    """`goca-eval codes`' own knobs."""

    overrides: ViewOverrides = ViewOverrides()   # --clips/--crops/--clip-length/--stride
    amp: str = "off"


def run_codes(setup: EvalSetup, options: Optional[CodesOptions] = None, *, out_dir: Optional[str] = None,
              use_cache: bool = True, quiet: bool = False) -> dict:
    """`goca-eval codes`: per-view codes of the train and test splits from the head embeddings, the statistics of
    both splits, printed and written to codes.json."""
    t0 = time.time()
    o = options or CodesOptions()
    loaded, root = setup.loaded, setup.root
    if not loaded.has_heads:
        raise EvalError(f"{loaded.checkpoint} holds no projection heads and prototypes (a fine-tuned backbone?): "
                        f"codes need a pretraining checkpoint")
    spec = setup.views.with_overrides(o.overrides)
    out = Path(out_dir) if out_dir else default_output_dir(loaded.run_dir)
    cache = FeatureCache(out / "features") if use_cache else None
    index = read_index(root)
    extract = ExtractSettings(setup.device, setup.batch_size, setup.workers,
                              amp=resolve_amp(o.amp, setup.device, "--amp"), source="head", keep_views=True)
    prototypes = loaded.model.prototypes.weight.detach().cpu()
    result: dict = {"protocol": {"clips": spec.num_clips, "crops": spec.crops, "clip_length": spec.clip_length,
                                 "stride": spec.stride, "prototypes": int(prototypes.shape[0]),
                                 "checkpoint": str(loaded.checkpoint), "epoch": loaded.epoch,
                                 "dataset": str(root)}}
    for role, split in (("train", setup.train_split), ("test", setup.test_split)):
        feats = split_features(loaded, root, split_records(root, split, loaded.streams, index), spec, extract, cache)
        codes = {s: nearest_prototype(v, prototypes).flatten() for s, v in feats.views.items()}
        views_per_video = next(iter(feats.views.values())).shape[1]
        labels = feats.labels.repeat_interleave(views_per_video)
        result[role] = {"split": split, "videos": int(feats.labels.numel()), **code_report(codes, labels)}
    result["seconds"] = round(time.time() - t0, 2)
    out.mkdir(parents=True, exist_ok=True)
    (out / "codes.json").write_text(json.dumps(result, indent=2))
    if not quiet:
        for role in ("train", "test"):
            r = result[role]
            line = (f"{role} ({r['split']}, {r['videos']} videos, {r['views']} views): class NMI "
                    + ", ".join(f"{s} {v:.3f}" for s, v in r["class_nmi"].items()))
            if "agreement" in r:
                line += (f"; RGB code = flow code on {r['agreement']:.1f} % of views (chance "
                         f"{r['agreement_by_chance']:.1f} %), NMI {r['rgb_flow_nmi']:.3f}")
            print(line)
        print(f"written: {out / 'codes.json'}")
    return result
