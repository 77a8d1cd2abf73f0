"""Source datasets as distributed: UCF101, HMDB51, Kinetics-400/600/700 and plain class-folder trees.

Each scanner turns a raw tree plus its official split files into `SourceVideo`s (absolute path,
class, split membership) and a list of problems (names a split file lists that do not exist,
inconsistent labels, ...). Parsing is pure (text -> entries) and separate from the file system
walk, so the split-file formats are tested on strings.

Split names in the index: UCF101/HMDB51 "train1", "test1", ..., "train3", "test3"; Kinetics
"train", "val", "test"; class-folder trees "all", or the split folder names (train/val/test).
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
import re
from collections import Counter, defaultdict
from typing import Iterable, Optional

from goca_fast.prepare.sources import (SPLIT_DIR_NAMES, FileFinder, SourceDataset, SourceVideo, SplitFileError,
                                    find_dir_matching, find_dir_with, lines, read_text, safe_name, unique_ids,
                                    walk_videos)

# ----------------------------------------------------------------------------- UCF101


def parse_ucf_class_ind(text: str) -> list[str]:
    """classInd.txt ("1 ApplyEyeMakeup" per line) -> class names in label order (label = index)."""
    entries = []
    for ln in lines(text):
        parts = ln.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise SplitFileError(f"classInd.txt: bad line {ln!r} (expected '<index> <ClassName>')")
        entries.append((int(parts[0]), parts[1]))
    if not entries:
        raise SplitFileError("classInd.txt: no classes")
    entries.sort()
    if [i for i, _ in entries] != list(range(1, len(entries) + 1)):
        raise SplitFileError("classInd.txt: indices are not 1..N")
    return [c for _, c in entries]


def parse_ucf_list(text: str) -> list[tuple[str, Optional[int]]]:
    """trainlist0N.txt ("Class/v_Class_g08_c01.avi 1") or testlist0N.txt (no label) -> (rel path, 1-based label)."""
    out = []
    for ln in lines(text):
        parts = ln.split()
        label = int(parts[1]) if len(parts) > 1 and parts[1].lstrip("-").isdigit() else None
        out.append((parts[0].replace("\\", "/"), label))
    return out


def scan_ucf101(root: str, split_dir: Optional[str] = None, splits: Iterable[int] = (1, 2, 3)) -> SourceDataset:
    """UCF101: `root/<Class>/v_*.avi` plus ucfTrainTestlist (classInd.txt, trainlist0N, testlist0N)."""
    split_dir = split_dir or find_dir_with(root, "classInd.txt")
    classes = parse_ucf_class_ind(read_text(os.path.join(split_dir, "classInd.txt")))
    cls_index = {c.lower(): i for i, c in enumerate(classes)}
    finder = FileFinder(root)
    videos: dict[str, SourceVideo] = {}
    problems: list[dict] = []
    found_any = False
    for k in splits:
        for kind in ("train", "test"):
            fname = f"{kind}list{k:02d}.txt"
            path = os.path.join(split_dir, fname)
            if not os.path.isfile(path):
                problems.append({"id": None, "path": path, "reason": f"missing split file: {fname}"})
                continue
            found_any = True
            for rel, label in parse_ucf_list(read_text(path)):
                vid = os.path.splitext(os.path.basename(rel))[0]
                cls_name = rel.split("/")[0] if "/" in rel else None
                ci = cls_index.get(cls_name.lower()) if cls_name else None
                if ci is None:
                    problems.append({"id": vid, "path": rel, "reason": f"bad split entry: {fname}: class {cls_name!r} not in classInd.txt"})
                    continue
                if label is not None and label - 1 != ci:
                    problems.append({"id": vid, "path": rel, "reason": f"bad split entry: {fname}: label {label} but class "
                                     f"{classes[ci]!r} is {ci + 1} in classInd.txt"})
                    continue
                v = videos.get(rel.lower())
                if v is None:
                    src = finder.find(rel)
                    if src is None:
                        problems.append({"id": vid, "path": rel, "reason": f"not found: listed in {fname}"})
                        videos[rel.lower()] = v = SourceVideo(vid, "", classes[ci])  # remember: no repeat report
                    else:
                        videos[rel.lower()] = v = SourceVideo(vid, src, classes[ci])
                v.splits.append(f"{kind}{k}")
    if not found_any:
        raise SplitFileError(f"no trainlist0N.txt/testlist0N.txt in {split_dir}")
    return SourceDataset([v for v in videos.values() if v.path], classes, problems)


# ----------------------------------------------------------------------------- HMDB51

_HMDB_SPLIT = re.compile(r"^(?P<cls>.+)_test_split(?P<k>\d+)\.txt$")


def parse_hmdb_split(text: str) -> list[tuple[str, int]]:
    """`<class>_test_splitN.txt` lines "<video>.avi <tag>" (1 train, 2 test, 0 unused) -> (name, tag)."""
    out = []
    for ln in lines(text):
        parts = ln.split()
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise SplitFileError(f"bad HMDB split line {ln!r} (expected '<video>.avi <0|1|2>')")
        out.append((parts[0], int(parts[1])))
    return out


def scan_hmdb51(root: str, split_dir: Optional[str] = None, splits: Iterable[int] = (1, 2, 3)) -> SourceDataset:
    """HMDB51: `root/<class>/<video>.avi` plus testTrainMulti_7030_splits/<class>_test_split<k>.txt."""
    split_dir = split_dir or find_dir_matching(root, _HMDB_SPLIT)
    wanted = set(splits)
    files: dict[str, dict[int, str]] = defaultdict(dict)
    for name in sorted(os.listdir(split_dir)):
        m = _HMDB_SPLIT.match(name)
        if m and int(m["k"]) in wanted:
            files[m["cls"]][int(m["k"])] = os.path.join(split_dir, name)
    if not files:
        raise SplitFileError(f"no <class>_test_split<k>.txt files in {split_dir}")
    classes = sorted(files)
    finder = FileFinder(root)
    videos: dict[tuple[str, str], SourceVideo] = {}
    problems: list[dict] = []
    for cls in classes:
        for k in sorted(wanted):
            path = files[cls].get(k)
            if path is None:
                problems.append({"id": None, "path": os.path.join(split_dir, f"{cls}_test_split{k}.txt"),
                                 "reason": f"missing split file: class {cls!r} split {k}"})
                continue
            for name, tag in parse_hmdb_split(read_text(path)):
                key = (cls, name)
                v = videos.get(key)
                if v is None:
                    src = finder.find(f"{cls}/{name}")
                    vid = os.path.splitext(name)[0]
                    if src is None:
                        problems.append({"id": vid, "path": f"{cls}/{name}",
                                         "reason": f"not found: listed in {os.path.basename(path)}"})
                    videos[key] = v = SourceVideo(vid, src or "", cls)
                if tag:
                    v.splits.append(f"{'train' if tag == 1 else 'test'}{k}")
    out = []
    for v in videos.values():
        if not v.path:
            continue
        if not v.splits:
            problems.append({"id": v.id, "path": v.path, "reason": "unused: tagged 0 in every split"})
            continue
        out.append(v)
    return SourceDataset(out, classes, problems)


# ----------------------------------------------------------------------------- Kinetics-400

def k400_file_stem(youtube_id: str, start: float, end: float) -> str:
    """The public tarballs name clips <youtube_id>_<start:06d>_<end:06d>.mp4."""
    return f"{youtube_id}_{int(round(float(start))):06d}_{int(round(float(end))):06d}"


def parse_k400_csv(text: str, default_split: Optional[str] = None) -> list[tuple[str, Optional[str], str]]:
    """Annotation CSV (label,youtube_id,time_start,time_end,split[,is_cc]) -> (file stem, label|None, split).

    The label column may be missing (old unlabelled test CSV): label None.
    """
    reader = csv.DictReader(io.StringIO(text.lstrip("\ufeff")))
    cols = set(reader.fieldnames or [])
    need = {"youtube_id", "time_start", "time_end"}
    if not need <= cols:
        raise SplitFileError(f"Kinetics CSV lacks columns {sorted(need - cols)} (has {sorted(cols)})")
    out = []
    for row in reader:
        split = (row.get("split") or default_split or "").strip().lower()
        split = SPLIT_DIR_NAMES.get(split, split)
        label = (row.get("label") or "").strip() or None
        out.append((k400_file_stem(row["youtube_id"].strip(), row["time_start"], row["time_end"]), label, split))
    return out


def scan_kinetics(root: str, annotation_dir: Optional[str] = None) -> SourceDataset:
    """Kinetics-400/600/700: annotation CSVs (train/val(validate)/test.csv) + clips anywhere under root.

    Clips are found by file name, so both the flat tarball layout and class folders (made by
    scripts/download_k400.sh) work. Classes are the sorted labels of all labelled rows.
    """
    annotation_dir = annotation_dir or find_dir_with(root, "train.csv", "val.csv", "validate.csv", "test.csv")
    csvs = []
    for name in ("train.csv", "val.csv", "validate.csv", "test.csv"):
        p = os.path.join(annotation_dir, name)
        if os.path.isfile(p):
            csvs.append((p, SPLIT_DIR_NAMES[name[:-4]]))
    if not csvs:
        raise SplitFileError(f"no train.csv/val.csv/test.csv in {annotation_dir}")
    by_stem: dict[str, list[str]] = defaultdict(list)
    for p in walk_videos(root):
        by_stem[os.path.splitext(os.path.basename(p))[0]].append(p)
    rows = []
    for path, split in csvs:
        for stem, label, sp in parse_k400_csv(read_text(path), default_split=split):
            rows.append((stem, label, sp or split, os.path.basename(path)))
    classes = sorted({label for _, label, _, _ in rows if label is not None})
    videos: dict[str, SourceVideo] = {}
    problems: list[dict] = []
    for stem, label, split, fname in rows:
        if label is None:
            problems.append({"id": stem, "path": None, "reason": f"no label: {fname}"})
            continue
        v = videos.get(stem)
        if v is not None:
            if v.cls != label:
                problems.append({"id": stem, "path": v.path, "reason": f"conflicting labels: {fname}: {v.cls!r} and {label!r}"})
            elif split not in v.splits:
                v.splits.append(split)
            continue
        paths = by_stem.get(stem)
        if not paths:
            problems.append({"id": stem, "path": None, "reason": f"not found: listed in {fname}"})
            continue
        videos[stem] = SourceVideo(stem, paths[0], label, [split])
    return SourceDataset(list(videos.values()), classes, problems)


# ----------------------------------------------------------------------------- class folders


def scan_folders(root: str) -> SourceDataset:
    """`root/<class>/<videos>` (split "all") or `root/<split>/<class>/<videos>` (split = folder name)."""
    subdirs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if not subdirs:
        raise SplitFileError(f"{root} has no class folders")
    if all(d.lower() in SPLIT_DIR_NAMES for d in subdirs):
        return _scan_split_folders(root)
    videos: dict[str, SourceVideo] = {}
    classes: set[str] = set()
    for cls in subdirs:
        cdir = os.path.join(root, cls)
        classes.add(cls)
        for p in walk_videos(cdir):
            rel = os.path.relpath(p, cdir)
            videos[p] = SourceVideo(os.path.splitext(rel.replace(os.sep, "__"))[0], p, cls, ["all"])
    return SourceDataset(list(videos.values()), sorted(classes), [])


def _file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha1").hexdigest()


def _scan_split_folders(root: str) -> SourceDataset:
    """`root/<split>/<class>/<videos>`: one video per file, ids unique per dataset.

    Different videos may share a name across splits (`train/a/x.mp4`, `test/a/x.mp4`): a repeated name gets its
    split prefixed (`test__x`, `train__x`); only files with the same content are duplicates (the first in
    split/class/name order is kept).
    """
    splits = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    found: list[SourceVideo] = []
    classes: set[str] = set()
    for sd in splits:
        split, base = SPLIT_DIR_NAMES[sd.lower()], os.path.join(root, sd)
        for cls in sorted(os.listdir(base)):
            cdir = os.path.join(base, cls)
            if not os.path.isdir(cdir) or cls.startswith("."):
                continue
            classes.add(cls)
            for p in walk_videos(cdir):
                stem = os.path.splitext(os.path.relpath(p, cdir).replace(os.sep, "__"))[0]
                found.append(SourceVideo(stem, p, cls, [split]))
    by_size: dict[int, list[SourceVideo]] = defaultdict(list)
    for v in found:
        by_size[os.path.getsize(v.path)].append(v)
    first: dict[str, str] = {}
    problems, dup = [], set()
    for group in by_size.values():
        if len(group) < 2:
            continue
        for v in group:  # only files of equal size are read and hashed
            h = _file_digest(v.path)
            if h in first:
                dup.add(v.path)
                problems.append({"id": v.id, "path": v.path, "reason": f"duplicate: same content as {first[h]}; kept that one"})
            else:
                first[h] = v.path
    videos = [v for v in found if v.path not in dup]
    names = Counter((v.cls, v.id) for v in videos)
    for v in videos:
        if names[(v.cls, v.id)] > 1:
            v.id = f"{v.splits[0]}__{v.id}"
    unique_ids(videos)
    return SourceDataset(videos, sorted(classes), problems)


# Kinetics-600 and -700 ship the same CSV columns as Kinetics-400 (classes come from the CSVs)
SCANNERS = {"ucf101": scan_ucf101, "hmdb51": scan_hmdb51, "kinetics400": scan_kinetics, "kinetics600": scan_kinetics,
            "kinetics700": scan_kinetics, "folders": scan_folders}


def scan_dataset(kind: str, root: str, split_dir: Optional[str] = None) -> SourceDataset:
    """Dispatch to the scanner for `kind` (ucf101 | hmdb51 | kinetics400/600/700 | folders)."""
    if not os.path.isdir(root):
        raise SplitFileError(f"source directory {root} does not exist")
    if split_dir is not None and not os.path.isdir(split_dir):
        raise SplitFileError(f"split directory {split_dir} does not exist")
    if kind == "folders":
        ds = scan_folders(root)
    elif kind in SCANNERS:
        ds = SCANNERS[kind](root, split_dir)
    else:
        raise SplitFileError(f"unknown dataset kind {kind!r}; known: {sorted(SCANNERS)}")
    unique_ids(ds.videos)
    return ds


def arrange_kinetics(flat_dir: str, csv_path: str, out_dir: str) -> tuple[int, int]:
    """Move clips of the flat tarball layout into `out_dir/<class>/` using an annotation CSV.

    Returns (moved, not found). Idempotent: clips already in place are left alone. (The official
    buildclassfolder.py does the same from validate.json with hard-coded paths.)
    """
    rows = parse_k400_csv(read_text(csv_path))
    moved = missing = 0
    for stem, label, _ in rows:
        if label is None:
            continue
        dst_dir = os.path.join(out_dir, safe_name(label))
        for ext in (".mp4", ".webm", ".mkv"):
            src = os.path.join(flat_dir, stem + ext)
            if os.path.isfile(src):
                os.makedirs(dst_dir, exist_ok=True)
                os.replace(src, os.path.join(dst_dir, stem + ext))
                moved += 1
                break
        else:
            if not any(os.path.isfile(os.path.join(dst_dir, stem + e)) for e in (".mp4", ".webm", ".mkv")):
                missing += 1
    return moved, missing


if __name__ == "__main__":  # python -m goca_fast.prepare.datasets arrange-k400 FLAT_DIR CSV OUT_DIR
    import sys
    if len(sys.argv) != 5 or sys.argv[1] != "arrange-k400":
        sys.exit("usage: python -m goca_fast.prepare.datasets arrange-k400 FLAT_DIR CSV OUT_DIR")
    m, n = arrange_kinetics(sys.argv[2], sys.argv[3], sys.argv[4])
    print(f"arrange-k400: moved {m} clips into class folders under {sys.argv[4]}; {n} listed clips not found")
