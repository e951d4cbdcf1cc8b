// w8a8_mm: y (M, N) = x (M, K) @ (q * scale[:, None]).T + bias, with x quantized to int8 per row (token) on the
//   way in: symmetric, scale_m = max|x_m| / 127, codes round(x / scale_m) (round half to even, as torch.round), as
//   vLLM quantizes compressed-tensors' int8 dynamic per-token activations. x and y: fp32 or bf16 (y as x); q (N, K)
//   int8 in the layer's own row-major storage (full range [-127, 127]); scale (N,) fp32. Needs AVX-512 VNNI.
//   vpdpbusd multiplies unsigned by signed bytes, 64 per instruction, into exact int32 sums. One side enters shifted
//   to u8 (code + 128), and 128 x (the other side's code sum) comes off after the sum.
//   Fewer than PACKED_ROWS rows (decode, small batches): each accumulator takes 64 inputs of one row and one
//   channel, the weights shifted by one xor per load; rows go R at a time against C channels (R x C = 16
//   accumulators), whose 16 sums are reduced together.
//   More rows (prefill, encoders): rows in groups of 16, quantized straight into an interleaved layout, shifted;
//   each accumulator holds 16 rows x 4 inputs against one channel's 4 codes, broadcast, so a 16 x 16 tile needs
//   no reduction, only a transpose before its epilogue. Each thread interleaves 16 channels' weights at a time.
#include "cpu_common.h"

#include <cstring>
#include <utility>
#include <vector>

namespace {
using namespace miaotui_cpu;

constexpr int64_t RUN = 64;                   // input channels per vpdpbusd
constexpr int64_t MIN_THREAD_MACS = 1 << 19;  // less work per thread costs more in thread start-up than it saves
constexpr int64_t PACKED_ROWS = 64;           // from this many rows on, tiles (below: as fast or faster by rows)
constexpr int64_t MAX_K = 65536;              // 65536 x 255 x 127 < 2**31: the int32 sums cannot overflow

// Sum of each of 16 vectors: lane r of the result = sum of v[r]'s lanes.
inline __m512i sum16(const __m512i* v) {
  __m512i t[8], u[4], w[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: v[2i] at 0 and 2, v[2i + 1] at 1 and 3
    t[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]),
                            _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
  for (int j = 0; j < 4; ++j)  // per 128-bit lane: v[4j] .. v[4j + 3]
    u[j] = _mm512_add_epi32(_mm512_unpacklo_epi64(t[2 * j], t[2 * j + 1]),
                            _mm512_unpackhi_epi64(t[2 * j], t[2 * j + 1]));
  for (int j = 0; j < 2; ++j)  // 128-bit lanes: pairs of u[2j] and u[2j + 1] summed
    w[j] = _mm512_add_epi32(_mm512_shuffle_i32x4(u[2 * j], u[2 * j + 1], 0x88),
                            _mm512_shuffle_i32x4(u[2 * j], u[2 * j + 1], 0xDD));
  return _mm512_add_epi32(_mm512_shuffle_i32x4(w[0], w[1], 0x88), _mm512_shuffle_i32x4(w[0], w[1], 0xDD));
}

// 16 values of x at p (fewer under mask), as floats.
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const at::BFloat16* p, __mmask16 m) {
  return bf16x16_to_float(_mm256_maskz_loadu_epi16(m, reinterpret_cast<const uint16_t*>(p)));
}

inline void store16(float* p, __mmask16 k, __m512 v) { _mm512_mask_storeu_ps(p, k, v); }
inline void store16(at::BFloat16* p, __mmask16 k, __m512 v) {
  _mm256_mask_storeu_epi16(p, k, (__m256i)_mm512_cvtneps_pbh(v));  // round half to even, as c10::BFloat16
}

inline __mmask64 mask64(int64_t left) { return left >= RUN ? ~__mmask64(0) : (__mmask64(1) << left) - 1; }

inline __mmask16 mask16(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
}

