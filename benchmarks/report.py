"""Shared benchmark reporting: device description, git commit, Markdown table and JSON in benchmarks/results/
(or in $GOCA_FAST_RESULTS_DIR when set, so that the GPU check pack's dry runs leave the committed results alone)."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Sequence

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def results_dir() -> Path:
    """$GOCA_FAST_RESULTS_DIR when set (benchmarks/gpu/check.py points dry runs elsewhere), else benchmarks/results/."""
    env = os.environ.get("GOCA_FAST_RESULTS_DIR")
    return Path(env).expanduser() if env else RESULTS


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads, {os.cpu_count()} cores)"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
        # results files rewritten by an earlier run of the same session do not make the code dirty
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)",
                                ":(top,exclude)benchmarks/results"], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip()
        if out.returncode == 0:
            return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("GOCA_FAST_COMMIT", "unknown")  # a copied tree without .git: the caller says the commit


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(name: str, rows: list[dict[str, Any]], columns: Sequence[str], meta: dict[str, Any],
                  out_dir: Path | None = None) -> Path:
    """Write <name>-<device tag>.json and .md into `out_dir` (default: results_dir()); returns the JSON path."""
    out_dir = Path(out_dir) if out_dir is not None else results_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "commit": git_commit(),
            "torch": torch.__version__, **meta}
    tag = meta.get("device_tag", "cpu")
    js = out_dir / f"{name}-{tag}.json"
    js.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    header = "\n".join(f"- {k}: {v}" for k, v in meta.items())
    (out_dir / f"{name}-{tag}.md").write_text(f"# {name}\n\n{header}\n\n{markdown_table(rows, columns)}\n")
    return js
