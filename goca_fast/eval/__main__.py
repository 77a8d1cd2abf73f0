"""`python -m goca_fast.eval <subcommand> ...` (also the torchrun entry for DDP fine-tuning)."""
import sys

from goca_fast.eval.cli import main

sys.exit(main())
