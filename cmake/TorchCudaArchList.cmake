# torch's CMake config derives nvcc -gencode flags of its own from TORCH_CUDA_ARCH_LIST; on a host
# that sees no GPU it falls back to a list from compute_50, which nvcc 13 rejects, so the CUDA
# build would be skipped. sr3_torch_cuda_arch_list turns CMAKE_CUDA_ARCHITECTURES ("80;90",
# "90a") into torch's spelling ("8.0;9.0", "9.0a"); CMakeLists.txt hands that to torch unless the
# caller set TORCH_CUDA_ARCH_LIST. tests/test_cpp_ext.py runs it with `cmake -P`.
function(sr3_torch_cuda_arch_list out_var architectures)
  set(converted "")
  foreach(arch IN LISTS architectures)
    string(REGEX REPLACE "^([0-9]+)([0-9])([a-z]?)(-real|-virtual)?$" "\\1.\\2\\3" arch "${arch}")
    list(APPEND converted "${arch}")
  endforeach()
  set(${out_var} "${converted}" PARENT_SCOPE)
endfunction()
