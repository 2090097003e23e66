"""`python -m sr3_engine.demo`: the same command as `python -m sr3_engine demo` (sr3_engine/cli/demo.py)."""

import sys

from .cli.demo import main

if __name__ == "__main__":
    sys.exit(main())
