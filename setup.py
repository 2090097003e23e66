"""Build step for the optional C++/CUDA extension sr3_engine._C (the package itself is declared in
pyproject.toml). CMake compiles csrc/ as CMakeLists.txt describes, with this Python, the installed
torch (torch.utils.cmake_prefix_path) and pybind11 (pybind11.get_cmake_dir()), into the place
setuptools expects; `pip install -e .` then copies it next to the sources as sr3_engine/_C*.so.

Environment:
  SR3_ENGINE_SKIP_EXT=1     do not build the extension.
  SR3_ENGINE_REQUIRE_EXT=1  fail the install when the extension cannot be built. Without it, a
                            missing cmake, pybind11 or compiler, or a failed build, prints a warning
                            and the install goes on; the `cpp` op backend then says why it is missing.
  CMAKE_ARGS                extra configure arguments, split like a shell line, e.g.
                            "-DSR3_ENGINE_CUDA=OFF -DSR3_ENGINE_NATIVE_ARCH=OFF" for a portable build.
  CMAKE_BUILD_PARALLEL_LEVEL, CMAKE_GENERATOR   as for any CMake build (Ninja is used when present).
"""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0") == "1"


class CMakeExtension(Extension):
    """An extension whose sources CMake knows; setuptools only learns where the result goes."""

    def __init__(self, name: str):
        super().__init__(name, sources=[])


class ExtensionUnavailable(Exception):
    """The extension cannot be built here (missing tool or failed build)."""


class CMakeBuild(build_ext):
    def build_extensions(self) -> None:
        # Only built extensions stay listed, so setuptools copies and records nothing that failed.
        self.extensions = [ext for ext in self.extensions if self._build_or_warn(ext)]

    def _build_or_warn(self, ext: CMakeExtension) -> bool:
        if _env_flag("SR3_ENGINE_SKIP_EXT"):
            print(f"sr3_engine: SR3_ENGINE_SKIP_EXT=1, not building {ext.name}", file=sys.stderr)
            return False
        try:
            self._cmake_build(ext)
        except ExtensionUnavailable as error:
            if _env_flag("SR3_ENGINE_REQUIRE_EXT"):
                raise RuntimeError(f"sr3_engine: {ext.name} is required (SR3_ENGINE_REQUIRE_EXT=1): {error}") from error
            print(f"WARNING: sr3_engine: building {ext.name} failed ({error}); installing without it, so the "
                  "`cpp` op backend is unavailable. Run `pip install -v` to see the CMake log.", file=sys.stderr)
            return False
        return True

    def _cmake_build(self, ext: CMakeExtension) -> None:
        cmake = shutil.which("cmake")
        if cmake is None:
            raise ExtensionUnavailable("cmake was not found on PATH")
        try:
            import pybind11
            import torch.utils
        except ImportError as error:
            raise ExtensionUnavailable(f"{error.name} is not importable at build time ({error})") from error
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        configure = [
            cmake, "-S", str(ROOT), "-B", str(build_dir),
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path};{pybind11.get_cmake_dir()}",
            f"-DSR3_ENGINE_OUTPUT_DIR={target.parent}",
            *shlex.split(os.environ.get("CMAKE_ARGS", "")),
        ]
        if "CMAKE_GENERATOR" not in os.environ and shutil.which("ninja"):
            configure += ["-G", "Ninja"]
        # Options come from this call alone, never from a previous configure's cache; the
        # objects stay, so an unchanged source is not recompiled.
        (build_dir / "CMakeCache.txt").unlink(missing_ok=True)
        build = [cmake, "--build", str(build_dir), "--config", "Debug" if self.debug else "Release"]
        for step, command in (("configure", configure), ("build", build)):
            try:
                subprocess.run(command, check=True)
            except subprocess.CalledProcessError as error:
                raise ExtensionUnavailable(f"the CMake {step} step exited with status {error.returncode}") from error
            except OSError as error:
                raise ExtensionUnavailable(f"the CMake {step} step could not start ({error})") from error
        if not target.exists():
            raise ExtensionUnavailable(f"CMake finished but did not produce {target}")


setup(ext_modules=[CMakeExtension("sr3_engine._C")], cmdclass={"build_ext": CMakeBuild})
