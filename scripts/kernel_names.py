# SPDX-License-Identifier: Apache-2.0
"""Name substrings of the QTIP transform kernels, which bench_kernels.py and
profile_decode.py count as one kind when they sort a profile's kernels."""

QTIP_TRANSFORM_KERNELS = (
    "qtip_hadamard_kernel",
    "qtip_sylvester4096_kernel",
    "qtip_hk512_kernel",
    "qtip_hk64_",  # qtip_hk64_kernel, qtip_hk64_in_kernel
)
