// The Python module sr3_engine._C. Importing it registers the torch operators of ops.cpp as
// torch.ops.sr3_engine_cpp.*; the functions here only describe the build, for the dispatcher
// (sr3_engine/_ext.py) to decide what it may route here.
#include <pybind11/pybind11.h>
#include <torch/version.h>

#include <string>

#include "sr3_kernels.h"

#ifdef SR3_ENGINE_WITH_CUDA
constexpr bool kWithCuda = true;
#else
constexpr bool kWithCuda = false;
#endif

#ifdef _OPENMP
constexpr bool kWithOpenMP = true;
#else
constexpr bool kWithOpenMP = false;
#endif

namespace {

constexpr const char* kBf16PathNames[] = {"generic", "avx512bf16"};

std::string bf16_path() { return kBf16PathNames[static_cast<int>(sr3::bf16_path())]; }

void force_bf16_path(const std::string& name) {
  int path = -1;
  for (int i = 0; i < 2; ++i) {
    if (name == kBf16PathNames[i]) path = i;
  }
  if (path < 0 && name != "auto") {
    throw pybind11::value_error("force_bf16_path: expected 'auto', 'generic' or 'avx512bf16'; got '" + name + "'");
  }
  if (!sr3::force_bf16_path(path)) {
    throw pybind11::value_error("force_bf16_path: this CPU has no AVX-512 BF16; 'avx512bf16' cannot run here");
  }
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "C++/CUDA kernels of sr3_engine, registered as torch.ops.sr3_engine_cpp.*";
  m.def("has_cuda", [] { return kWithCuda; }, "Whether the CUDA kernels were built into this module.");
  m.def("has_openmp", [] { return kWithOpenMP; }, "Whether the CPU kernels were built with OpenMP.");
  m.def("bf16_path", &bf16_path,
        "How the CPU kernels write bfloat16: 'avx512bf16' (the CPU's conversion instructions) or 'generic'.");
  m.def("force_bf16_path", &force_bf16_path, pybind11::arg("name"),
        "Force 'generic' or 'avx512bf16' (ValueError where the CPU lacks it) for later calls; 'auto': the CPU's "
        "choice. For tests and benchmarks.");
  m.attr("torch_version") = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
                            std::to_string(TORCH_VERSION_PATCH);
}
