// xatl::int8_linear: y = (x @ W^T) * scale + bias with int8 weights W (one float32 scale per output
// row), for the decode step on a CPU, where reading the weights is the cost of a token.
//
// The activations are quantised on the fly to int8 in blocks of 32 values along the input, one
// float32 scale per block (llama.cpp's Q8_0 for activations), so that each product is an integer
// dot product of 32 bytes by 32 bytes: with AVX512-VNNI one vpdpbusd per 64 weight bytes, with AVX2
// a pmaddubsw/pmaddwd pair per 32. torch's `_weight_int8pack_mm` multiplies bfloat16 activations
// and is bound by that arithmetic once a batch holds more than one row (xatl/kernels/__init__.py
// has the figures).
//
// Both instructions multiply unsigned by signed bytes. AVX2: the unsigned side is |x_q| and the
// signed side is w negated where x_q < 0, so |x_q| * (±w) = x_q * w (weights in [-127, 127], as
// `Int8Linear.from_linear` writes them: -128 has no negation). AVX512-VNNI: see `Avx512Vnni`.
// Every path (AVX512-VNNI, AVX2, portable C++) computes the same products (AVX512-VNNI by way of an
// offset it takes off at the end); they differ only in their float additions. `path` picks one (0: the best this CPU has), for the
// tests.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <immintrin.h>

#include "tiles.h"

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

using namespace xatl;

constexpr int64_t kBlock = 32;  // activation values sharing one scale

// One block of 32 values: q = round(x * 127 / max|x|) (to nearest, ties to even), a = |q| (unless
// a is null); returns the block's scale max|x| / 127 and adds sum(q) to *sum. Both versions compute
// the same numbers.
float quantize_block(const float* x, int8_t* q, uint8_t* a, int32_t* sum) {
  float amax = 0.f;
  for (int64_t i = 0; i < kBlock; ++i) amax = std::fmax(amax, std::fabs(x[i]));
  const float inverse = amax > 0.f ? 127.f / amax : 0.f;
  for (int64_t i = 0; i < kBlock; ++i) {
    const int v = static_cast<int>(std::nearbyint(x[i] * inverse));
    q[i] = static_cast<int8_t>(v);
    if (a) a[i] = static_cast<uint8_t>(v < 0 ? -v : v);
    *sum += v;
  }
  return amax / 127.f;
}

__attribute__((target("avx2,fma"))) float quantize_block_avx2(const float* x, int8_t* q, uint8_t* a, int32_t* sum) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 v[4];
  __m256 amax8 = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(x + 8 * i);
    amax8 = _mm256_max_ps(amax8, _mm256_andnot_ps(sign, v[i]));
  }
  __m128 amax4 = _mm_max_ps(_mm256_castps256_ps128(amax8), _mm256_extractf128_ps(amax8, 1));
  amax4 = _mm_max_ps(amax4, _mm_movehl_ps(amax4, amax4));
  const float amax = _mm_cvtss_f32(_mm_max_ss(amax4, _mm_shuffle_ps(amax4, amax4, 1)));
  const __m256 inverse = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
  __m256i ints[4];
  for (int i = 0; i < 4; ++i) ints[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inverse));  // to nearest even
  const __m256i total = _mm256_add_epi32(_mm256_add_epi32(ints[0], ints[1]), _mm256_add_epi32(ints[2], ints[3]));
  __m128i total4 = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
  total4 = _mm_add_epi32(total4, _mm_shuffle_epi32(total4, 0x4e));
  *sum += _mm_cvtsi128_si32(_mm_add_epi32(total4, _mm_shuffle_epi32(total4, 0xb1)));
  // packing works within 128-bit halves: the permutation puts the 32 bytes back in order
  const __m256i bytes = _mm256_permutevar8x32_epi32(
      _mm256_packs_epi16(_mm256_packs_epi32(ints[0], ints[1]), _mm256_packs_epi32(ints[2], ints[3])),
      _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), bytes);
  if (a) _mm256_storeu_si256(reinterpret_cast<__m256i*>(a), _mm256_abs_epi8(bytes));
  return amax / 127.f;
}

// The activations x (N, K) quantised in blocks of 32 values, x ~ q * d, in the forms its path reads.
struct Activations {
  int64_t K;
  std::vector<int8_t> q;  // (N, K)
  std::vector<float> d;  // (N, K / 32): one scale per block
  std::vector<uint8_t> a;  // (N, K): |q| (the unsigned operand of AVX2 and the portable path)
  std::vector<float> pair_scales;  // (N, K / 64, 16): two blocks' scales, eight lanes each (AVX512)
  std::vector<float> offset;  // (N,): 128 * sum over blocks of d * sum(q) (AVX512's unsigned weights)

