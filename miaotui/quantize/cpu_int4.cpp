// int4_mm: y (M, N) bf16 = x (M, K) bf16 @ W.T, W int4 group-wise, w = (q - 8) * scale + zero, q in [0, 15].
//   Layout of W (N/16, K/128, 16, 64) uint8: for each tile of 16 output channels, their chunks of 128 input
//   channels one after the other (so a tile streams from memory in one sequential read). A chunk is 64 bytes, read
//   as 32 16-bit words; word j holds the codes of channels j, 32 + j, 64 + j and 96 + j in its four nibbles
//   (lowest first). A nibble becomes a bf16 value (q - 8) by one table lookup (vpermw), and 32 of them meet 32
//   activations in one vdpbf16ps: products exact in fp32, no conversion of x. Scales and zeros: (K/G, 2, N) bf16.
//   16 channels at a time: their group sums are added up together and scaled as one vector, the zeros enter
//   through the group sums of x. Two rows or more go in pairs, each lookup serving both rows: 1.25-1.45x faster
//   than one row at a time over each tile (2 to 16 rows, 2 cores), and memory still delivers a tile once.
#include "cpu_common.h"

namespace {
using namespace miaotui_cpu;

constexpr int64_t SUB = 32;     // K elements per sub-vector: one vdpbf16ps over 32 bf16 pairs
constexpr int64_t CHUNK = 128;  // K elements per 64 packed bytes (4 sub-vectors, one nibble of each word)

inline __m512i code_table() { return nibble_table([](int v) { return float(v - 8); }); }  // q -> q - 8

// Sum of each of 16 vectors: lane r of the result = sum of v[r]'s lanes.
inline __m512 sum16(__m512* v) {
  __m512 t[8], u[4], w[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: rows 2i at 0 and 2, 2i + 1 at 1 and 3
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int j = 0; j < 4; ++j) {  // per 128-bit lane: rows 4j .. 4j + 3
    __m512d c = _mm512_castps_pd(t[2 * j]), d = _mm512_castps_pd(t[2 * j + 1]);
    u[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(c, d)), _mm512_castpd_ps(_mm512_unpackhi_pd(c, d)));
  }
  for (int j = 0; j < 2; ++j)  // 128-bit lanes: pairs of u[2j] and u[2j + 1] summed
    w[j] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * j], u[2 * j + 1], 0x88),
                         _mm512_shuffle_f32x4(u[2 * j], u[2 * j + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88), _mm512_shuffle_f32x4(w[0], w[1], 0xDD));
}

// 8 bf16 values as floats, twice over (lanes 0-7 and 8-15). (A masked 16-value load in its place made a 2-row call
// with weights from memory twice as slow: 110 against 55 us on 3456 x 1280.)
inline __m512 twice8_bf16(const uint16_t* p) {
  const __m256i words = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
  const __m256 v = _mm256_castsi256_ps(_mm256_slli_epi32(words, 16));
  return _mm512_shuffle_f32x4(_mm512_castps256_ps512(v), _mm512_castps256_ps512(v), 0x44);
}

// y (1, N) for one row of x (K,) over tiles of 16 output channels in [n0, n1) (multiples of 16): xs (G,) fp32
// group sums of x, sz (G, 2, N). Each channel keeps one accumulator per group; the 16 are summed together (sum16)
// and scaled as one vector. SUBS = group size / 32.
template <int SUBS>
void tiles_one_row(const uint16_t* x, const float* xs, int64_t K, const uint8_t* w, const uint16_t* sz, uint16_t* y,
                   int64_t N, int64_t n0, int64_t n1) {
  const __m512i table = code_table();
  const int64_t groups = K / (SUB * SUBS);
  for (int64_t t0 = n0; t0 < n1; t0 += TILE) {
    const uint8_t* wt = w + t0 * (K / 2);  // the tile's chunks, in the order they are read
    __m512 total = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      __m512 acc[TILE];
      for (int r = 0; r < TILE; ++r) acc[r] = _mm512_setzero_ps();
#pragma GCC unroll 8
      for (int s = 0; s < SUBS; ++s) {
        const int64_t sv = g * SUBS + s;
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + sv * SUB);
        const int shift = 4 * int(sv & 3);
        for (int r = 0; r < TILE; ++r) {
          const uint8_t* at = wt + ((sv / 4) * TILE + r) * 64;
          if (shift == 0) _mm_prefetch((const char*)at + PREFETCH, _MM_HINT_T0);  // the stream, 4 KB ahead
          __m512i idx = _mm512_srl_epi16(_mm512_loadu_si512(at), _mm_cvtsi32_si128(shift));
          acc[r] = _mm512_dpbf16_ps(acc[r], lookup(idx, table), xv);
        }
      }
      total = _mm512_fmadd_ps(sum16(acc), load16_bf16(sz + 2 * g * N + t0), total);
      total = _mm512_fmadd_ps(load16_bf16(sz + (2 * g + 1) * N + t0), _mm512_set1_ps(xs[g]), total);
    }
    _mm256_storeu_si256((__m256i*)(y + t0), (__m256i)_mm512_cvtneps_pbh(total));
  }
}

