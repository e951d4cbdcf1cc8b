// int8_mm: y (M, N) bf16 = x (M, K) bf16 @ (q * scale[:, None]).T, q (N, K) int8 in the layer's own row-major
//   storage (no repacking), scale (N,) bf16. Read as 16-bit words, each word holds the codes of two neighbouring
//   input channels. A code q = 16 * high + low: its low nibble (0..15) and its high nibble (signed, times 16)
//   become bf16 by one table lookup each (vpermw), exact, and meet the activations of their channel in
//   vdpbf16ps; x is split once per call into even and odd channels per run of 64 so that each word lines up
//   with its two channels. Four accumulators per row of x keep the multiply-adds independent. Rows of x go in
//   passes of up to 4 over a tile of 16 output channels held in cache.
#include "cpu_common.h"

namespace {
using namespace miaotui_cpu;

constexpr int64_t RUN = 64;      // input channels per 64-byte load
constexpr int64_t MAX_ROWS = 4;  // rows of x per pass over a tile of weights

template <int M>
void rows(const uint16_t* xd, int64_t K, const uint8_t* q, const uint16_t* scale, uint16_t* y, int64_t N,
          int64_t n0, int64_t n1) {
  const __m512i low = nibble_table([](int v) { return float(v); });
  const __m512i high = nibble_table([](int v) { return float(16 * (v < 8 ? v : v - 16)); });
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* qn = q + n * K;
    __m512 acc[M][4];
    for (int m = 0; m < M; ++m)
      for (int i = 0; i < 4; ++i) acc[m][i] = _mm512_setzero_ps();
    for (int64_t c = 0; c < K / RUN; ++c) {
      _mm_prefetch((const char*)qn + c * RUN + PREFETCH, _MM_HINT_T0);
      const __m512i w = _mm512_loadu_si512(qn + c * RUN);  // word j: channels 2j (low byte), 2j + 1
      const __m512bh even_low = lookup(w, low), even_high = lookup(_mm512_srli_epi16(w, 4), high);
      const __m512bh odd_low = lookup(_mm512_srli_epi16(w, 8), low), odd_high = lookup(_mm512_srli_epi16(w, 12), high);
      for (int m = 0; m < M; ++m) {
        const uint16_t* xr = xd + m * K + c * RUN;
        const __m512bh even = (__m512bh)_mm512_loadu_si512(xr), odd = (__m512bh)_mm512_loadu_si512(xr + 32);
        acc[m][0] = _mm512_dpbf16_ps(acc[m][0], even_low, even);
        acc[m][1] = _mm512_dpbf16_ps(acc[m][1], even_high, even);
        acc[m][2] = _mm512_dpbf16_ps(acc[m][2], odd_low, odd);
        acc[m][3] = _mm512_dpbf16_ps(acc[m][3], odd_high, odd);
      }
    }
    const float s = bf16_to_float(scale[n]);
    for (int m = 0; m < M; ++m) {
      const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]), _mm512_add_ps(acc[m][2], acc[m][3]));
      y[m * N + n] = c10::BFloat16(_mm512_reduce_add_ps(sum) * s).x;
    }
  }
}

void rows_any(int64_t m, const uint16_t* xd, int64_t K, const uint8_t* q, const uint16_t* scale, uint16_t* y,
              int64_t N, int64_t n0, int64_t n1) {
  switch (m) {
    case 1: return rows<1>(xd, K, q, scale, y, N, n0, n1);
    case 2: return rows<2>(xd, K, q, scale, y, N, n0, n1);
    case 3: return rows<3>(xd, K, q, scale, y, N, n0, n1);
    default: return rows<4>(xd, K, q, scale, y, N, n0, n1);
  }
}

void check_weights(const at::Tensor& q, const at::Tensor& scale) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous(), "q must be (N, K) int8");
  TORCH_CHECK(q.size(1) % RUN == 0, "K must be a multiple of 64");
  TORCH_CHECK(scale.scalar_type() == at::kBFloat16 && scale.is_contiguous() && scale.numel() == q.size(0),
              "scale must be (N,) bf16");
}

}  // namespace

namespace miaotui_cpu {

at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale) {
  check_weights(q, scale);
  check_x(x, q.size(1));
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor xd = at::empty({M, K}, x.options());  // per run of 64: the even channels, then the odd ones
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  uint16_t* xdp = reinterpret_cast<uint16_t*>(xd.data_ptr<at::BFloat16>());
  for (int64_t r = 0; r < M * K / RUN; ++r)
    for (int64_t j = 0; j < RUN / 2; ++j) {
      xdp[r * RUN + j] = xp[r * RUN + 2 * j];
      xdp[r * RUN + RUN / 2 + j] = xp[r * RUN + 2 * j + 1];
    }
  const uint8_t* qp = reinterpret_cast<const uint8_t*>(q.data_ptr<int8_t>());
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::BFloat16>());
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  at::parallel_for(0, N, grain_rows(K), [&](int64_t n0, int64_t n1) {
    for (int64_t t0 = n0; t0 < n1; t0 += TILE) {  // a tile of output channels stays in cache over all rows
      const int64_t t1 = std::min(n1, t0 + TILE);
      for (int64_t m0 = 0; m0 < M; m0 += MAX_ROWS)
        rows_any(std::min(MAX_ROWS, M - m0), xdp + m0 * K, K, qp, sp, yp + m0 * N, N, t0, t1);
    }
  });
  return y;
}

// The bf16 weights (N, K) q * scale, rounded once (for many rows, where a bf16 matmul wins).
at::Tensor int8_dequantize(const at::Tensor& q, const at::Tensor& scale) {
  check_weights(q, scale);
  const int64_t N = q.size(0), K = q.size(1);
  at::Tensor out = at::empty({N, K}, scale.options());
  const int8_t* qp = q.data_ptr<int8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::BFloat16>());
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, N, grain_rows(K), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const __m512 s = _mm512_set1_ps(bf16_to_float(sp[n]));
      for (int64_t k = 0; k < K; k += 16) {
        const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(qp + n * K + k))));
        _mm256_storeu_si256((__m256i*)(op + n * K + k), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(v, s)));
      }
    }
  });
  return out;
}

}  // namespace miaotui_cpu