  Activations(const float* x, int64_t N, int64_t K, int64_t path)
      : K(K), q(N * K), d(N * (K / kBlock)) {
    const bool avx512 = path == kAvx512Vnni;
    if (avx512) {
      pair_scales.resize(N * (K / 64) * 16);
      offset.resize(N);
    } else {
      a.resize(N * K);
    }
    const int64_t blocks = K / kBlock;
    const auto quantize = path == kPortable ? quantize_block : quantize_block_avx2;
    for (int64_t n = 0; n < N; ++n) {
      float total = 0.f;
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t at = n * K + b * kBlock;
        int32_t sum = 0;
        const float scale = quantize(x + at, q.data() + at, avx512 ? nullptr : a.data() + at, &sum);
        d[n * blocks + b] = scale;
        if (!avx512) continue;
        total = std::fma(128.f * float(sum), scale, total);
        if (b / 2 < K / 64) {
          float* lanes = pair_scales.data() + (n * (K / 64) + b / 2) * 16 + (b % 2) * 8;
          for (int i = 0; i < 8; ++i) lanes[i] = scale;
        }
      }
      if (avx512) offset[n] = total;
    }
  }
};

// Where products go: out[n, o] = dot * scale[o] (+ bias[o]).
struct Output {
  const float* scale;
  const float* bias;  // or nullptr
  float* out;  // (N, O)
  int64_t O;

  void store(int64_t n, int64_t o, float dot) const {
    out[n * O + o] = bias ? std::fma(dot, scale[o], bias[o]) : dot * scale[o];
  }
};

// Each path's `rows<NT>` multiplies weight rows o0 .. o1 - 1 by activation rows n0 .. n0 + NT - 1:
// per pair, the sum over blocks of d[n, b] * (q[n, block b] . w[o, block b]), accumulated in float
// lanes (a block's int32 sums, four bytes each) that are added at the end. NT is a template
// argument so that the accumulators of the tile stay in registers.

struct Portable {
  template <int NT>
  static void rows(const int8_t* w, int64_t o0, int64_t o1, const Activations& x, int64_t n0, const Output& y) {
    const int64_t blocks = x.K / kBlock;
    for (int64_t o = o0; o < o1; ++o) {
      for (int t = 0; t < NT; ++t) {
        const int64_t n = n0 + t;
        float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int64_t b = 0; b < blocks; ++b) {
          const int8_t* qb = x.q.data() + n * x.K + b * kBlock;
          const int8_t* wb = w + o * x.K + b * kBlock;
          for (int lane = 0; lane < 8; ++lane) {
            int32_t sum = 0;
            for (int i = 0; i < 4; ++i) sum += int32_t(qb[lane * 4 + i]) * int32_t(wb[lane * 4 + i]);
            lanes[lane] = std::fma(float(sum), x.d[n * blocks + b], lanes[lane]);
          }
        }
        y.store(n, o, ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6])) + ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7])));
      }
    }
  }
};

struct Avx2 {
  // R weight rows at a time: the activations' loads are shared by R rows and the R x NT multiply-add
  // chains are independent (one row's chain alone waited on each add's latency); 8 accumulators at
  // most, so that they stay in the 16 registers
  static constexpr int kWeightRows(int NT) { return NT <= 2 ? 4 : 2; }

  template <int NT>
  __attribute__((target("avx2,fma"))) static void rows(const int8_t* w, int64_t o0, int64_t o1,
                                                       const Activations& x, int64_t n0, const Output& y) {
    in_tiles_avx2<Avx2, kWeightRows(NT), NT>(w, o0, o1, x, n0, y);
  }

  // weight rows o .. o + R - 1 by activation rows n0 .. n0 + NT - 1
  template <int R, int NT>
  __attribute__((target("avx2,fma"), always_inline)) static inline void tile(
      const int8_t* w, int64_t o, const Activations& x, int64_t n0, const Output& y) {
    const int64_t K = x.K, blocks = K / kBlock;
    const __m256i ones = _mm256_set1_epi16(1);
    const int8_t* q = x.q.data() + n0 * K;
    const uint8_t* a = x.a.data() + n0 * K;
    const float* d = x.d.data() + n0 * blocks;
    const int8_t* wo = w + o * K;
    __m256 acc[R][NT];
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < NT; ++t) acc[r][t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      prefetch_next_tile<R * kBlock>(wo + R * K, b);
      for (int t = 0; t < NT; ++t) {
        const __m256i qb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + t * K + b * kBlock));
        const __m256i ab = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + t * K + b * kBlock));
        const __m256 scale = _mm256_broadcast_ss(d + t * blocks + b);
        for (int r = 0; r < R; ++r) {
          const __m256i wb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wo + r * K + b * kBlock));
          const __m256i pairs = _mm256_maddubs_epi16(ab, _mm256_sign_epi8(wb, qb));  // |q| * ±w: 16 x int16
          const __m256i sums = _mm256_madd_epi16(pairs, ones);  // 8 x int32
          acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc[r][t]);
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < NT; ++t) y.store(n0 + t, o + r, sum_lanes_avx2(acc[r][t]));
  }
};