// Two rows of x at a time, over a tile in two halves of 8 output channels: each looked-up weight vector meets both
// rows, so lookups are shared (16 accumulators: 8 channels x 2 rows). Per group both halves in turn, so the tile
// is still read in order. One sum16 per group and half gives row a's channels in lanes 0-7, row b's in 8-15.
// For M >= 2; an odd last row is paired with itself. (Four rows over quarter tiles share more lookups but
// measured no faster: the multiply-adds bound it.)
template <int SUBS>
void tiles_row_pairs(int64_t M, const uint16_t* x, const float* xs, int64_t K, const uint8_t* w, const uint16_t* sz,
                     uint16_t* y, int64_t N, int64_t n0, int64_t n1) {
  constexpr int HALF = TILE / 2;
  const __m512i table = code_table();
  const int64_t groups = K / (SUB * SUBS);
  for (int64_t t0 = n0; t0 < n1; t0 += TILE) {
    const uint8_t* wt = w + t0 * (K / 2);  // the tile's chunks, in the order they are read
    for (int64_t a = 0; a < M; a += 2) {
      const int64_t b = std::min(a + 1, M - 1);
      const uint16_t *xa = x + a * K, *xb = x + b * K;
      __m512 total[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
      for (int64_t g = 0; g < groups; ++g) {
        const __m512 xsum = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(xs[a * groups + g]),
                                                 _mm512_set1_ps(xs[b * groups + g]));
        for (int h = 0; h < 2; ++h) {
          __m512 acc[TILE];  // acc[r]: row a, channel r of the half; acc[HALF + r]: row b
          for (int r = 0; r < TILE; ++r) acc[r] = _mm512_setzero_ps();
#pragma GCC unroll 8
          for (int s = 0; s < SUBS; ++s) {
            const int64_t sv = g * SUBS + s;
            const __m512bh va = (__m512bh)_mm512_loadu_si512(xa + sv * SUB);
            const __m512bh vb = (__m512bh)_mm512_loadu_si512(xb + sv * SUB);
            const int shift = 4 * int(sv & 3);
            for (int r = 0; r < HALF; ++r) {
              const uint8_t* at = wt + ((sv / 4) * TILE + h * HALF + r) * 64;
              if (shift == 0 && a == 0) _mm_prefetch((const char*)at + PREFETCH, _MM_HINT_T0);  // 4 KB ahead
              const __m512bh v = lookup(_mm512_srl_epi16(_mm512_loadu_si512(at), _mm_cvtsi32_si128(shift)), table);
              acc[r] = _mm512_dpbf16_ps(acc[r], v, va);
              acc[HALF + r] = _mm512_dpbf16_ps(acc[HALF + r], v, vb);
            }
          }
          const int64_t c0 = t0 + h * HALF;
          const __m512 scale = twice8_bf16(sz + 2 * g * N + c0);
          const __m512 zero = twice8_bf16(sz + (2 * g + 1) * N + c0);
          total[h] = _mm512_fmadd_ps(sum16(acc), scale, total[h]);
          total[h] = _mm512_fmadd_ps(zero, xsum, total[h]);
        }
      }
      for (int h = 0; h < 2; ++h) {
        const __m256i out = (__m256i)_mm512_cvtneps_pbh(total[h]);  // row a's 8 channels, then row b's
        _mm_storeu_si128((__m128i*)(y + a * N + t0 + h * HALF), _mm256_castsi256_si128(out));
        _mm_storeu_si128((__m128i*)(y + b * N + t0 + h * HALF), _mm256_extracti128_si256(out, 1));
      }
    }
  }
}

