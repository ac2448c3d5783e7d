// xatl::bf16_linear: y = x @ W^T + bias with bfloat16 activations, weights and output, float32
// sums, for the decode step of a bf16 model on a CPU. torch's bf16 matrix-vector product (oneDNN)
// read its weights at a fraction of the memory's bandwidth with one activation row (the LM head of
// random-width512: 5.4 ms against 1.4 ms to read it; xatl/kernels/__init__.py has the figures).
//
// With AVX512-BF16 one vdpbf16ps multiplies 32 weights by 32 activations and adds the pairs into
// 16 float32 lanes; with AVX2 the weights are widened to float32 (a bf16 is the top half of one)
// for fused multiply-adds; the portable path does that in C++. Paths differ only in the order of
// their float additions; the sum is rounded to bfloat16 once, after the bias.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <immintrin.h>

#include "tiles.h"

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using namespace xatl;

float widen(uint16_t bits) {
  const uint32_t word = uint32_t(bits) << 16;
  float value;
  std::memcpy(&value, &word, sizeof value);
  return value;
}

// The activations (N, K): as given (bfloat16 bits) and widened to float32 (AVX2's and the portable path's).
struct Inputs {
  int64_t K;
  const uint16_t* bits;
  std::vector<float> wide;

  Inputs(const uint16_t* x, int64_t N, int64_t K, bool widened) : K(K), bits(x), wide(widened ? N * K : 0) {
    for (size_t i = 0; i < wide.size(); ++i) wide[i] = widen(x[i]);
  }
};

// out[n, o] = bf16(sum + bias[o]).
struct Output {
  const uint16_t* bias;  // or nullptr
  c10::BFloat16* out;  // (N, O)
  int64_t O;

  void store(int64_t n, int64_t o, float sum) const {
    out[n * O + o] = c10::BFloat16(bias ? sum + widen(bias[o]) : sum);
  }
};

struct Portable {
  template <int NT>
  static void rows(const uint16_t* w, int64_t o0, int64_t o1, const Inputs& x, int64_t n0, const Output& y) {
    for (int64_t o = o0; o < o1; ++o) {
      for (int t = 0; t < NT; ++t) {
        const float* xn = x.wide.data() + (n0 + t) * x.K;
        float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int64_t k = 0; k < x.K; k += 8) {
          for (int lane = 0; lane < 8; ++lane) lanes[lane] += xn[k + lane] * widen(w[o * x.K + k + lane]);
        }
        y.store(n0 + t, o, ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6])) + ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7])));
      }
    }
  }
};

struct Avx2 {
  // R weight rows at a time (as many as 8 accumulators allow): the activations' loads are shared by
  // R rows, and more independent multiply-add chains are in flight
  static constexpr int kWeightRows(int NT) { return NT == 1 ? 4 : NT == 2 ? 2 : 1; }

  template <int NT>
  __attribute__((target("avx2,fma"))) static void rows(const uint16_t* w, int64_t o0, int64_t o1,
                                                       const Inputs& x, int64_t n0, const Output& y) {
    in_tiles_avx2<Avx2, kWeightRows(NT), NT>(w, o0, o1, x, n0, y);
  }

  // weight rows o .. o + R - 1 by activation rows n0 .. n0 + NT - 1
  template <int R, int NT>
  __attribute__((target("avx2,fma"), always_inline)) static inline void tile(
      const uint16_t* w, int64_t o, const Inputs& x, int64_t n0, const Output& y) {
    const int64_t K = x.K;
    const float* xs = x.wide.data() + n0 * K;
    const uint16_t* wo = w + o * K;
    // two accumulators per pair: a chain of dependent multiply-adds would wait on each one's latency
    __m256 acc[R][NT][2];
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < NT; ++t) acc[r][t][0] = acc[r][t][1] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      prefetch_next_tile<R * 32>(reinterpret_cast<const char*>(wo + R * K), k / 16);
      for (int r = 0; r < R; ++r) {
        for (int h = 0; h < 2; ++h) {  // 8 bf16 -> 8 float32: the bits shifted into the top half
          const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wo + r * K + k + 8 * h));
          const __m256 wide = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
          for (int t = 0; t < NT; ++t)
            acc[r][t][h] = _mm256_fmadd_ps(_mm256_loadu_ps(xs + t * K + k + 8 * h), wide, acc[r][t][h]);
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < NT; ++t) y.store(n0 + t, o + r, sum_lanes_avx2(_mm256_add_ps(acc[r][t][0], acc[r][t][1])));
  }
};

