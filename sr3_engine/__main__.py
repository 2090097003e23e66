"""`python -m sr3_engine <command>`; see `sr3_engine.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
