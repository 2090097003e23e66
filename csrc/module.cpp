// The Python module sr3_engine._C. Importing it registers the torch operators of ops.cpp as
// torch.ops.sr3_engine_cpp.*; the functions here only describe the build, for the dispatcher
// (sr3_engine/_ext.py) to decide what it may route here.
#include <pybind11/pybind11.h>
#include <torch/version.h>

#include <string>

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

PYBIND11_MODULE(_C, m) {
  m.doc() = "C++/CUDA kernels of sr3_engine, registered as torch.ops.sr3_engine_cpp.*";
  m.def("has_cuda", [] { return kWithCuda; }, "Whether the CUDA kernels were built into this module.");
  m.def("has_openmp", [] { return kWithOpenMP; }, "Whether the CPU kernels were built with OpenMP.");
  m.attr("torch_version") = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
                            std::to_string(TORCH_VERSION_PATCH);
}
