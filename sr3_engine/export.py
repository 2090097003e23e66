"""`python -m sr3_engine.export`: the same command as `python -m sr3_engine export` (sr3_engine/cli/export.py)."""

import sys

from .cli.export import main

if __name__ == "__main__":
    sys.exit(main())
