"""The per-video process pool: results of every job, and no helper process left running after it."""
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from helpers import descendants

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import os, sys, time
    sys.path[:0] = [{root!r}, {tests!r}]
    from pathlib import Path
    from goca_fast.runtime.parallel import run_parallel
    from helpers import descendants

    def square(x):
        return x * x

    if __name__ == "__main__":
        print(sorted(run_parallel(square, [(i,) for i in range(7)], 3, "t", False)))
        for pid in descendants(os.getpid()):
            try:
                print("LEFT", pid, Path(f"/proc/{{pid}}/cmdline").read_bytes().replace(b"\\0", b" ").decode())
            except OSError:
                pass
        sys.stdout.flush()
""")


def test_pool_returns_every_result_and_leaves_only_the_stdlib_tracker(tmp_path):
    script = tmp_path / "pool.py"
    script.write_text(SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests")))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    lines = out.splitlines()
    assert lines[0] == str([i * i for i in range(7)])
    left = [line for line in lines[1:] if line.startswith("LEFT")]
    # the pool's workers are gone when it returns; no forkserver; only the interpreter's resource tracker
    assert all("multiprocessing.resource_tracker" in line for line in left), left
    assert not any("forkserver" in line or "spawn_main" in line for line in left), left
    pids = [int(line.split()[1]) for line in left]
    deadline = time.time() + 10  # and that one ends with the process that started the pool
    while time.time() < deadline and any(Path(f"/proc/{p}").exists() and _alive(p) for p in pids):
        time.sleep(0.1)
    assert not [p for p in pids if Path(f"/proc/{p}").exists() and _alive(p)]
    assert not descendants(proc.pid)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
