// SPDX-License-Identifier: Apache-2.0
// SPDX-FileCopyrightText: Copyright contributors to the vLLM project
//
// Probe for the wgmma GEMM step (NOTES.md): one warpgroup computes
// D (64 x 64, fp32) = A (64 x 16, fp16) B (16 x 64, fp16) with
// wgmma.mma_async m64n64k16, A from registers in the mma.m16n8k16
// A-fragment layout (warp w: rows 16w..16w+15, as the trellis decoder
// produces them) and B from shared memory, K-major, no swizzle, through a
// matrix descriptor. B's 8x8 core matrices (8 n-rows of 16 bytes) are laid
// out two ways and each is read with both assignments of the leading (LBO)
// and stride (SBO) byte offsets; the probe prints the error of each, so one
// H200 run says which encoding is right (expect one 0 per layout).
//   nvcc -O2 -gencode arch=compute_90a,code=sm_90a -o /tmp/wgmma_probe \
//     benchmarks/experiments/wgmma_probe.cu
//   /tmp/wgmma_probe
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <vector>

__device__ uint64_t smem_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  // Start address, LBO and SBO in 16-byte units; base offset 0; no swizzle.
  return (uint64_t)((addr >> 4) & 0x3FFF) |
         ((uint64_t)((lbo >> 4) & 0x3FFF) << 16) |
         ((uint64_t)((sbo >> 4) & 0x3FFF) << 32);
}

// layout 0: core matrix (n-chunk nc, k-chunk kc) at (nc * 2 + kc) * 128 bytes;
// layout 1: at (kc * 8 + nc) * 128 bytes.
__global__ void probe(const __half* A, const __half* B, float* D, int layout,
                      uint32_t lbo, uint32_t sbo) {
  __shared__ __align__(128) __half Bs[16 * 64];
  const int tid = threadIdx.x;
  for (int i = tid; i < 16 * 64; i += 128) {
    const int k = i / 64, n = i % 64;
    const int core = layout == 0 ? (n / 8) * 2 + k / 8 : (k / 8) * 8 + n / 8;
    Bs[core * 64 + (n % 8) * 8 + k % 8] = B[k * 64 + n];
  }
  // wgmma reads shared memory through the async proxy: order the generic
  // stores above before it.
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  __syncthreads();
  const int warp = tid / 32, lane = tid % 32, g = lane / 4, q = lane % 4;
  const int r0 = warp * 16 + g;
  auto pack = [&](int r, int c) {
    __half2 h = __halves2half2(A[r * 16 + c], A[r * 16 + c + 1]);
    return *reinterpret_cast<uint32_t*>(&h);
  };
  const uint32_t a0 = pack(r0, 2 * q), a1 = pack(r0 + 8, 2 * q);
  const uint32_t a2 = pack(r0, 2 * q + 8), a3 = pack(r0 + 8, 2 * q + 8);
  float d[32];
  for (int i = 0; i < 32; ++i) d[i] = 0.f;
  const uint64_t desc =
      smem_desc(static_cast<uint32_t>(__cvta_generic_to_shared(Bs)), lbo, sbo);
  const int accumulate = 0;
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0, %1, %2, %3, %4, "
      "%5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "
      "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "{%32, %33, %34, %35}, %36, p, 1, 1, 0;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]),
        "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]),
        "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]),
        "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]),
        "+f"(d[31])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc), "r"(accumulate));
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
  // D fragment: d[4j .. 4j+3] = (g, 8j+2q), (g, 8j+2q+1), (g+8, ..), (g+8, ..).
  for (int j = 0; j < 8; ++j) {
    D[r0 * 64 + 8 * j + 2 * q] = d[4 * j];
    D[r0 * 64 + 8 * j + 2 * q + 1] = d[4 * j + 1];
    D[(r0 + 8) * 64 + 8 * j + 2 * q] = d[4 * j + 2];
    D[(r0 + 8) * 64 + 8 * j + 2 * q + 1] = d[4 * j + 3];
  }
}

int main() {
  std::vector<__half> a(64 * 16), b(16 * 64);
  std::vector<float> af(64 * 16), bf(16 * 64), ref(64 * 64, 0.f), out(64 * 64);
  unsigned s = 1;
  auto rnd = [&]() {
    s = s * 1103515245u + 12345u;
    return (int)((s >> 16) % 7) - 3;
  };
  for (int i = 0; i < 64 * 16; ++i)
    af[i] = (float)rnd(), a[i] = __float2half(af[i]);
  for (int i = 0; i < 16 * 64; ++i)
    bf[i] = (float)rnd(), b[i] = __float2half(bf[i]);
  for (int m = 0; m < 64; ++m)
    for (int n = 0; n < 64; ++n)
      for (int k = 0; k < 16; ++k)
        ref[m * 64 + n] += af[m * 16 + k] * bf[k * 64 + n];
  __half *dA, *dB;
  float* dD;
  cudaMalloc(&dA, a.size() * 2);
  cudaMalloc(&dB, b.size() * 2);
  cudaMalloc(&dD, out.size() * 4);
  cudaMemcpy(dA, a.data(), a.size() * 2, cudaMemcpyHostToDevice);
  cudaMemcpy(dB, b.data(), b.size() * 2, cudaMemcpyHostToDevice);
  const struct {
    int layout;
    uint32_t lbo, sbo;
  } cases[] = {{0, 128, 256}, {0, 256, 128}, {1, 1024, 128}, {1, 128, 1024}};
  for (const auto& c : cases) {
    cudaMemset(dD, 0, out.size() * 4);
    probe<<<1, 128>>>(dA, dB, dD, c.layout, c.lbo, c.sbo);
    const cudaError_t err = cudaDeviceSynchronize();
    cudaMemcpy(out.data(), dD, out.size() * 4, cudaMemcpyDeviceToHost);
    double e = 0;
    int first = -1;
    for (int i = 0; i < 64 * 64; ++i) {
      e = fmax(e, fabs(out[i] - ref[i]));
      if (first < 0 && out[i] != ref[i]) first = i;
    }
    printf("layout %d LBO %4u SBO %4u: %s, max |D - ref| = %g", c.layout, c.lbo,
           c.sbo, cudaGetErrorString(err), e);
    if (first >= 0)
      printf(" (first at m=%d n=%d: %g vs %g)", first / 64, first % 64,
             out[first], ref[first]);
    printf("\n");
  }
  return 0;
}
