"""Static evidence for the kernel variants, no GPU needed: ptxas registers / spills / stack per kernel instance, and
SASS instruction counts by kind (shared loads/stores, global loads/stores, shuffles, MUFU, barriers, FP32 ALU).

    python benchmarks/gpu/static_report.py [--arch sm_90,sm_80]

Needs nvcc, and cuobjdump + nvdisasm (CUDA toolkit, or `pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm`).
The counts are of instructions in the binary (loops count once), a like-for-like comparison of v1 and v2; the
dynamic counts per row step are derived in benchmarks/notes/sinkhorn_kernel.md. Writes
benchmarks/results/kernel-static-<arch>.{md,json}.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.report import write_results  # noqa: E402

KERNELS = Path(__file__).resolve().parents[2] / "kernels"
SOURCES = ["sinkhorn_v1.cu", "sinkhorn_v2.cu"]
# goca_sweeps_v<variant>I<f: fp32 | t: 16-bit>...ConfigILi<KPT>ELi<R>ELi<threads>E[Lb<overlap>]
NAME = re.compile(r"goca_sweeps_v(\d)I([ft])NS\d_6ConfigILi(\d+)ELi(\d+)ELi(\d+)E(?:Lb(\d))?")
KINDS = {  # column: SASS opcodes (before the first '.') counted into it
    "LDS": ("LDS", "LDSM"), "STS": ("STS",), "LDG": ("LDG",), "STG": ("STG",), "SHFL": ("SHFL",),
    "MUFU": ("MUFU",), "BAR": ("BAR",), "FP32": ("FADD", "FMUL", "FFMA", "FMNMX", "FSEL", "FSETP"),
}
COLUMNS = ["K up to", "variant", "scores", "KPT", "R", "threads", "overlap", "registers", "spill_stores", "spill_loads",
           "stack", *KINDS, "instructions"]


def _tool(name: str) -> str | None:
    """A CUDA binary utility: on PATH, in CUDA_HOME, or in the pip wheels nvidia-cuda-cuobjdump/-nvdisasm."""
    found = shutil.which(name) or shutil.which(name, path=os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"),
                                                                       "bin"))
    if found:
        return found
    try:
        import nvidia
        for root in nvidia.__path__:
            for cand in Path(root).glob(f"cu*/bin/{name}"):
                return str(cand)
    except ImportError:
        pass
    return None


def _instance(mangled: str) -> dict | None:
    m = NAME.search(mangled)
    if not m:
        return None
    variant, t, kpt, r, threads, overlap = m.groups()
    return {"K up to": int(kpt) * int(threads), "variant": int(variant), "scores": "fp32" if t == "f" else "16-bit",
            "KPT": int(kpt), "R": int(r), "threads": int(threads), "overlap": bool(int(overlap or 0))}


def ptxas_table(log: str) -> dict[str, dict]:
    """Per kernel: registers, spill stores/loads, stack frame, from `-Xptxas -v` output."""
    out, current = {}, None
    for line in log.splitlines():
        if "Compiling entry function" in line:
            current = line.split("'")[1]
            out[current] = {}
        elif current and "spill stores" in line:
            nums = [int(x) for x in re.findall(r"(\d+) bytes", line)]
            out[current].update(stack=nums[0], spill_stores=nums[1], spill_loads=nums[2])
        elif current and "registers" in line:
            out[current]["registers"] = int(re.search(r"Used (\d+) registers", line).group(1))
    return out


def sass_counts(sass: str) -> dict[str, Counter]:
    """Per kernel: instruction counts by KINDS, from `cuobjdump -sass`."""
    out, current = {}, None
    for line in sass.splitlines():
        if "Function :" in line:
            current = line.split("Function :")[1].strip()
            out[current] = Counter()
            continue
        m = re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]*)", line)
        if current and m:
            op = m.group(1)
            out[current]["instructions"] += 1
            for kind, ops in KINDS.items():
                if op in ops:
                    out[current][kind] += 1
    return out


def report(arch: str, workdir: Path) -> list[dict]:
    nvcc, cuobjdump, nvdisasm = _tool("nvcc"), _tool("cuobjdump"), _tool("nvdisasm")
    if not (nvcc and cuobjdump and nvdisasm):
        raise SystemExit("static_report: needs nvcc, cuobjdump and nvdisasm (pip install nvidia-cuda-cuobjdump "
                         "nvidia-cuda-nvdisasm)")
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(nvdisasm).parent), os.environ.get("PATH", "")])}
    rows = []
    for src in SOURCES:
        obj = workdir / f"{Path(src).stem}.{arch}.o"
        build = subprocess.run([nvcc, "-c", "-std=c++17", "-O3", f"-arch={arch}", "-Xptxas", "-v", str(KERNELS / src),
                                "-o", str(obj)], capture_output=True, text=True, timeout=900)
        if build.returncode != 0:
            raise SystemExit(f"static_report: nvcc failed on {src}: {build.stderr.strip().splitlines()[-1]}")
        ptxas = ptxas_table(build.stderr)
        sass = sass_counts(subprocess.run([cuobjdump, "-sass", str(obj)], capture_output=True, text=True, env=env,
                                          timeout=300, check=True).stdout)
        for name, counts in sass.items():
            inst = _instance(name)
            if inst:
                rows.append({**inst, **ptxas.get(name, {}), **{k: counts[k] for k in (*KINDS, "instructions")}})
    rows.sort(key=lambda r: (r["K up to"], r["scores"], r["variant"]))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="sm_90,sm_80", help="comma-separated GPU architectures (default: sm_90,sm_80)")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        for arch in a.arch.split(","):
            rows = report(arch, Path(tmp))
            how = "nvcc -O3 -Xptxas -v; cuobjdump -sass opcode counts (static: loops count once)"
            path = write_results("kernel-static", rows, COLUMNS,
                                 {"device": f"none (static, {arch})", "device_tag": arch, "how": how})
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
