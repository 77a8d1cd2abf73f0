"""Is DALI importable (from the environment, or from the carried parts unpacked on PYTHONPATH)?

    python benchmarks/gpu/dali_import.py [--carried] [--dry-run]

Exit 0 with the version and location; else exit 1 with "skipped: DALI not carried" (nothing was carried) or with the
import error (parts were carried but do not import), or exit 77 (skipped, for benchmarks/gpu/check.py) in a dry run.
"""
from __future__ import annotations

import argparse
import sys

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--carried", action="store_true", help="parts or wheels were unpacked before this check")
ap.add_argument("--dry-run", action="store_true")
a = ap.parse_args()
try:
    import nvidia.dali as dali
except ImportError as e:
    print(f"import nvidia.dali: {e}")
    print("DALI carried but not importable (see the dali-unpack step)" if a.carried else "skipped: DALI not carried")
    sys.exit(77 if a.dry_run else 1)
print(f"DALI {dali.__version__} from {dali.__file__}")
