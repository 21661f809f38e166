# SPDX-License-Identifier: Apache-2.0
"""Launch the QTIP kernels of one Llama-2-7B layer shape for a profiler.

    ncu --kernel-name regex:qtip --launch-skip 3 --launch-count 3 \
        --metrics <list> python scripts/profile_kernels.py --batch 1 --K 2

Runs qtip_matmul (Hadamard in, fused decode GEMM, Hadamard out) a few times
on random data; the profiler picks the launches it measures.
"""

import argparse
import sys
from pathlib import Path

import torch

from vllm import _qtip_ops as ops

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import factor  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--m", type=int, default=4096)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--K", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=4)
    parser.add_argument(
        "--dense-min-rows",
        type=int,
        default=ops.QTIP_DENSE_MIN_ROWS,
        help="rows from which the dense path runs (lower it to profile the "
        "prefill GEMM at row counts the fused GEMM takes)",
    )
    args = parser.parse_args()
    ops.QTIP_DENSE_MIN_ROWS = args.dense_min_rows
    m, n, K = args.m, args.n, args.K
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    trellis = torch.randint(
        -(2**15),
        2**15,
        (m // 32, n // 32, 64 * K),
        dtype=torch.int16,
        device=dev,
        generator=gen,
    )
    tlut = torch.randn(512, 2, device=dev, generator=gen).half()
    su = torch.randn(n, device=dev, generator=gen)
    sv = torch.randn(m, device=dev, generator=gen)
    x = torch.randn(args.batch, n, device=dev, generator=gen).half()
    had_in, had_out = factor(n), factor(m)
    for _ in range(args.iters):
        ops.qtip_matmul(x, trellis, tlut, su, sv, had_in, had_out, K)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
