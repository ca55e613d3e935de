# Build helpers shared by every component.
include(CheckCXXSourceRuns)

# Host SIMD level: x86-64-v3 (AVX2 + FMA) when the build machine runs it, which is
# what the CPU backend's inner loops are written for; plain x86-64 otherwise.
function(pd_setup_cpu_flags)
  set(PD_CXX_WARNINGS -Wall -Wextra -Wno-unused-parameter PARENT_SCOPE)
  if(CMAKE_SYSTEM_PROCESSOR MATCHES "x86_64|AMD64")
    set(CMAKE_REQUIRED_FLAGS "-march=x86-64-v3")
    check_cxx_source_runs("
      #include <immintrin.h>
      int main() { __m256 a = _mm256_set1_ps(1.f); a = _mm256_fmadd_ps(a, a, a);
                   return _mm256_cvtss_f32(a) == 2.f ? 0 : 1; }" PD_HOST_HAS_X86_64_V3)
    unset(CMAKE_REQUIRED_FLAGS)
    if(PD_HOST_HAS_X86_64_V3)
      add_compile_options($<$<COMPILE_LANGUAGE:CXX>:-march=x86-64-v3>)
    endif()
  endif()
  add_compile_options($<$<COMPILE_LANGUAGE:CXX>:-fopenmp-simd>)
  if(PD_WERROR)
    add_compile_options($<$<COMPILE_LANGUAGE:CXX>:-Werror>)
  endif()
endfunction()

# Detects nvcc. Sets PD_HAVE_CUDA in the parent scope. CUDA code is compiled for
# sm_90a only (wgmma, setmaxnreg), with the explicit -gencode form.
macro(pd_setup_cuda)
  set(PD_HAVE_CUDA OFF)
  if(PD_ENABLE_CUDA)
    if(NOT CMAKE_CUDA_COMPILER AND EXISTS /usr/local/cuda/bin/nvcc)
      set(CMAKE_CUDA_COMPILER /usr/local/cuda/bin/nvcc)
    endif()
    include(CheckLanguage)
    check_language(CUDA)
    if(CMAKE_CUDA_COMPILER)
      set(CMAKE_CUDA_ARCHITECTURES OFF)
      enable_language(CUDA)
      # CMake < 3.26 cannot express nvcc's C++20 flag (a CUDA target then fails
      # to generate): there .cu files build as C++17, which they are written to
      # accept. The GPU host's CMake 4.x uses C++20.
      if(CMAKE_VERSION VERSION_LESS 3.26)
        set(CMAKE_CUDA_STANDARD 17)
      else()
        set(CMAKE_CUDA_STANDARD 20)
      endif()
      set(CMAKE_CUDA_STANDARD_REQUIRED ON)
      find_package(CUDAToolkit REQUIRED)
      set(PD_HAVE_CUDA ON)
      set(PD_CUDA_FLAGS -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr
          -Xcompiler=-Wall -lineinfo)
    endif()
  endif()
endmacro()

# pd_add_test(NAME name SRCS a.cc ... DEPS lib ... [LABELS l ...] [TIMEOUT s])
# A test executable registered with CTest, linking DEPS (which include its
# harness). Labels: "gpu" needs a GPU, "multi_gpu" needs two, "slow" runs long;
# CI runs everything but gpu/multi_gpu. Default timeout 600 s.
function(pd_add_test)
  cmake_parse_arguments(T "" "NAME;TIMEOUT" "SRCS;DEPS;LABELS" ${ARGN})
  add_executable(${T_NAME} ${T_SRCS})
  target_link_libraries(${T_NAME} PRIVATE ${T_DEPS})
  target_compile_options(${T_NAME} PRIVATE ${PD_CXX_WARNINGS})
  add_test(NAME ${T_NAME} COMMAND ${T_NAME})
  if(NOT T_TIMEOUT)
    set(T_TIMEOUT 600)
  endif()
  set_tests_properties(${T_NAME} PROPERTIES TIMEOUT ${T_TIMEOUT})
  if(T_LABELS)
    set_tests_properties(${T_NAME} PROPERTIES LABELS "${T_LABELS}")
  endif()
endfunction()

# pd_cc_test(...): a GoogleTest unit test (arguments as pd_add_test).
function(pd_cc_test)
  cmake_parse_arguments(T "" "NAME;TIMEOUT" "SRCS;DEPS;LABELS" ${ARGN})
  pd_add_test(NAME ${T_NAME} SRCS ${T_SRCS} TIMEOUT ${T_TIMEOUT} LABELS ${T_LABELS}
              DEPS ${T_DEPS} GTest::gtest GTest::gmock GTest::gtest_main)
endfunction()
