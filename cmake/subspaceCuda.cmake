# subspace_attach_cuda(<target> [BUILD_INTERFACE_ONLY]): gives an INTERFACE target the CUDA path's dependencies.
#
# Used by our own CMakeLists.txt (BUILD_INTERFACE_ONLY, so the installed export stays host-only) and by
# subspaceConfig.cmake, so that a consumer of either kind gets the CUDA dependencies exactly when it has
# enabled the CUDA language itself.
include_guard(GLOBAL)

function(subspace_attach_cuda target)
  cmake_parse_arguments(PARSE_ARGV 1 arg "BUILD_INTERFACE_ONLY" "" "")
  find_package(CUDAToolkit REQUIRED)
  # The toolkit ships CCCL (Thrust, CUB, libcu++) with its own package config.
  find_package(CCCL CONFIG REQUIRED HINTS "${CUDAToolkit_LIBRARY_DIR}/cmake" "${CUDAToolkit_LIBRARY_ROOT}/lib64/cmake")
  find_package(NCCL REQUIRED)
  set(libs CUDA::cudart CUDA::cublasLt CUDA::cublas CUDA::curand CUDA::cusolver CCCL::CCCL NCCL::nccl)
  set(opts $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr --extended-lambda>)
  if(arg_BUILD_INTERFACE_ONLY)
    target_link_libraries(${target} INTERFACE "$<BUILD_INTERFACE:${libs}>")
    target_compile_options(${target} INTERFACE "$<BUILD_INTERFACE:${opts}>")
    target_compile_features(${target} INTERFACE "$<BUILD_INTERFACE:cuda_std_20>")
  else()
    target_link_libraries(${target} INTERFACE ${libs})
    target_compile_options(${target} INTERFACE ${opts})
    target_compile_features(${target} INTERFACE cuda_std_20)
  endif()
endfunction()