// Row x (K,) -> its codes, returning its scale and the sum of its codes in *sum. Row-major (PACKED false): xq (Kp,)
// int8, zero past K. Packed (rows in groups of 16, K a multiple of 4): xq points to the row's first quad in its
// group's block (K/4, 16, 4) and receives codes + 128 as u8, quad j at byte 64 j.
template <bool PACKED, typename T>
float quantize_row(const T* x, int64_t K, int64_t Kp, int8_t* xq, int32_t* sum) {
  __m512 peak = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) peak = _mm512_max_ps(peak, _mm512_abs_ps(load16(x + k, mask16(K - k))));
  const float scale = _mm512_reduce_max_ps(peak) / 127.0f;
  const __m512 s = _mm512_set1_ps(scale > 0 ? scale : 1.0f);  // an all-zero row: codes 0
  __m512i total = _mm512_setzero_si512();
  for (int64_t k = 0; k < (PACKED ? K : Kp); k += 16) {
    const __m512i q = _mm512_max_epi32(_mm512_set1_epi32(-127), _mm512_min_epi32(_mm512_set1_epi32(127),
        _mm512_cvtps_epi32(_mm512_div_ps(load16(x + k, mask16(K - k)), s))));  // round half to even
    total = _mm512_add_epi32(total, q);
    const __m128i codes = _mm512_cvtepi32_epi8(q);
    if constexpr (PACKED) {
      alignas(16) int32_t quads[4];
      _mm_store_si128((__m128i*)quads, _mm_xor_si128(codes, _mm_set1_epi8(char(0x80))));
      for (int64_t j = 0; j < std::min<int64_t>(4, (K - k) / 4); ++j) std::memcpy(xq + (k / 4 + j) * 64, quads + j, 4);
    } else {
      _mm_storeu_si128((__m128i*)(xq + k), codes);
    }
  }
  *sum = _mm512_reduce_add_epi32(total);
  return scale;
}

// The sum of each weight row's codes: (N,) int32.
void weight_sums(const int8_t* q, int64_t K, int32_t* out, int64_t n0, int64_t n1) {
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t n = n0; n < n1; ++n) {
    __m512i acc = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; k += RUN) {
      const __mmask64 mk = mask64(K - k);
      acc = _mm512_dpbusd_epi32(acc, ones, _mm512_maskz_loadu_epi8(mk, q + n * K + k));
    }
    out[n] = _mm512_reduce_add_epi32(acc);
  }
}

