# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
#
# The QTIP trellis-decode kernels (csrc/libtorch_stable/quantization/qtip), on the stable
# libtorch ABI: part of _C_stable_libtorch in vLLM's build, or the extension
# vllm._qtip_C in the standalone build (QTIP_STANDALONE).
#
# Included by vLLM's top-level CMakeLists.txt before _C_stable_libtorch is
# defined, and by the standalone build of the qtip-vllm project.
# QTIP_EXTRA_INCLUDE_DIRS lets the standalone build point at the tree's csrc/.

# mma.sync.m16n8k16 with fp16 operands needs SM 8.0 or newer; Hopper builds
# for sm_90a, whose wgmma the prefill GEMM uses (qtip_prefill.cu).
if(VLLM_GPU_LANG STREQUAL "CUDA")
  cuda_archs_loose_intersection(QTIP_ARCHS
    "8.0;8.6;8.7;8.9;9.0a;10.0;11.0;12.0" "${CUDA_ARCHS}")
else()
  set(QTIP_ARCHS)
endif()

if(QTIP_ARCHS)
  file(GLOB QTIP_SOURCES CONFIGURE_DEPENDS
    "${CMAKE_CURRENT_SOURCE_DIR}/csrc/libtorch_stable/quantization/qtip/*.cu"
    "${CMAKE_CURRENT_SOURCE_DIR}/csrc/libtorch_stable/quantization/qtip/*.cpp")
  set_gencode_flags_for_srcs(SRCS "${QTIP_SOURCES}" CUDA_ARCHS "${QTIP_ARCHS}")
  set_property(SOURCE ${QTIP_SOURCES} APPEND PROPERTY COMPILE_OPTIONS
    $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr -O3>)
  if("9.0a" IN_LIST QTIP_ARCHS)
    set_property(SOURCE ${QTIP_SOURCES} APPEND PROPERTY COMPILE_DEFINITIONS
      QTIP_SM90A)
  endif()
  if(QTIP_STANDALONE)
    # The qtip-vllm project's build on a precompiled vLLM wheel, whose
    # _C_stable_libtorch lacks these ops: the same sources as their own
    # extension vllm._qtip_C.
    message(STATUS "Building _qtip_C for archs: ${QTIP_ARCHS}")
    define_extension_target(
      _qtip_C
      DESTINATION vllm
      LANGUAGE ${VLLM_GPU_LANG}
      SOURCES ${QTIP_SOURCES}
      COMPILE_FLAGS ${VLLM_GPU_FLAGS}
      ARCHITECTURES ${VLLM_GPU_ARCHES}
      INCLUDE_DIRECTORIES ${QTIP_EXTRA_INCLUDE_DIRS}
      USE_SABI 3
      WITH_SOABI)
    # The stable libtorch ABI of torch 2.11, as _C_stable_libtorch.
    target_compile_definitions(_qtip_C PRIVATE
      TORCH_TARGET_VERSION=0x020B000000000000ULL USE_CUDA
      QTIP_STANDALONE_EXTENSION)
  else()
    # vLLM's own build: part of _C_stable_libtorch.
    message(STATUS "Adding the QTIP kernels to _C_stable_libtorch for archs: "
      "${QTIP_ARCHS}")
    list(APPEND VLLM_STABLE_EXT_SRC ${QTIP_SOURCES})
  endif()
elseif(QTIP_STANDALONE)
  message(STATUS "Not building _qtip_C: no CUDA arch >= 8.0 in '${CUDA_ARCHS}'")
  add_custom_target(_qtip_C)
endif()
