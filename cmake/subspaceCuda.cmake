# The CUDA side of subspace's targets. Used by our CMakeLists.txt (FetchContent, add_subdirectory, our own
# builds) and by subspaceConfig.cmake (find_package), so both kinds of consumer get the same targets.
#
#   subspace_attach_cuda(<target> <core>)  <target> gets <core>, the CUDA runtime, cuBLASLt, cuSOLVER, CCCL and
#                                          cuda_std_20 (needs CMake >= 3.28: see SUBSPACE_CUDA_CMAKE_MINIMUM)
#   subspace_defer_nccl(<nccl> <union> <dir>)  finds NCCL at the end of <dir>'s configuration, only if a target
#                                          there links subspace::nccl (NCCL required) or subspace::subspace (NCCL
#                                          optional), and then links NCCL::nccl into <nccl>
#   subspace_link_nccl(<nccl> <found-var> [REQUIRED])  finds NCCL now and links NCCL::nccl into <nccl>
include_guard(GLOBAL)

# CMake 3.25 (Debian 12) does not know cuda_std_20 for nvcc; 3.28 is the oldest we build CUDA with.
set(SUBSPACE_CUDA_CMAKE_MINIMUM 3.28)

function(subspace_attach_cuda target core)
  find_package(CUDAToolkit REQUIRED)
  # The toolkit ships CCCL (Thrust, CUB, libcu++) with its own package config.
  find_package(CCCL CONFIG REQUIRED HINTS "${CUDAToolkit_LIBRARY_DIR}/cmake" "${CUDAToolkit_LIBRARY_ROOT}/lib64/cmake")
  # What the headers call: cudart, cuBLASLt (kernels/gemm), cuSOLVER (kernels/linalg), CUB (kernels/reduce).
  # CUDA::cusolver brings the libraries cuSOLVER itself needs (cuBLAS, cuSPARSE).
  target_link_libraries(${target} INTERFACE ${core} CUDA::cudart CUDA::cublasLt CUDA::cusolver CCCL::CCCL)
  target_compile_options(${target} INTERFACE $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr --extended-lambda>)
  target_compile_features(${target} INTERFACE cuda_std_20)
endfunction()

function(subspace_link_nccl nccl_target found_var)
  get_property(linked TARGET ${nccl_target} PROPERTY _SUBSPACE_NCCL_LINKED)
  if(linked)
    set(${found_var} TRUE PARENT_SCOPE)
    return()
  endif()
  list(PREPEND CMAKE_MODULE_PATH "${CMAKE_CURRENT_FUNCTION_LIST_DIR}")
  find_package(CUDAToolkit QUIET)  # FindNCCL looks beside the toolkit
  if("REQUIRED" IN_LIST ARGN)
    find_package(NCCL REQUIRED)
  else()
    find_package(NCCL QUIET)
  endif()
  if(NCCL_FOUND)
    target_link_libraries(${nccl_target} INTERFACE NCCL::nccl)
    set_property(TARGET ${nccl_target} PROPERTY _SUBSPACE_NCCL_LINKED TRUE)
  endif()
  set(${found_var} ${NCCL_FOUND} PARENT_SCOPE)
endfunction()

function(subspace_defer_nccl nccl_target union_target dir)
  cmake_language(EVAL CODE
    "cmake_language(DEFER DIRECTORY [[${dir}]] CALL _subspace_resolve_nccl [[${nccl_target}]] [[${union_target}]])")
endfunction()

# Deferred: looks through the link libraries of every target in the current directory and below.
function(_subspace_resolve_nccl nccl_target union_target)
  set(wants_nccl FALSE)
  set(wants_union FALSE)
  set(dirs "${CMAKE_CURRENT_SOURCE_DIR}")
  while(dirs)
    list(POP_FRONT dirs dir)
    get_property(subdirs DIRECTORY "${dir}" PROPERTY SUBDIRECTORIES)
    get_property(targets DIRECTORY "${dir}" PROPERTY BUILDSYSTEM_TARGETS)
    get_property(imported DIRECTORY "${dir}" PROPERTY IMPORTED_TARGETS)
    list(APPEND dirs ${subdirs})
    foreach(target IN LISTS targets imported)
      # (imported targets of a subdirectory are not visible from here)
      if(target STREQUAL nccl_target OR target STREQUAL union_target OR NOT TARGET ${target})
        continue()
      endif()
      set(links "")
      foreach(property LINK_LIBRARIES INTERFACE_LINK_LIBRARIES)
        get_property(value TARGET ${target} PROPERTY ${property})
        list(APPEND links ${value})
      endforeach()
      if(links MATCHES "(^|[^A-Za-z0-9_])(subspace::nccl|${nccl_target})($|[^A-Za-z0-9_])")
        set(wants_nccl TRUE)
      elseif(links MATCHES "(^|[^A-Za-z0-9_])subspace::subspace($|[^A-Za-z0-9_])|(^|;|[A-Za-z_]:)${union_target}($|;|>)")
        set(wants_union TRUE)
      endif()
    endforeach()
  endwhile()
  if(wants_nccl)
    subspace_link_nccl(${nccl_target} found REQUIRED)
  elseif(wants_union)
    subspace_link_nccl(${nccl_target} found)
    if(NOT found)
      message(STATUS "subspace: NCCL not found; subspace::subspace comes without comm::nccl")
    endif()
  endif()
endfunction()
