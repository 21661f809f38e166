# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
#
# vllm._qtip_C: the QTIP trellis-decode kernels (csrc/quantization/qtip).
#
# Included by vLLM's top-level CMakeLists.txt, and by the standalone build of
# the qtip-vllm project, after CUDA_ARCHS and VLLM_GPU_FLAGS are set up.
# QTIP_EXTRA_INCLUDE_DIRS lets the standalone build point at the tree's csrc/.

# mma.sync.m16n8k16 with fp16 operands needs SM 8.0 or newer.
if(VLLM_GPU_LANG STREQUAL "CUDA")
  cuda_archs_loose_intersection(QTIP_ARCHS
    "8.0;8.6;8.7;8.9;9.0;10.0;11.0;12.0" "${CUDA_ARCHS}")
else()
  set(QTIP_ARCHS)
endif()

if(QTIP_ARCHS)
  file(GLOB QTIP_SOURCES CONFIGURE_DEPENDS
    "${CMAKE_CURRENT_SOURCE_DIR}/csrc/quantization/qtip/*.cu"
    "${CMAKE_CURRENT_SOURCE_DIR}/csrc/quantization/qtip/*.cpp")
  set_gencode_flags_for_srcs(SRCS "${QTIP_SOURCES}" CUDA_ARCHS "${QTIP_ARCHS}")
  message(STATUS "Building _qtip_C for archs: ${QTIP_ARCHS}")
  # Legacy ATen ops in their own extension (torch.ops._qtip_C), like
  # _qutlass_C: they are not built against the stable libtorch ABI.
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
  set_property(SOURCE ${QTIP_SOURCES} APPEND PROPERTY COMPILE_OPTIONS
    $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr -O3>)
else()
  message(STATUS "Not building _qtip_C: no CUDA arch >= 8.0 in '${CUDA_ARCHS}'")
  add_custom_target(_qtip_C)
endif()