void check_weights(const at::Tensor& w, const at::Tensor& sz, int64_t group_size) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous(), "w must be (N, K/2) uint8");
  TORCH_CHECK(group_size == 32 || group_size == 64 || group_size == 128 || group_size == 256, "bad group size");
  const int64_t K = w.size(1) * 2, N = w.size(0);
  TORCH_CHECK(K % CHUNK == 0 && N % TILE == 0, "w must have N a multiple of 16 and K of 128");
  TORCH_CHECK(sz.scalar_type() == at::kBFloat16 && sz.is_contiguous() && sz.numel() == N * (K / group_size) * 2,
              "sz must be (K/group_size, 2, N) bf16");
}

}  // namespace

namespace miaotui_cpu {

// x (M, K) bf16 @ dequantized w.T -> (M, N) bf16.
at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sz, int64_t group_size) {
  check_weights(w, sz, group_size);
  check_x(x, w.size(1) * 2);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), groups = K / group_size;
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor xs = at::empty({M, groups}, x.options().dtype(at::kFloat));
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  float* xsp = xs.data_ptr<float>();
  for (int64_t i = 0; i < M * groups; ++i) {
    float s = 0.f;
    for (int64_t k = 0; k < group_size; ++k) s += bf16_to_float(xp[i * group_size + k]);
    xsp[i] = s;
  }
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const uint16_t* szp = reinterpret_cast<const uint16_t*>(sz.data_ptr<at::BFloat16>());
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  const int64_t subs = group_size / SUB;
  at::parallel_for(0, N / TILE, grain_rows(K / 2) / TILE, [&](int64_t b0, int64_t b1) {
    if (M > 1) switch (subs) {  // rows in pairs, sharing lookups
        case 1: return tiles_row_pairs<1>(M, xp, xsp, K, wp, szp, yp, N, TILE * b0, TILE * b1);
        case 2: return tiles_row_pairs<2>(M, xp, xsp, K, wp, szp, yp, N, TILE * b0, TILE * b1);
        case 4: return tiles_row_pairs<4>(M, xp, xsp, K, wp, szp, yp, N, TILE * b0, TILE * b1);
        default: return tiles_row_pairs<8>(M, xp, xsp, K, wp, szp, yp, N, TILE * b0, TILE * b1);
      }
    switch (subs) {
      case 1: return tiles_one_row<1>(xp, xsp, K, wp, szp, yp, N, TILE * b0, TILE * b1);
      case 2: return tiles_one_row<2>(xp, xsp, K, wp, szp, yp, N, TILE * b0, TILE * b1);
      case 4: return tiles_one_row<4>(xp, xsp, K, wp, szp, yp, N, TILE * b0, TILE * b1);
      default: return tiles_one_row<8>(xp, xsp, K, wp, szp, yp, N, TILE * b0, TILE * b1);
    }
  });
  return y;
}

// The bf16 weights (N, K) of w: (q - 8) * scale + zero, rounded once (for many rows, where a bf16 matmul wins).
at::Tensor int4_dequantize(const at::Tensor& w, const at::Tensor& sz, int64_t group_size) {
  check_weights(w, sz, group_size);
  const int64_t N = w.size(0), K = w.size(1) * 2;
  at::Tensor out = at::empty({N, K}, sz.options());
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const uint16_t* szp = reinterpret_cast<const uint16_t*>(sz.data_ptr<at::BFloat16>());
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const __m512i table = code_table();
  at::parallel_for(0, N / TILE, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t c = 0; c < K / CHUNK; ++c)
        for (int64_t r = 0; r < TILE; ++r) {
          const int64_t n = b * TILE + r;
          const __m512i chunk = _mm512_loadu_si512(wp + ((b * (K / CHUNK) + c) * TILE + r) * 64);
          for (int s = 0; s < 4; ++s) {
            const int64_t k = c * CHUNK + s * SUB, g = k / group_size;
            const __m512 scale = _mm512_set1_ps(bf16_to_float(szp[2 * g * N + n]));
            const __m512 zero = _mm512_set1_ps(bf16_to_float(szp[(2 * g + 1) * N + n]));
            const __m512i v = (__m512i)lookup(_mm512_srl_epi16(chunk, _mm_cvtsi32_si128(4 * s)), table);  // q - 8
            const __m512 lo = _mm512_fmadd_ps(bf16x16_to_float(_mm512_castsi512_si256(v)), scale, zero);
            const __m512 hi = _mm512_fmadd_ps(bf16x16_to_float(_mm512_extracti64x4_epi64(v, 1)), scale, zero);
            _mm512_storeu_si512(op + n * K + k, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
          }
        }
  });
  return out;
}

}  // namespace miaotui_cpu