struct Avx512Bf16 {
  template <int NT>
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma"))) static void rows(
      const uint16_t* w, int64_t o0, int64_t o1, const Inputs& x, int64_t n0, const Output& y) {
    for (int64_t o = o0; o < o1; ++o) {
      __m512 acc[NT][2];
      for (int t = 0; t < NT; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
      int64_t k = 0;
      for (; k + 64 <= x.K; k += 64) {
        const __m512i w0 = _mm512_loadu_si512(w + o * x.K + k), w1 = _mm512_loadu_si512(w + o * x.K + k + 32);
        for (int t = 0; t < NT; ++t) {
          const uint16_t* xn = x.bits + (n0 + t) * x.K + k;
          acc[t][0] = _mm512_dpbf16_ps(acc[t][0], (__m512bh)_mm512_loadu_si512(xn), (__m512bh)w0);
          acc[t][1] = _mm512_dpbf16_ps(acc[t][1], (__m512bh)_mm512_loadu_si512(xn + 32), (__m512bh)w1);
        }
      }
      if (k < x.K) {  // the last 32
        const __m512i w0 = _mm512_loadu_si512(w + o * x.K + k);
        for (int t = 0; t < NT; ++t) {
          const uint16_t* xn = x.bits + (n0 + t) * x.K + k;
          acc[t][0] = _mm512_dpbf16_ps(acc[t][0], (__m512bh)_mm512_loadu_si512(xn), (__m512bh)w0);
        }
      }
      for (int t = 0; t < NT; ++t) {
        const __m512 sum = _mm512_add_ps(acc[t][0], acc[t][1]);
        y.store(n0 + t, o, sum_lanes_avx2(_mm256_add_ps(_mm512_castps512_ps256(sum), _mm512_extractf32x8_ps(sum, 1))));
      }
    }
  }
};

int64_t best_path() { return has_avx512_bf16() ? kAvx512Bf16 : has_avx2() ? kAvx2 : kPortable; }

at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       int64_t path) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(),
              "bf16_linear: x must be a contiguous bfloat16 (N, K) tensor");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16 && weight.is_contiguous(),
              "bf16_linear: weight must be a contiguous bfloat16 (O, K) tensor");
  const int64_t N = x.size(0), K = x.size(1), O = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, "bf16_linear: x has ", K, " columns, weight ", weight.size(1));
  TORCH_CHECK(K % 32 == 0, "bf16_linear: the input width (", K, ") must be a multiple of 32");
  const uint16_t* bias_bits = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kBFloat16 && bias->numel() == O && bias->is_contiguous(),
                "bf16_linear: bias must hold O bfloat16 values");
    bias_bits = reinterpret_cast<const uint16_t*>(bias->data_ptr());
  }
  if (path == kBest) path = best_path();
  TORCH_CHECK(path == kPortable || path == kAvx2 || path == kAvx512Bf16, "bf16_linear: no path ", path);
  TORCH_CHECK(path != kAvx512Bf16 || has_avx512_bf16(), "bf16_linear: this CPU has no AVX512-BF16");
  TORCH_CHECK(path != kAvx2 || has_avx2(), "bf16_linear: this CPU has no AVX2");

  const Inputs inputs(reinterpret_cast<const uint16_t*>(x.data_ptr()), N, K, path != kAvx512Bf16);
  at::Tensor y = at::empty({N, O}, x.options());
  const Output output{bias_bits, y.data_ptr<c10::BFloat16>(), O};
  const uint16_t* w = reinterpret_cast<const uint16_t*>(weight.data_ptr());
  if (path == kAvx512Bf16) {
    multiply<Avx512Bf16>(w, inputs, N, output);
  } else if (path == kAvx2) {
    multiply<Avx2>(w, inputs, N, output);
  } else {
    multiply<Portable>(w, inputs, N, output);
  }
  return y;
}

int64_t bf16_linear_best_path() { return best_path(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(xatl, m) {
  m.def("bf16_linear(Tensor x, Tensor weight, Tensor? bias, int path=0) -> Tensor");
  m.def("bf16_linear_best_path() -> int", &bf16_linear_best_path);
}

TORCH_LIBRARY_IMPL(xatl, CPU, m) { m.impl("bf16_linear", &bf16_linear); }