// 16 vectors transposed in place: lane j of v[i] moves to lane i of v[j].
inline void transpose16(__m512i* v) {
  __m512i a[16], b[16];
  for (int i = 0; i < 16; i += 2) {
    a[i] = _mm512_unpacklo_epi32(v[i], v[i + 1]);
    a[i + 1] = _mm512_unpackhi_epi32(v[i], v[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // b[i + s], 128-bit lane L: element 4L + s of v[i .. i + 3]
    b[i] = _mm512_unpacklo_epi64(a[i], a[i + 2]);
    b[i + 1] = _mm512_unpackhi_epi64(a[i], a[i + 2]);
    b[i + 2] = _mm512_unpacklo_epi64(a[i + 1], a[i + 3]);
    b[i + 3] = _mm512_unpackhi_epi64(a[i + 1], a[i + 3]);
  }
  for (int s = 0; s < 4; ++s) {
    a[s] = _mm512_shuffle_i32x4(b[s], b[4 + s], 0x88);
    a[4 + s] = _mm512_shuffle_i32x4(b[s], b[4 + s], 0xDD);
    a[8 + s] = _mm512_shuffle_i32x4(b[8 + s], b[12 + s], 0x88);
    a[12 + s] = _mm512_shuffle_i32x4(b[8 + s], b[12 + s], 0xDD);
  }
  for (int s = 0; s < 4; ++s) {
    v[s] = _mm512_shuffle_i32x4(a[s], a[8 + s], 0x88);
    v[8 + s] = _mm512_shuffle_i32x4(a[s], a[8 + s], 0xDD);
    v[4 + s] = _mm512_shuffle_i32x4(a[4 + s], a[12 + s], 0x88);
    v[12 + s] = _mm512_shuffle_i32x4(a[4 + s], a[12 + s], 0xDD);
  }
}

// f(0), ..., f(N - 1) with compile-time indices: arrays of accumulators indexed by them stay in registers
template <typename F, int... I>
inline void unroll(F&& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
template <int N, typename F>
inline void unroll(F&& f) {
  unroll(f, std::make_integer_sequence<int, N>{});
}

// One call's operands. Rows [0, packed) are quantized in groups of 16 (xpk: (packed / 16, K / 4, 16, 4) u8),
// the rest row-major (xq: (M - packed, Kp) int8).
template <typename T>
struct Problem {
  int64_t M, K, N, Kp, packed;
  const int8_t* q;        // (N, K) weight codes
  const float* ws;        // (N,) weight scales
  const int32_t* wsum;    // (N,) sums of weight codes (with packed rows only)
  const T* bias;          // (N,) or null
  const int8_t* xpk;      // packed rows
  const int8_t* xq;       // row-major rows
  const float* xs;        // (M,) activation scales
  const int32_t* xsum;    // (M,) sums of activation codes
  T* y;                   // (M, N)
};

// Rows [m, m + R) (row-major) against channels [n, n + C) (those past N repeat N - 1, not stored). Each
// accumulator sums 16 lanes; the 16 are reduced together.
template <int R, int C, typename T>
void block(const Problem<T>& p, int64_t m, int64_t n) {
  static_assert(R * C == 16, "16 accumulators, reduced together");
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  const int8_t* rows[C];
  for (int j = 0; j < C; ++j) rows[j] = p.q + std::min(n + j, p.N - 1) * p.K;
  const int8_t* xr = p.xq + (m - p.packed) * p.Kp;
  __m512i acc[16];
  unroll<16>([&](auto i) { acc[i] = _mm512_setzero_si512(); });
  for (int64_t k = 0; k < p.Kp; k += RUN) {
    const __mmask64 mk = mask64(p.K - k);
    __m512i w[C];
    unroll<C>([&](auto j) { w[j] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mk, rows[j] + k), flip); });  // q + 128
    unroll<R>([&](auto i) {
      const __m512i xv = _mm512_loadu_si512(xr + i * p.Kp + k);
      unroll<C>([&](auto j) { acc[i * C + j] = _mm512_dpbusd_epi32(acc[i * C + j], w[j], xv); });
    });
  }
  __m512i done[16];  // a copy: accumulators whose address is taken would live in memory through the loop
  unroll<16>([&](auto i) { done[i] = acc[i]; });
  // lane l = i * C + j: row m + i, channel n + j; y = (sum - 128 * code sum) * x scale * w scale + bias
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i row = _mm512_srli_epi32(lane, C == 4 ? 2 : C == 8 ? 3 : 4);
  const __m512i col = _mm512_and_si512(lane, _mm512_set1_epi32(C - 1));
  const __mmask16 cols = mask16(std::min<int64_t>(C, p.N - n));
  const __m512i code_sum = _mm512_permutexvar_epi32(row, _mm512_maskz_loadu_epi32(mask16(R), p.xsum + m));
  __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(sum16(done), _mm512_slli_epi32(code_sum, 7)));
  v = _mm512_mul_ps(v, _mm512_permutexvar_ps(row, _mm512_maskz_loadu_ps(mask16(R), p.xs + m)));
  v = _mm512_mul_ps(v, _mm512_permutexvar_ps(col, _mm512_maskz_loadu_ps(cols, p.ws + n)));
  if (p.bias) v = _mm512_add_ps(v, _mm512_permutexvar_ps(col, load16(p.bias + n, cols)));
  unroll<R>([&](auto i) {  // row i's C lanes rotated to the front
    const __m512i r = _mm512_alignr_epi32(_mm512_castps_si512(v), _mm512_castps_si512(v), i * C);
    store16(p.y + (m + i) * p.N + n, cols, _mm512_castsi512_ps(r));
  });
}

