# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""The QTIP ops are registered and every op has a working fake (meta) kernel.

Runs without a GPU: the fakes are what torch.compile traces, so they must give
the real ops' shapes and dtypes. The real kernels are checked against the
reference codec in test_qtip.py (GPU).

Run `pytest tests/kernels/quantization/test_qtip_fake.py`.
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from vllm import _qtip_ops as ops

pytestmark = [
    pytest.mark.skipif(
        not hasattr(torch.ops._qtip_C, "qtip_linear"),
        reason="the QTIP ops are not built (_C_stable_libtorch or vllm._qtip_C)",
    ),
    # Fake tensors only: nothing to clean up between tests.
    pytest.mark.skip_global_cleanup,
]

OPS = ("qtip_gemm", "qtip_decode", "qtip_hadamard", "qtip_linear")


def test_every_op_is_registered_with_a_fake():
    for name in OPS:
        op = getattr(torch.ops._qtip_C, name).default
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CUDA"), name
        # register_fake installs a Meta kernel; without it torch.compile
        # cannot trace the op.
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "Meta"), name


@pytest.mark.parametrize("K", [2, 3, 4])
@pytest.mark.parametrize("batch", [1, 17, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fakes_give_the_real_shapes(K, batch, dtype):
    m, n = 1536, 576
    with FakeTensorMode():
        x = torch.empty(batch, n, dtype=dtype, device="cuda")
        trellis = torch.empty(
            m // 32, n // 32, 64 * K, dtype=torch.int16, device="cuda"
        )
        tlut = torch.empty(512, 2, dtype=torch.float16, device="cuda")
        su = torch.empty(n, dtype=torch.float32, device="cuda")
        sv = torch.empty(m, dtype=torch.float32, device="cuda")
        had_in = torch.empty(36, 36, dtype=torch.float32, device="cuda")
        had_out = torch.empty(12, 12, dtype=torch.float32, device="cuda")

        y = ops.qtip_matmul(x, trellis, tlut, su, sv, had_in, had_out, K)
        assert (y.shape, y.dtype, y.device.type) == ((batch, m), dtype, "cuda")

        acc = ops.qtip_gemm(x.half(), trellis, tlut, m, K)
        assert (acc.shape, acc.dtype) == ((batch, m), torch.float32)

        w_hat = ops.qtip_decode(trellis, tlut, m, n, K)
        assert (w_hat.shape, w_hat.dtype) == ((m, n), torch.float16)

        h = ops.qtip_hadamard(x, had_in, transpose=True, out_dtype=torch.float16)
        assert (h.shape, h.dtype) == ((batch, n), torch.float16)

        # A fused q/k/v layer in one call: one input copy per shard.
        rows = [m, 256, 256]
        fused = torch.empty(sum(rows) * n * K // 16, dtype=torch.int16, device="cuda")
        tluts = torch.empty(3, 512, 2, dtype=torch.float16, device="cuda")
        su3 = torch.empty(3, n, dtype=torch.float32, device="cuda")
        sv3 = torch.empty(sum(rows), dtype=torch.float32, device="cuda")
        y = ops.qtip_matmul(x, fused, tluts, su3, sv3, had_in, None, K, shard_rows=rows)
        assert (y.shape, y.dtype) == ((batch, sum(rows)), dtype)
        copies = torch.ops._qtip_C.qtip_hadamard(
            x, su3, None, had_in, True, [n], [n], 1.0, torch.float16
        )
        assert copies.shape == (3, batch, n)


def test_wrapper_rejects_a_truncated_trellis():
    m, n, K = 64, 64, 2
    with FakeTensorMode():
        x = torch.empty(1, n, dtype=torch.float16, device="cuda")
        trellis = torch.empty(m * n * K // 16 - 1, dtype=torch.int16, device="cuda")
        tlut = torch.empty(512, 2, dtype=torch.float16, device="cuda")
        with pytest.raises(
            ValueError, match=r"trellis has shape .* expected m\*n\*K/16"
        ):
            ops.qtip_gemm(x, trellis, tlut, m, K)


# Shared memory per block of an H100 (227 KiB) and of an sm_86/89 GPU
# (99 KiB): a 28672-wide row (K=28) fits the first only.
@pytest.mark.parametrize("smem_bytes, fits_28672", [(232448, True), (101376, False)])
def test_hadamard_block_limits(monkeypatch, smem_bytes, fits_28672):
    props = type("Props", (), {"shared_memory_per_block_optin": smem_bytes})
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    assert ops.qtip_hadamard_supported(4096, 1, "cuda")
    assert ops.qtip_hadamard_supported(576, 36, "cuda")
    assert ops.qtip_hadamard_supported(28672, 28, "cuda") is fits_28672
    assert not ops.qtip_hadamard_supported(172 * 4, 172, "cuda")  # 2**a < 8
