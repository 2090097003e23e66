"""The install stage of `make gpu-check` (`python3 -m bench.offline_install`): the editable install
of this checkout on a machine without network, where it must neither hang nor gate the check.

- pip never reaches for an index or its own version (`--no-index`, PIP_DISABLE_PIP_VERSION_CHECK),
  resolves no dependency and builds with the machine's packages (`--no-deps --no-build-isolation`);
- a system Python that marks itself externally managed is accepted (PIP_BREAK_SYSTEM_PACKAGES);
- a C++ compiler and the interpreter's headers are checked first, and a missing one is named;
- the extension is built for sm_90 and required. When it cannot be built, the package is
  installed without it, so that the Triton, fused and eager stages still run, and the exit status
  is 1: the check is not green, and its correctness stage fails the extension's tests.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
OFFLINE_PIP = {"PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_BREAK_SYSTEM_PACKAGES": "1",
               "PIP_NO_INPUT": "1"}
WITH_EXTENSION = {"CMAKE_ARGS": "-DCMAKE_CUDA_ARCHITECTURES=90", "SR3_ENGINE_REQUIRE_EXT": "1"}
WITHOUT_EXTENSION = {"SR3_ENGINE_SKIP_EXT": "1"}


def pip_command(python: str = sys.executable) -> list[str]:
    return [python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-e", str(ROOT)]


def missing_build_tools() -> list[str]:
    """Why this interpreter cannot build the extension here, before trying (empty: nothing missing)."""
    reasons = []
    if not any(shutil.which(compiler) for compiler in ("c++", "g++", "clang++")):
        reasons.append("no C++ compiler (c++, g++ or clang++) on PATH")
    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not header.is_file():
        reasons.append(f"no Python headers ({header} is missing: the python3-dev package)")
    if shutil.which("cmake") is None:
        reasons.append("no cmake on PATH")
    return reasons


def main(argv: Sequence[str] | None = None) -> int:
    if argv:
        print("usage: python3 -m bench.offline_install (no arguments)", file=sys.stderr)
        return 2
    print(f"install: nvcc {'at ' + shutil.which('nvcc') if shutil.which('nvcc') else 'not on PATH'}", flush=True)
    reasons = missing_build_tools()
    if not reasons:
        print("install: building the extension for sm_90 (required)", flush=True)
        code = subprocess.call(pip_command(), cwd=ROOT, env={**os.environ, **OFFLINE_PIP, **WITH_EXTENSION})
        if code == 0:
            print("install: done, with the extension", flush=True)
            return 0
        reasons = [f"its build failed (pip exit {code}, log above)"]
    print(f"install: the extension cannot be built: {'; '.join(reasons)}. Installing without it, so that the "
          "other stages run; the correctness stage will fail the extension's tests.", flush=True)
    inherited = {k: v for k, v in os.environ.items() if k != "SR3_ENGINE_REQUIRE_EXT"}
    code = subprocess.call(pip_command(), cwd=ROOT, env={**inherited, **OFFLINE_PIP, **WITHOUT_EXTENSION})
    print(f"install: without the extension, pip exit {code}", flush=True)
    return 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
