"""DALI evaluation loader: every video exactly once, `num_clips` uniformly spaced clips × `crops` fixed crops,
deterministic; yields the CPU loader's `EvalBatch` (N×V×C×T×h×w, V clip-major), so feature extraction, kNN,
linear probe and fine-tune evaluation run on either loader.

Views follow `goca_fast.data.augment.eval_crops`: short side resized to `short_side`, crops at left/centre/right
(top/centre/bottom for portrait video), ImageNet normalisation for RGB, px/20 for flow.
"""
from __future__ import annotations

import math
import os
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types

from dali_pipelines import graph
from dali_pipelines.source import EvalSource, video_metas
from dali_pipelines.train import device_index, source_dtypes, to_torch
from goca_fast.data.cpu_loader import EvalBatch
from goca_fast.data.index import VideoRecord


@pipeline_def
def eval_pipeline(source: EvalSource, num_clips: int, num_crops: int, crop: int, with_flow: bool,
                  official_flow: bool, out_dtype, gpu: bool):
    """Outputs: meta (N×5 int64: label, index, valid, padded_short, batch padding), RGB views, then flow views (clip-major)."""
    per_clip = [types.INT32] * (2 if with_flow else 1)
    dtypes = source_dtypes(num_clips, with_flow, per_clip) + [types.FLOAT] * num_crops + [types.FLOAT]
    outs = list(fn.external_source(source=source, num_outputs=len(dtypes), batch=False, dtype=dtypes))
    rgb_frames = graph.decode(outs.pop(0), gpu)
    flow_frames = graph.decode(outs.pop(0), gpu) if with_flow else None
    meta = outs.pop(0)
    orders = [[outs.pop(0) for _ in range(2 if with_flow else 1)] for _ in range(num_clips)]
    anchors = [outs.pop(0) for _ in range(num_crops)]
    size = outs.pop(0)
    rgb, flow = [], []
    for c in range(num_clips):
        x = graph.eval_resize(graph.take_frames(rgb_frames, orders[c][0]), size)
        rgb += [graph.eval_view(x, a, crop, False, out_dtype) for a in anchors]
        if with_flow:
            uv = graph.flow_planes(graph.take_frames(flow_frames, orders[c][1]))
            if official_flow:
                f = graph.eval_resize(graph.official_flow_image(uv), size)
            else:
                f = graph.eval_resize(uv, size, dtype=types.FLOAT)
            flow += [graph.eval_view(f, a, crop, not official_flow, out_dtype) for a in anchors]
    return (meta, *rgb, *flow)


class DaliEvalLoader:
    """Iterable of EvalBatch over one split (this rank's share), padding of the last batch removed."""

    def __init__(self, root: str | os.PathLike, records: Sequence[VideoRecord], clip_length: int, stride: int,
                 num_clips: int, crop_size: int, short_side: int, with_flow: bool, crops: int = 3,
                 flow_mode: str = "shared", batch_size: int = 8, workers: int = 2,
                 device: Optional[torch.device] = None, rank: int = 0, world_size: int = 1):
        from dali_pipelines.validate import validate_for_dali

        self.device = device or torch.device("cpu")
        gpu = self.device.type == "cuda"
        good, _ = validate_for_dali(root, records, with_flow, workers=max(1, workers))
        good_ids = {r.id for r in good}
        excluded = [i for i, r in enumerate(records) if r.id not in good_ids]
        self.source = EvalSource(video_metas(root, records), clip_length, stride, num_clips, crops, crop_size,
                                 short_side, with_flow, rank, world_size, excluded)
        self.num_views = num_clips * len(self.source.positions)
        self.with_flow, self.batch_size = with_flow, int(batch_size)
        self.batches = math.ceil(len(self.source) / self.batch_size)
        self.pipe = eval_pipeline(self.source, num_clips, len(self.source.positions), crop_size, with_flow,
                                  flow_mode == "official", types.FLOAT, gpu, batch_size=self.batch_size,
                                  num_threads=max(1, workers), device_id=device_index(self.device),
                                  prefetch_queue_depth=2)
        self._built = False

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[Optional[EvalBatch]]:
        if not self._built:
            self.pipe.build()
            self._built = True
        elif self.batches:
            raise RuntimeError("a DaliEvalLoader is iterated once; build a new one for another pass")
        v = self.num_views
        for _ in range(self.batches):
            outs = self.pipe.run()
            meta = torch.from_numpy(np.array(outs[0].as_tensor())).reshape(-1, 5)
            keep = meta[:, 2].bool()
            skipped = int(((~keep) & (meta[:, 4] == 0)).sum())  # failed videos; padding rows are not failures
            views = [to_torch(o, self.device) for o in outs[1:]]
            rgb = torch.stack(views[:v], dim=1)
            flow = torch.stack(views[v:], dim=1) if self.with_flow else None
            if not keep.all():
                sel = keep.nonzero().flatten().to(rgb.device)
                rgb, meta = rgb[sel], meta[keep]
                flow = flow[sel] if flow is not None else None
            if meta.shape[0] == 0:
                yield None
                continue
            yield EvalBatch(rgb=rgb, flow=flow, label=meta[:, 0], index=meta[:, 1], padded=meta[:, 3].bool(),
                            skipped=skipped)
