// Shared by miaotui's CPU kernels (x86 with AVX-512 BF16), built on first use by miaotui/quantize/cpu_kernels.py:
// the operators (registered in cpu_ops.cpp) and the helpers of cpu_int4.cpp, cpu_int8.cpp and cpu_w8a8.cpp.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace miaotui_cpu {

constexpr int64_t TILE = 16;        // output channels a thread takes at a time
constexpr int64_t PREFETCH = 4096;  // bytes ahead of a weight stream's reads (one stream alone does not keep DRAM busy)
constexpr int64_t MIN_THREAD_BYTES = 128 * 1024;  // less weight per thread costs more in thread start-up than it saves

// Output channels per thread at least, a multiple of TILE: small layers run on one thread.
inline int64_t grain_rows(int64_t row_bytes) {
  const int64_t rows = (MIN_THREAD_BYTES + row_bytes - 1) / row_bytes;
  return std::max<int64_t>(TILE, (rows + TILE - 1) / TILE * TILE);
}

// int4 group-wise (cpu_int4.cpp): x (M, K) bf16, w (N, K/2) packed, sz (K/G, 2, N) bf16 scales and zeros.
at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sz, int64_t group_size);
at::Tensor int4_dequantize(const at::Tensor& w, const at::Tensor& sz, int64_t group_size);
// int8 per output channel (cpu_int8.cpp): x (M, K) bf16, q (N, K) int8, scale (N,) bf16.
at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale);
at::Tensor int8_dequantize(const at::Tensor& q, const at::Tensor& scale);
// int8 x int8 with per-token activation scales (cpu_w8a8.cpp): x (M, K) fp32/bf16, q (N, K) int8, scale (N,) fp32.
at::Tensor w8a8_mm(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                   const c10::optional<at::Tensor>& bias);

inline void check_x(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(), "x must be (M, K) bf16");
  TORCH_CHECK(x.size(1) == K, "x has ", x.size(1), " input channels, the weight ", K);
}

inline float bf16_to_float(uint16_t v) { return float(c10::BFloat16(v, c10::BFloat16::from_bits())); }

// 32 bf16 words: word i = bf16(f(i & 15)); vpermw reads only an index's low 5 bits, so a nibble needs no mask.
template <typename F>
inline __m512i nibble_table(F f) {
  alignas(64) uint16_t t[32];
  for (int i = 0; i < 32; ++i) t[i] = c10::BFloat16(f(i & 15)).x;
  return _mm512_load_si512(t);
}

inline __m512bh lookup(__m512i idx, __m512i table) { return (__m512bh)_mm512_permutexvar_epi16(idx, table); }

inline __m512 bf16x16_to_float(__m256i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

inline __m512 load16_bf16(const uint16_t* p) { return bf16x16_to_float(_mm256_loadu_si256((const __m256i*)p)); }

}  // namespace miaotui_cpu