// Channels [n, n + 16) of the weights (those past N repeat N - 1) interleaved as (K / 4, 16, 4) into w: the 4 codes
// of each channel per run of 4 inputs side by side, read by the tiles in order (16 rows of the layer's own layout
// lie K bytes apart, which for K a multiple of 4096 puts them all in one set of the L1 cache).
void interleave(const int8_t* q, int64_t K, int64_t N, int64_t n, int8_t* w) {
  for (int64_t k = 0; k < K; k += RUN) {
    const __mmask64 mk = mask64(K - k);
    __m512i v[16];
    for (int j = 0; j < 16; ++j) v[j] = _mm512_maskz_loadu_epi8(mk, q + std::min(n + j, N - 1) * K + k);
    transpose16(v);  // v[i]: inputs k + 4i .. k + 4i + 3 of the 16 channels
    for (int64_t i = 0; i < std::min<int64_t>(16, (K - k) / 4); ++i) _mm512_storeu_si512(w + (k + 4 * i) * 16, v[i]);
  }
}

// Rows [m, m + 16) (a packed group) against the 16 channels from n interleaved in w (stored up to N): lane r of
// accumulator j sums row m + r with channel n + j, 4 input channels per lane, the weights' broadcast.
template <typename T>
void tile(const Problem<T>& p, int64_t m, int64_t n, const int8_t* w) {
  using word = int32_t __attribute__((may_alias));
  const word* wq = reinterpret_cast<const word*>(w);
  const int8_t* xg = p.xpk + m * p.K;  // the group's (K / 4, 16, 4) block
  __m512i acc[16];
  unroll<16>([&](auto j) { acc[j] = _mm512_setzero_si512(); });
  for (int64_t k4 = 0; k4 < p.K / 4; ++k4) {
    const __m512i xv = _mm512_loadu_si512(xg + k4 * 64);  // (16 rows, 4 channels) u8
    unroll<16>([&](auto j) { acc[j] = _mm512_dpbusd_epi32(acc[j], xv, _mm512_set1_epi32(wq[k4 * 16 + j])); });
  }
  __m512i t[16];
  unroll<16>([&](auto j) { t[j] = acc[j]; });
  transpose16(t);  // t[r]: row m + r, lane j: channel n + j
  // y = (sum - 128 * weight code sum) * x scale * w scale + bias
  const __mmask16 cols = mask16(p.N - n);
  const __m512i shift = _mm512_slli_epi32(_mm512_maskz_loadu_epi32(cols, p.wsum + n), 7);
  const __m512 ws = _mm512_maskz_loadu_ps(cols, p.ws + n);
  const __m512 b = p.bias ? load16(p.bias + n, cols) : _mm512_setzero_ps();
  for (int r = 0; r < 16; ++r) {
    __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(t[r], shift)), _mm512_set1_ps(p.xs[m + r]));
    v = _mm512_mul_ps(v, ws);
    store16(p.y + (m + r) * p.N + n, cols, p.bias ? _mm512_add_ps(v, b) : v);
  }
}

// The row-major rows against channels [n0, n1): four rows against 4 channels, then a pair against 8, then one
// against 16.
template <typename T>
void rows(const Problem<T>& p, int64_t n0, int64_t n1) {
  int64_t m = p.packed;
  for (; m + 4 <= p.M; m += 4)
    for (int64_t n = n0; n < n1; n += 4) block<4, 4>(p, m, n);
  if (p.M - m >= 2) {
    for (int64_t n = n0; n < n1; n += 8) block<2, 8>(p, m, n);
    m += 2;
  }
  if (m < p.M)
    for (int64_t n = n0; n < n1; n += 16) block<1, 16>(p, m, n);
}

