"""What every source-dataset scanner shares: the raw video and dataset records, split-file errors, walking a tree
for videos and resolving the names split files list, and the id and folder-name rules."""
from __future__ import annotations

import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

VIDEO_EXTENSIONS = (".avi", ".mp4", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv",
                    ".3gp", ".ogv", ".ts")
SPLIT_DIR_NAMES = {"train": "train", "val": "val", "validate": "val", "validation": "val", "test": "test"}


class SplitFileError(ValueError):
    """A split/annotation file that cannot be used at all (missing, or no parsable line)."""


@dataclass
class SourceVideo:
    """One raw input video and where it belongs."""
    id: str
    path: str                    # absolute path of the source file
    cls: str
    splits: list[str] = field(default_factory=list)


@dataclass
class SourceDataset:
    videos: list[SourceVideo]
    classes: list[str]
    problems: list[dict]         # {"id", "path", "reason"}: inputs that cannot be used


def lines(text: str) -> list[str]:
    """Non-empty stripped lines; handles CRLF (the UCF101 lists have it) and a UTF-8 BOM."""
    return [ln.strip() for ln in text.lstrip("\ufeff").splitlines() if ln.strip()]


def read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError as e:
        raise SplitFileError(f"cannot read {path}: {e.strerror}") from None


def is_video_file(name: str) -> bool:
    return name.lower().endswith(VIDEO_EXTENSIONS) and not os.path.basename(name).startswith(".")


def walk_videos(root: str) -> list[str]:
    """All video files under root (absolute paths, sorted, hidden/temp files skipped)."""
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        out.extend(os.path.join(d, f) for f in sorted(files) if is_video_file(f))
    return out


class FileFinder:
    """Resolve relative names against a tree: exact path first, then case-insensitive, then by file name."""

    def __init__(self, root: str):
        self.root = root
        self._lower: Optional[dict[str, str]] = None
        self._by_name: Optional[dict[str, list[str]]] = None

    def _build(self) -> None:
        self._lower, self._by_name = {}, defaultdict(list)
        for p in walk_videos(self.root):
            rel = os.path.relpath(p, self.root).replace(os.sep, "/")
            self._lower[rel.lower()] = p
            self._by_name[os.path.basename(p).lower()].append(p)

    def find(self, rel: str) -> Optional[str]:
        exact = os.path.join(self.root, rel)
        if os.path.isfile(exact):
            return exact
        if self._lower is None:
            self._build()
        hit = self._lower.get(rel.replace("\\", "/").lower())
        if hit:
            return hit
        cands = self._by_name.get(os.path.basename(rel).lower(), [])
        return cands[0] if len(cands) == 1 else None



def find_dir_with(root: str, *names: str) -> str:
    """The shallowest directory under root (root first) holding one of `names`."""
    for d, dirs, files in os.walk(root):
        dirs.sort()
        if any(n in files for n in names):
            return d
    raise SplitFileError(f"none of {', '.join(names)} found under {root}; pass the split/annotation directory")


def find_dir_matching(root: str, pattern: "re.Pattern[str]") -> str:
    for d, dirs, files in os.walk(root):
        dirs.sort()
        if any(pattern.match(f) for f in files):
            return d
    raise SplitFileError(f"no file matching {pattern.pattern} under {root}; pass the split directory")


def unique_ids(videos: list[SourceVideo]) -> None:
    """Make ids unique in place: a clash gets the class folder prefixed (`<class>__<stem>`)."""
    counts: dict[str, int] = defaultdict(int)
    for v in videos:
        counts[v.id] += 1
    for v in videos:
        if counts[v.id] > 1:
            v.id = f"{safe_name(v.cls)}__{v.id}"
    seen: dict[str, int] = defaultdict(int)
    for v in videos:  # still clashing (same class, same stem, different folders): number them
        seen[v.id] += 1
        if seen[v.id] > 1:
            v.id = f"{v.id}__{seen[v.id]}"


_UNSAFE = re.compile(r"[^A-Za-z0-9_.+-]+")


def safe_name(name: str) -> str:
    """A file-system-friendly folder name for a class label ("playing cards" -> "playing_cards")."""
    s = _UNSAFE.sub("_", name).strip("._")
    return s or "_"
