"""DALI evaluation loader: every video exactly once, `num_clips` uniformly spaced clips × `crops` fixed crops,
deterministic; yields the CPU loader's `EvalBatch` (N×V×C×T×h×w, V clip-major), so feature extraction, kNN,
linear probe and fine-tune evaluation run on either loader.

Views follow `goca_fast.data.augment.eval_crops`: short side resized to `short_side`, crops at left/centre/right
(top/centre/bottom for portrait video), ImageNet normalisation for RGB, px/20 for flow.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types

from dali_pipelines import graph
from dali_pipelines.source import EvalSource, video_metas
from dali_pipelines.train import error_reason, device_index, source_dtypes, to_torch
from dali_pipelines.validate import validate_for_dali
from goca_fast.data.cpu_loader import EvalBatch, EvalClipDataset, collate_eval
from goca_fast.data.index import VideoRecord
from goca_fast.data.views import ViewSpec

log = logging.getLogger(__name__)


@pipeline_def
def eval_pipeline(source: EvalSource, num_clips: int, num_crops: int, crop: int, with_flow: bool,
                  official_flow: bool, out_dtype, gpu: bool):
    """Outputs: meta (N×4 int64: label, index, valid, padded_short), RGB views, then flow views (clip-major)."""
    dtypes = source_dtypes(num_clips, with_flow, [types.INT32]) + [types.FLOAT] * num_crops + [types.FLOAT]
    outs = list(fn.external_source(source=source, num_outputs=len(dtypes), batch=False, dtype=dtypes))
    rgb_frames, flow_frames = graph.decode_streams(outs, with_flow, gpu)
    meta = outs.pop(0)
    orders = [outs.pop(0) for _ in range(num_clips)]
    anchors = [outs.pop(0) for _ in range(num_crops)]
    size = outs.pop(0)
    rgb, flow = [], []
    for c in range(num_clips):
        x = graph.eval_resize(graph.take_frames(rgb_frames, orders[c]), size)
        rgb += [graph.eval_view(x, a, crop, False, out_dtype) for a in anchors]
        if with_flow:
            uv = graph.flow_planes(graph.take_frames(flow_frames, orders[c]))
            if official_flow:
                f = graph.eval_resize(graph.official_flow_image(uv), size)
            else:
                f = graph.eval_resize(uv, size, dtype=types.FLOAT)
            flow += [graph.eval_view(f, a, crop, not official_flow, out_dtype) for a in anchors]
    return (meta, *rgb, *flow)


class DaliEvalLoader:
    """Iterable of EvalBatch over one split (this rank's share: videos rank, rank + W, ...), once.

    Videos that fail `validate_for_dali` never reach DALI; they are counted in the first batch's `skipped` (the
    feature extractor reports them as unreadable). If DALI fails on a batch (a file broken since the check), that
    batch is decoded by the CPU eval loader, which drops and counts the broken video, and the pipeline is rebuilt
    at the next batch.
    """

    def __init__(self, root: str | os.PathLike, records: Sequence[VideoRecord], views: ViewSpec, with_flow: bool, *,
                 batch_size: int = 8, workers: int = 2, device: Optional[torch.device] = None, rank: int = 0,
                 world_size: int = 1):
        self.device = device or torch.device("cpu")
        good, _ = validate_for_dali(root, records, with_flow, workers=max(1, workers))
        good_ids = {r.id for r in good}
        shard = range(rank, len(records), world_size)
        self.indices = [i for i in shard if records[i].id in good_ids]
        self.excluded = len(shard) - len(self.indices)
        self.metas = video_metas(root, records)
        self.views, self.num_views = views, views.num_clips * (1 if views.crops == 1 else views.crops)
        self.with_flow, self.batch_size, self.workers = with_flow, int(batch_size), int(workers)
        self.official_flow = views.flow_mode == "official"
        self.batches = math.ceil(len(self.indices) / self.batch_size)
        self.cpu = EvalClipDataset(root, records, views, with_flow)
        self._used = False

    def __len__(self) -> int:
        return self.batches

    def _pipeline(self, start: int):
        source = EvalSource(self.metas, self.indices, self.views, self.with_flow, start=start)
        pipe = eval_pipeline(source, self.views.num_clips, len(source.positions), self.views.crop_size,
                             self.with_flow, self.official_flow, types.FLOAT, self.device.type == "cuda",
                             batch_size=self.batch_size, num_threads=max(1, self.workers),
                             device_id=device_index(self.device), prefetch_queue_depth=2)
        pipe.build()
        return pipe

    def _batch(self, outs) -> EvalBatch:
        v = self.num_views
        meta = torch.from_numpy(np.array(outs[0].as_tensor())).reshape(-1, 4)
        keep = meta[:, 2].bool()  # padding rows of the last batch
        views = [to_torch(o, self.device) for o in outs[1:]]
        rgb = torch.stack(views[:v], dim=1)
        flow = torch.stack(views[v:], dim=1) if self.with_flow else None
        if not keep.all():
            sel = keep.nonzero().flatten().to(rgb.device)
            rgb, meta = rgb[sel], meta[keep]
            flow = flow[sel] if flow is not None else None
        return EvalBatch(rgb=rgb, flow=flow, label=meta[:, 0], index=meta[:, 1], padded=meta[:, 3].bool())

    def __iter__(self) -> Iterator[Optional[EvalBatch]]:
        if self._used:
            raise RuntimeError("a DaliEvalLoader is iterated once; build a new one for another pass")
        self._used = True
        pipe = None
        for b in range(self.batches):
            if pipe is None:
                pipe = self._pipeline(b * self.batch_size)
            try:
                batch: Optional[EvalBatch] = self._batch(pipe.run())
            except Exception as e:  # noqa: BLE001 - DALI raises RuntimeError subclasses with backend messages
                pipe = None
                log.warning("DALI failed on eval batch %d (%s); this batch is decoded by the CPU loader", b,
                            error_reason(e))
                ids = self.indices[b * self.batch_size:(b + 1) * self.batch_size]
                batch = collate_eval([self.cpu[i] for i in ids])
                if batch is not None:
                    batch.rgb = batch.rgb.to(self.device)
                    batch.flow = batch.flow.to(self.device) if batch.flow is not None else None
            if b == 0 and batch is not None:
                batch.skipped += self.excluded
            yield batch