// Output channels [n0, n1) (n1 - n0 a multiple of 16 unless n1 = N) for every row. Packed rows: 16 x 16 tiles, every
// group against one interleaved copy of 16 channels' weights. The rest row-major.
template <typename T>
void gemm(const Problem<T>& p, int64_t n0, int64_t n1) {
  if (p.packed) {
    std::vector<int8_t> w(16 * p.K);
    for (int64_t n = n0; n < n1; n += 16) {
      interleave(p.q, p.K, p.N, n, w.data());
      for (int64_t m = 0; m < p.packed; m += 16) tile(p, m, n, w.data());
    }
  }
  rows(p, n0, n1);
}

template <typename T>
void run(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, const at::Tensor& bias, at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0), Kp = (K + RUN - 1) / RUN * RUN;
  const int64_t packed = K % 4 || M < PACKED_ROWS ? 0 : M / 16 * 16;
  at::Tensor xpk = at::empty({packed * K}, q.options());
  at::Tensor xq = at::empty({(M - packed) * Kp}, q.options());
  at::Tensor xs = at::empty({M}, scale.options());
  at::Tensor xsum = at::empty({M}, scale.options().dtype(at::kInt));
  at::Tensor wsum = at::empty({packed ? N : 0}, scale.options().dtype(at::kInt));
  Problem<T> p{M, K, N, Kp, packed, q.data_ptr<int8_t>(), scale.data_ptr<float>(), wsum.data_ptr<int32_t>(),
               bias.defined() ? bias.data_ptr<T>() : nullptr, xpk.data_ptr<int8_t>(), xq.data_ptr<int8_t>(),
               xs.data_ptr<float>(), xsum.data_ptr<int32_t>(), y.data_ptr<T>()};
  const T* xp = x.data_ptr<T>();
  float* xsp = xs.data_ptr<float>();
  int32_t* sump = xsum.data_ptr<int32_t>();
  int8_t *xpkp = xpk.data_ptr<int8_t>(), *xqp = xq.data_ptr<int8_t>();
  at::parallel_for(0, M, std::max<int64_t>(1, MIN_THREAD_MACS / (64 * K)), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      xsp[m] = m < packed ? quantize_row<true>(xp + m * K, K, Kp, xpkp + (m / 16 * K * 4 + m % 16) * 4, sump + m)
                          : quantize_row<false>(xp + m * K, K, Kp, xqp + (m - packed) * Kp, sump + m);
  });
  if (packed)
    at::parallel_for(0, N, std::max<int64_t>(1, MIN_THREAD_MACS / (64 * K)), [&](int64_t n0, int64_t n1) {
      weight_sums(p.q, K, wsum.data_ptr<int32_t>(), n0, n1);
    });
  const int64_t grain = std::max<int64_t>(1, (MIN_THREAD_MACS / (M * K) + TILE - 1) / TILE);
  at::parallel_for(0, (N + TILE - 1) / TILE, grain,
                   [&](int64_t t0, int64_t t1) { gemm(p, t0 * TILE, std::min(N, t1 * TILE)); });
}

}  // namespace

namespace miaotui_cpu {

at::Tensor w8a8_mm(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                   const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be (M, K) contiguous");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be fp32 or bf16");
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous(), "q must be (N, K) int8");
  TORCH_CHECK(x.size(1) == q.size(1), "x has ", x.size(1), " input channels, the weight ", q.size(1));
  TORCH_CHECK(x.size(1) > 0 && x.size(1) <= MAX_K, "w8a8_mm sums 1 to ", MAX_K, " input channels in int32");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == q.size(0),
              "scale must be (N,) fp32");
  at::Tensor b;
  if (bias.has_value()) {
    b = bias->to(x.scalar_type()).contiguous();
    TORCH_CHECK(b.numel() == q.size(0), "bias must be (N,)");
  }
  at::Tensor y = at::empty({x.size(0), q.size(0)}, x.options());
  if (y.numel() == 0) return y;
  if (x.scalar_type() == at::kFloat)
    run<float>(x, q, scale, b, y);
  else
    run<at::BFloat16>(x, q, scale, b, y);
  return y;
}

}  // namespace miaotui_cpu
