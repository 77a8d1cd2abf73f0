"""Which videos an evaluation uses: the usable records of a split (missing
files counted, never silently dropped), and the checks that keep queries out of their gallery."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from goca_fast.data.index import VideoRecord, read_index, select_split
from goca_fast.data.views import plural
from goca_fast.eval import EvalError

log = logging.getLogger("goca_fast.eval")


@dataclass
class SplitRecords:
    """The usable videos of one split, and the ones left out because their files are missing."""

    name: str
    records: list[VideoRecord]
    total: int
    missing: list[str]
    classes: list[str]


DatasetIndex = tuple[Sequence[VideoRecord], Sequence[str]]   # (records, class names), as read_index returns them


def split_records(root: Path, split: str, streams: Sequence[str],
                  index: Optional[DatasetIndex] = None) -> SplitRecords:
    """Records of `split` whose RGB (and flow, when a flow stream is evaluated) files exist.

    index: the dataset index already read (`read_index(root)`), so a caller evaluating several splits reads it once.
    Errors: unknown or empty split, or a split none of whose videos exist. Missing files are warned about (count and
    the first ids) and counted; they never silently shrink the evaluation.
    """
    records, classes = index if index is not None else read_index(root)
    chosen = select_split(records, split)
    need_flow = "flow" in streams
    ok, missing = [], []
    for r in chosen:
        files = [r.rgb] + ([r.flow] if need_flow and r.flow is not None else [])
        if (need_flow and r.flow is None) or not all(os.path.isfile(os.path.join(root, f)) for f in files):
            missing.append(r.id)
        else:
            ok.append(r)
    if missing:
        what = "RGB or flow" if need_flow else "RGB"
        msg = (f"split {split!r}: {len(missing)} of {plural(len(chosen), 'video')} "
               f"{'has' if len(missing) == 1 else 'have'} missing {what} files "
               f"(e.g. {', '.join(missing[:3])}); they are left out and counted")
        if not ok:
            hint = " (no flow extracted? run goca-flow, or evaluate --streams rgb)" if need_flow else ""
            raise EvalError(f"split {split!r} of {root}: none of its {plural(len(chosen), 'video')} has its "
                              f"files{hint}")
        log.warning(msg)
    return SplitRecords(split, ok, len(chosen), missing, list(classes))


def check_disjoint(first: str, first_ids: Sequence[str], second: str, second_ids: Sequence[str],
                   roles: tuple[str, str] = ("gallery", "query")) -> None:
    """Refuse to evaluate on training videos: a query that is also in the gallery retrieves itself (R@1 100 %),
    and a probe tested on what it was fitted on measures memory, not features."""
    shared = set(first_ids) & set(second_ids)
    if shared:
        same = ", the same split" if first == second else ""
        raise EvalError(f"{roles[0]} split {first!r} and {roles[1]} split {second!r} share {len(shared)} of "
                        f"{plural(len(set(second_ids)), 'video')}{same} (e.g. {', '.join(sorted(shared)[:3])}): "
                        f"every such video would be matched with itself; choose disjoint splits")


def check_disjoint_records(first: SplitRecords, second: SplitRecords,
                           roles: tuple[str, str] = ("gallery", "query")) -> None:
    check_disjoint(first.name, [r.id for r in first.records], second.name, [r.id for r in second.records], roles)


def class_check(gallery: Sequence[int], query: Sequence[int], classes: Sequence[str], gallery_split: str,
                query_split: str) -> list[str]:
    """Warnings about classes present in one split but not the other (an error when they share none)."""
    g, q = set(int(x) for x in gallery), set(int(x) for x in query)
    if not g & q:
        raise EvalError(f"splits {gallery_split!r} and {query_split!r} share no class: mismatched class lists "
                        f"(wrong split names or a different dataset?)")
    out = []
    only_q = sorted(q - g)
    if only_q:
        names = ", ".join(classes[i] if i < len(classes) else str(i) for i in only_q[:5])
        out.append(f"{len(only_q)} classes of {query_split!r} never occur in {gallery_split!r} ({names}"
                   f"{', ...' if len(only_q) > 5 else ''}); their videos can never be matched")
    only_g = sorted(g - q)
    if only_g:
        out.append(f"{len(only_g)} classes of {gallery_split!r} have no video in {query_split!r}")
    for w in out:
        log.warning(w)
    return out
