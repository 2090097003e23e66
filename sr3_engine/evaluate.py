"""`python -m sr3_engine.evaluate`: the same command as `python -m sr3_engine evaluate` (sr3_engine/cli/evaluate.py)."""

import sys

from .cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
