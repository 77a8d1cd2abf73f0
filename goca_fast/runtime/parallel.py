"""One way to run per-video work in parallel (dataset preparation, synthetic data, flow extraction and import, DALI
validation): a spawn process pool and a progress bar, results yielded as they complete."""
from __future__ import annotations

import sys
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Callable, Iterator, Sequence

from tqdm import tqdm


def process_pool(workers: int, initializer=None, initargs: tuple = ()) -> ProcessPoolExecutor:
    """A process pool safe to start from a process that already ran OpenMP/OpenCV/torch threads, and that leaves
    nothing running once it is shut down.

    Plain fork copies thread-pool state whose threads do not exist in the child (a deadlock we hit in practice);
    a forkserver would stay alive, with every module it preloaded, until the calling process exits. Spawned workers
    start clean (each imports what its job needs, about a second) and end with the pool. The only process left is
    the standard library's resource tracker, one per interpreter, which exits with it.
    """
    return ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=initializer,
                               initargs=initargs)


def run_parallel(fn: Callable, args: Sequence[tuple], workers: int, desc: str, progress: bool,
                 initializer=None, initargs: tuple = ()) -> Iterator[dict]:
    """fn(*a) for every a in `args`, in this process (`initializer` is for pool workers only) or a process pool
    (`process_pool`), with a progress bar.

    Results are yielded as they complete, so callers can record each one before the next (resumability).
    """
    bar = None
    if progress:
        bar = tqdm(total=len(args), desc=desc, unit="video", file=sys.stderr)
    try:
        if workers <= 1:
            for a in args:
                r = fn(*a)
                if bar:
                    bar.update(1)
                yield r
        else:
            with process_pool(workers, initializer, initargs) as ex:
                for f in as_completed([ex.submit(fn, *a) for a in args]):
                    if bar:
                        bar.update(1)
                    yield f.result()
    finally:
        if bar:
            bar.close()
