"""`python -m sr3_engine.train`: the same command as `python -m sr3_engine train` (sr3_engine/cli/train.py)."""

import sys

from .cli.train import main

if __name__ == "__main__":
    sys.exit(main())