struct Avx512Vnni {
  // vpdpbusd multiplies unsigned by signed bytes without saturating: the weights are made unsigned
  // (w + 128, one xor per 64 bytes, shared by the tile's rows) and the activations stay signed; the
  // 128 * sum(q) this adds per block comes off once per row (`offset`).
  template <int NT>
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma"))) static void rows(
      const int8_t* w, int64_t o0, int64_t o1, const Activations& x, int64_t n0, const Output& y) {
    const int64_t pairs = x.K / 64, blocks = x.K / kBlock;
    const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
    for (int64_t o = o0; o < o1; ++o) {
      const int8_t* wo = w + o * x.K;
      __m512 acc[NT];  // lanes 0-7: the first block of each 64 bytes, 8-15: the second
      for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
      for (int64_t p = 0; p < pairs; ++p) {
        const __m512i wu = _mm512_xor_si512(_mm512_loadu_si512(wo + p * 64), flip);  // w + 128
        for (int t = 0; t < NT; ++t) {
          const __m512i qp = _mm512_loadu_si512(x.q.data() + (n0 + t) * x.K + p * 64);
          const __m512i sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wu, qp);  // 16 x int32
          const __m512 scale = _mm512_loadu_ps(x.pair_scales.data() + ((n0 + t) * pairs + p) * 16);
          acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), scale, acc[t]);
        }
      }
      __m256 lanes[NT];
      for (int t = 0; t < NT; ++t) lanes[t] = _mm256_add_ps(_mm512_castps512_ps256(acc[t]), _mm512_extractf32x8_ps(acc[t], 1));
      if (blocks % 2) {  // an odd last block
        const int64_t b = blocks - 1;
        const __m256i wu = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wo + b * kBlock)),
                                            _mm512_castsi512_si256(flip));
        for (int t = 0; t < NT; ++t) {
          const __m256i qb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q.data() + (n0 + t) * x.K + b * kBlock));
          const __m256i sums = _mm256_dpbusd_epi32(_mm256_setzero_si256(), wu, qb);
          const __m256 scale = _mm256_set1_ps(x.d[(n0 + t) * blocks + b]);
          lanes[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, lanes[t]);
        }
      }
      for (int t = 0; t < NT; ++t) y.store(n0 + t, o, sum_lanes_avx2(lanes[t]) - x.offset[n0 + t]);
    }
  }
};

int64_t best_path() { return has_avx512_vnni() ? kAvx512Vnni : has_avx2() ? kAvx2 : kPortable; }

int64_t checked_path(int64_t path) {
  if (path == kBest) path = best_path();
  TORCH_CHECK(path >= kPortable && path <= kAvx512Vnni, "int8_linear: no path ", path);
  TORCH_CHECK(path != kAvx512Vnni || has_avx512_vnni(), "int8_linear: this CPU has no AVX512-VNNI");
  TORCH_CHECK(path != kAvx2 || has_avx2(), "int8_linear: this CPU has no AVX2");
  return path;
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                       const std::optional<at::Tensor>& bias, int64_t path) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "int8_linear: x must be a contiguous float32 (N, K) tensor");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.is_contiguous(),
              "int8_linear: weight must be a contiguous int8 (O, K) tensor");
  const int64_t N = x.size(0), K = x.size(1), O = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, "int8_linear: x has ", K, " columns, weight ", weight.size(1));
  TORCH_CHECK(K % kBlock == 0, "int8_linear: the input width (", K, ") must be a multiple of ", kBlock);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == O && scale.is_contiguous(),
              "int8_linear: scale must hold O float32 values");
  const float* bias_data = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == O && bias->is_contiguous(),
                "int8_linear: bias must hold O float32 values");
    bias_data = bias->data_ptr<float>();
  }
  path = checked_path(path);

  const Activations activations(x.data_ptr<float>(), N, K, path);

  at::Tensor y = at::empty({N, O}, x.options());
  const Output output{scale.data_ptr<float>(), bias_data, y.data_ptr<float>(), O};
  const int8_t* w = weight.data_ptr<int8_t>();
  if (path == kAvx512Vnni) {
    multiply<Avx512Vnni>(w, activations, N, output);
  } else if (path == kAvx2) {
    multiply<Avx2>(w, activations, N, output);
  } else {
    multiply<Portable>(w, activations, N, output);
  }
  return y;
}

int64_t int8_linear_best_path() { return best_path(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(xatl, m) {
  m.def("int8_linear(Tensor x, Tensor weight, Tensor scale, Tensor? bias, int path=0) -> Tensor");
  m.def("int8_linear_best_path() -> int", &int8_linear_best_path);
}

TORCH_LIBRARY_IMPL(xatl, CPU, m) { m.impl("int8_linear", &int8_linear); }
