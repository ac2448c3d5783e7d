// What xatl's CPU kernels share: which instructions this CPU has, the sum of a vector's lanes, and
// the loop that splits a product's weight rows over threads and its activation rows into tiles.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace xatl {

// The path a kernel takes, chosen at run time (`path` argument 0: the best this CPU has).
enum Path : int64_t { kBest = 0, kPortable = 1, kAvx2 = 2, kAvx512Vnni = 3, kAvx512Bf16 = 4, kAvx512 = 5 };

inline bool has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

inline bool has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
}

inline bool has_avx512f() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f");
}

inline bool has_avx512_vnni() { return has_avx512() && __builtin_cpu_supports("avx512vnni"); }

inline bool has_avx512_bf16() { return has_avx512() && __builtin_cpu_supports("avx512bf16"); }

__attribute__((target("avx2,fma"))) inline float sum_lanes_avx2(__m256 v) {
  // ((0 + 4) + (2 + 6)) + ((1 + 5) + (3 + 7))
  const __m128 halves = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 pairs = _mm_add_ps(halves, _mm_movehl_ps(halves, halves));
  return _mm_cvtss_f32(_mm_add_ss(pairs, _mm_shuffle_ps(pairs, pairs, 1)));
}

// A tile of R weight rows reads R streams a row apart, each too short (a row: 512 bytes to a few KB)
// for the hardware prefetcher, which had followed one row after another as one stream: the tile
// after this one (the next R rows, contiguous) is fetched ahead, `kBytes` of it per step of the
// tile's loop, at the same point of its progress.
template <int kBytes>
inline void prefetch_next_tile(const void* next_tile, int64_t step) {
  const char* at = static_cast<const char*>(next_tile) + step * kBytes;
  for (int line = 0; line < kBytes; line += 64) _mm_prefetch(at + line, _MM_HINT_T0);
}

// An AVX2 path's `rows<NT>`: weight rows o0 .. o1 - 1 in tiles of R (`Path::tile<R, NT>`), the rows
// left over one at a time (`tile<1, NT>`).
template <class Path, int R, int NT, class Weight, class Inputs, class Output>
__attribute__((target("avx2,fma"))) inline void in_tiles_avx2(const Weight* w, int64_t o0, int64_t o1,
                                                              const Inputs& x, int64_t n0, const Output& y) {
  int64_t o = o0;
  for (; o + R <= o1; o += R) Path::template tile<R, NT>(w, o, x, n0, y);
  for (; o < o1; ++o) Path::template tile<1, NT>(w, o, x, n0, y);
}

// All products through one path: `Path::rows<NT>(w, o0, o1, x, n0, y)` multiplies weight rows
// o0 .. o1 - 1 by activation rows n0 .. n0 + NT - 1 (NT a template argument, so that a tile's
// accumulators stay in registers). Threads split the weight rows: each reads its rows once, for
// every activation row (a weight row stays in L1 while the tiles of activation rows pass).
template <class Path, class Weight, class Inputs, class Output>
void multiply(const Weight* w, const Inputs& x, int64_t N, const Output& y) {
  const int64_t O = y.O;
  constexpr int64_t kRowsPerTask = 64;
#pragma omp parallel for schedule(static) if (O * x.K * N >= (int64_t(1) << 20))
  for (int64_t o0 = 0; o0 < O; o0 += kRowsPerTask) {
    const int64_t o1 = o0 + kRowsPerTask < O ? o0 + kRowsPerTask : O;
    int64_t n0 = 0;
    for (; n0 + 4 <= N; n0 += 4) Path::template rows<4>(w, o0, o1, x, n0, y);
    switch (N - n0) {
      case 3: Path::template rows<3>(w, o0, o1, x, n0, y); break;
      case 2: Path::template rows<2>(w, o0, o1, x, n0, y); break;
      case 1: Path::template rows<1>(w, o0, o1, x, n0, y); break;
      default: break;
    }
  }
}

}  // namespace xatl
