"""`python -m goca_fast.pretrain`: the pretraining command line (it lives in `goca_fast.cli.pretrain`)."""
import sys

from goca_fast.cli.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
