// xatl::f32_linear: y = x @ W^T + bias in float32, for the decode step of an fp32 model on a CPU:
// torch's float32 product of one activation row read its weight at a fraction of the memory's
// bandwidth (the LM head of random-width512 on an AVX2 machine: 10.4 ms against 6.0 ms to read it).
//
// One weight row at a time, as one stream the hardware prefetcher follows; per activation row two
// accumulators (AVX512F: 16 float32 lanes each, AVX2: 8), so that the multiply-adds of a row are
// two independent chains. Paths differ only in the order of their float additions.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <immintrin.h>

#include "tiles.h"

#include <cstdint>

namespace {

using namespace xatl;

struct Inputs {
  int64_t K;
  const float* x;  // (N, K)
};

// out[n, o] = sum + bias[o].
struct Output {
  const float* bias;  // or nullptr
  float* out;  // (N, O)
  int64_t O;

  void store(int64_t n, int64_t o, float sum) const { out[n * O + o] = bias ? sum + bias[o] : sum; }
};

struct Portable {
  template <int NT>
  static void rows(const float* w, int64_t o0, int64_t o1, const Inputs& x, int64_t n0, const Output& y) {
    for (int64_t o = o0; o < o1; ++o) {
      for (int t = 0; t < NT; ++t) {
        const float* xn = x.x + (n0 + t) * x.K;
        float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int64_t k = 0; k < x.K; k += 8) {
          for (int lane = 0; lane < 8; ++lane) lanes[lane] += xn[k + lane] * w[o * x.K + k + lane];
        }
        y.store(n0 + t, o, ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6])) + ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7])));
      }
    }
  }
};

struct Avx2 {
  template <int NT>
  __attribute__((target("avx2,fma"))) static void rows(const float* w, int64_t o0, int64_t o1, const Inputs& x,
                                                       int64_t n0, const Output& y) {
    for (int64_t o = o0; o < o1; ++o) {
      const float* wo = w + o * x.K;
      __m256 acc[NT][2];
      for (int t = 0; t < NT; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
      for (int64_t k = 0; k < x.K; k += 16) {
        const __m256 w0 = _mm256_loadu_ps(wo + k), w1 = _mm256_loadu_ps(wo + k + 8);
        for (int t = 0; t < NT; ++t) {
          const float* xn = x.x + (n0 + t) * x.K + k;
          acc[t][0] = _mm256_fmadd_ps(_mm256_loadu_ps(xn), w0, acc[t][0]);
          acc[t][1] = _mm256_fmadd_ps(_mm256_loadu_ps(xn + 8), w1, acc[t][1]);
        }
      }
      for (int t = 0; t < NT; ++t) y.store(n0 + t, o, sum_lanes_avx2(_mm256_add_ps(acc[t][0], acc[t][1])));
    }
  }
};

struct Avx512 {
  template <int NT>
  __attribute__((target("avx512f,avx2,fma"))) static void rows(const float* w, int64_t o0, int64_t o1,
                                                               const Inputs& x, int64_t n0, const Output& y) {
    for (int64_t o = o0; o < o1; ++o) {
      const float* wo = w + o * x.K;
      __m512 acc[NT][2];
      for (int t = 0; t < NT; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
      for (int64_t k = 0; k < x.K; k += 32) {
        const __m512 w0 = _mm512_loadu_ps(wo + k), w1 = _mm512_loadu_ps(wo + k + 16);
        for (int t = 0; t < NT; ++t) {
          const float* xn = x.x + (n0 + t) * x.K + k;
          acc[t][0] = _mm512_fmadd_ps(_mm512_loadu_ps(xn), w0, acc[t][0]);
          acc[t][1] = _mm512_fmadd_ps(_mm512_loadu_ps(xn + 16), w1, acc[t][1]);
        }
      }
      for (int t = 0; t < NT; ++t) {
        const __m512 sum = _mm512_add_ps(acc[t][0], acc[t][1]);
        y.store(n0 + t, o, sum_lanes_avx2(_mm256_add_ps(_mm512_castps512_ps256(sum),
                                                        _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(sum), 1)))));
      }
    }
  }
};

int64_t best_path() { return has_avx512f() ? kAvx512 : has_avx2() ? kAvx2 : kPortable; }

at::Tensor f32_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      int64_t path) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "f32_linear: x must be a contiguous float32 (N, K) tensor");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat && weight.is_contiguous(),
              "f32_linear: weight must be a contiguous float32 (O, K) tensor");
  const int64_t N = x.size(0), K = x.size(1), O = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, "f32_linear: x has ", K, " columns, weight ", weight.size(1));
  TORCH_CHECK(K % 32 == 0, "f32_linear: the input width (", K, ") must be a multiple of 32");
  const float* bias_data = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == O && bias->is_contiguous(),
                "f32_linear: bias must hold O float32 values");
    bias_data = bias->data_ptr<float>();
  }
  if (path == kBest) path = best_path();
  TORCH_CHECK(path == kPortable || path == kAvx2 || path == kAvx512, "f32_linear: no path ", path);
  TORCH_CHECK(path != kAvx512 || has_avx512f(), "f32_linear: this CPU has no AVX512F");
  TORCH_CHECK(path != kAvx2 || has_avx2(), "f32_linear: this CPU has no AVX2");

  const Inputs inputs{K, x.data_ptr<float>()};
  at::Tensor y = at::empty({N, O}, x.options());
  const Output output{bias_data, y.data_ptr<float>(), O};
  const float* w = weight.data_ptr<float>();
  if (path == kAvx512) {
    multiply<Avx512>(w, inputs, N, output);
  } else if (path == kAvx2) {
    multiply<Avx2>(w, inputs, N, output);
  } else {
    multiply<Portable>(w, inputs, N, output);
  }
  return y;
}

int64_t f32_linear_best_path() { return best_path(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(xatl, m) {
  m.def("f32_linear(Tensor x, Tensor weight, Tensor? bias, int path=0) -> Tensor");
  m.def("f32_linear_best_path() -> int", &f32_linear_best_path);
}

TORCH_LIBRARY_IMPL(xatl, CPU, m) { m.impl("f32_linear", &f32_linear); }
