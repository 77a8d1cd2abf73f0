"""`goca-prototypes`: hyperspherical prototypes (Mettes et al., NeurIPS 2019) for `model.prototypes_path`."""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

import cv2
import numpy as np

from goca_fast.cli.help import HelpFormatter
from goca_fast.config import ConfigError
from goca_fast.runtime.atomic import atomic_open, write_atomic
from goca_fast.runtime.device import resolve_device
from goca_fast.method.prototypes import hyperspherical_prototypes, nearest_neighbour_angles, random_prototypes


def plot_angle_histograms(path: str, ours: np.ndarray, rand: np.ndarray, title: str) -> None:
    """PNG histogram of nearest-neighbour angles, ours vs random (drawn with OpenCV: no matplotlib needed)."""
    w, h, left, bottom, top = 900, 520, 70, 60, 50
    img = np.full((h, w, 3), 255, np.uint8)
    lo = float(np.floor(min(ours.min(), rand.min()) / 5) * 5)
    hi = float(np.ceil(max(ours.max(), rand.max()) / 5) * 5)
    hi = max(hi, lo + 5)
    bins = np.linspace(lo, hi, 61)
    ho, _ = np.histogram(ours, bins)
    hr, _ = np.histogram(rand, bins)
    peak = max(ho.max(), hr.max(), 1)
    pw, ph = w - left - 20, h - bottom - top
    x_of = lambda a: int(left + (a - lo) / (hi - lo) * pw)  # noqa: E731
    y_of = lambda c: int(h - bottom - c / peak * ph)         # noqa: E731
    for counts, colour in ((hr, (160, 160, 160)), (ho, (200, 90, 30))):
        for k, c in enumerate(counts):
            if c:
                cv2.rectangle(img, (x_of(bins[k]) + 1, y_of(c)), (x_of(bins[k + 1]) - 1, h - bottom), colour, -1)
    cv2.line(img, (left, h - bottom), (w - 20, h - bottom), (0, 0, 0), 1)
    cv2.line(img, (left, top), (left, h - bottom), (0, 0, 0), 1)
    for a in np.arange(lo, hi + 1e-9, 5 if hi - lo <= 60 else 10):
        cv2.line(img, (x_of(a), h - bottom), (x_of(a), h - bottom + 5), (0, 0, 0), 1)
        cv2.putText(img, f"{a:.0f}", (x_of(a) - 10, h - bottom + 20), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
    cv2.putText(img, "nearest-neighbour angle (degrees)", (w // 2 - 140, h - 15), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                (0, 0, 0), 1)
    cv2.putText(img, f"count (peak {peak})", (5, top - 10), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
    cv2.putText(img, title, (left, 25), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1)
    for i, (name, arr, colour) in enumerate((("hyperspherical", ours, (200, 90, 30)),
                                              ("random", rand, (160, 160, 160)))):
        y = top + 20 + 22 * i
        cv2.rectangle(img, (w - 330, y - 10), (w - 315, y + 2), colour, -1)
        cv2.putText(img, f"{name}: min {arr.min():.1f} mean {arr.mean():.1f} max {arr.max():.1f}",
                    (w - 308, y), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1)
    ok, png = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"cannot encode {path}")
    write_atomic(path, png.tobytes())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="goca-prototypes", description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--num", "-c", type=int, default=1000, help="number of prototypes K (model.num_prototypes)")
    p.add_argument("--dim", "-d", type=int, default=128, help="dimension D (model.embed_dim)")
    p.add_argument("--steps", "-e", type=int, default=3000, help="optimisation steps on the sphere (>= 1)")
    p.add_argument("--lr", "-l", type=float, default=0.1, help="learning rate")
    p.add_argument("--momentum", type=float, default=0.9, help="momentum")
    p.add_argument("--seed", "-s", type=int, default=300, help="seed of the random start")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto")
    p.add_argument("--out", default=None, help="output .npy (default: prototypes-<D>d-<K>c.npy)")
    p.add_argument("--plot", default=None, help="PNG path (default: the .npy path with .png)")
    p.add_argument("--no-plot", action="store_true", help="write no histogram plot")
    p.add_argument("--log-every", type=int, default=0, help="log the loss every N steps (0: never)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.num < 2 or a.dim < 2:
        parser.error(f"need --num >= 2 and --dim >= 2, got {a.num} and {a.dim}")
    if a.steps < 1 or a.lr <= 0 or not 0 <= a.momentum < 1:  # 0 steps would save random, un-optimised prototypes
        parser.error("need --steps >= 1, --lr > 0 and 0 <= --momentum < 1")
    try:
        device = str(resolve_device(a.device, "--device"))
    except ConfigError as e:
        parser.error(str(e))
    out = a.out or f"prototypes-{a.dim}d-{a.num}c.npy"
    if not out.endswith(".npy"):
        parser.error(f"--out must end in .npy, got {out}")
    t0 = time.time()
    protos = hyperspherical_prototypes(a.num, a.dim, a.steps, a.lr, a.momentum, a.seed, device, a.log_every)
    secs = time.time() - t0
    try:
        with atomic_open(out, "wb") as f:
            np.save(f, protos)
    except OSError as e:
        print(f"goca-prototypes: error: cannot write {out}: {e.strerror or e}", file=sys.stderr)
        return 2
    ours = nearest_neighbour_angles(protos)
    rand = nearest_neighbour_angles(random_prototypes(a.num, a.dim, a.seed))
    print(f"goca-prototypes: {a.num}x{a.dim} in {secs:.1f}s on {device} -> {os.path.abspath(out)}")
    print(f"goca-prototypes: nearest-neighbour angle (deg) min {ours.min():.2f} mean {ours.mean():.2f} "
          f"max {ours.max():.2f}; random: min {rand.min():.2f} mean {rand.mean():.2f} max {rand.max():.2f}")
    if not a.no_plot:
        png = a.plot or out[:-4] + ".png"
        plot_angle_histograms(png, ours, rand, f"{a.num} prototypes in {a.dim}-D, {a.steps} steps")
        print(f"goca-prototypes: plot -> {os.path.abspath(png)}")
    print(f"goca-prototypes: use with model.prototypes_path={os.path.abspath(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
