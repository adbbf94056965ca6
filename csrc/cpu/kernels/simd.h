// Vector types and dtype conversion for one ISA variant (this header is included by the kernel
// sources, which CMake compiles once per ISA with -mavx512* / -mavx2 / baseline flags).
//
// GCC vector extensions give one source for every width: VW floats per register, MR x NR the
// register tile of the GEMM micro-kernel (MR broadcast rows x NV vectors of VW columns), chosen so
// the MR*NV accumulators + NV B vectors + 1 broadcast fit the register file (32 zmm / 16 ymm /
// 16 xmm).
#pragma once
#include <cstdint>
#include <cstring>

#include "common/numeric.h"

#if defined(SSTM_ISA_avx512) || defined(SSTM_ISA_avx2)
#include <immintrin.h>
#endif

namespace sstm {
namespace SSTM_ISA {

#if defined(SSTM_ISA_avx512)
constexpr int VW = 16;
constexpr int MR = 14;
constexpr int NV = 2;
#elif defined(SSTM_ISA_avx2)
constexpr int VW = 8;
constexpr int MR = 6;
constexpr int NV = 2;
#else
constexpr int VW = 4;
constexpr int MR = 6;
constexpr int NV = 2;
#endif
constexpr int NR = NV * VW;

typedef float vf __attribute__((vector_size(VW * 4)));
typedef float vfu __attribute__((vector_size(VW * 4), aligned(4), may_alias));  // unaligned access
typedef uint32_t vu __attribute__((vector_size(VW * 4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));
typedef uint16_t vh __attribute__((vector_size(VW * 2)));
typedef uint16_t vhu __attribute__((vector_size(VW * 2), aligned(2), may_alias));

// bf16 <-> fp32 on whole vectors: the same bit operations as numeric.h's scalar versions.
// (The widening is spelled with intrinsics where they exist: GCC 12 compiles the generic
// __builtin_convertvector of 16 x u16 as two 8-lane halves plus an insert, 6 instructions instead
// of 2, which cost ~0.3 ms of a 4096 x 4096 bf16 lora_merge_.)
static inline vf bf16v_to_f32(const uint16_t* p) {
#if defined(SSTM_ISA_avx512)
  return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
#elif defined(SSTM_ISA_avx2)
  return (vf)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
#else
  vu u = __builtin_convertvector(*reinterpret_cast<const vhu*>(p), vu) << 16;
  return reinterpret_cast<vf&>(u);
#endif
}
static inline void f32_to_bf16v(uint16_t* p, vf v) {
  const vu u = reinterpret_cast<vu&>(v);
  const vu r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const vu q = (u >> 16) | 0x40u;
  const vu res = ((u & 0x7fffffffu) > 0x7f800000u) ? q : r;  // NaN stays a quiet NaN
  *reinterpret_cast<vhu*>(p) = __builtin_convertvector(res, vh);
}

static inline vf vload(const float* p) { return *reinterpret_cast<const vfu*>(p); }
static inline void vstore(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }
// Splat a scalar (not `vf{} + s`: that costs a scalar add, since 0 + -0 must give +0).
static inline vf vbcast(float s) {
#if defined(SSTM_ISA_avx512)
  return (vf)_mm512_set1_ps(s);
#elif defined(SSTM_ISA_avx2)
  return (vf)_mm256_set1_ps(s);
#else
  vf r;
#pragma GCC unroll 4
  for (int i = 0; i < VW; ++i) r[i] = s;
  return r;
#endif
}

#if defined(SSTM_ISA_avx512)
// AVX512-BF16 rounding (vcvtneps2bf16: nearest even, 1 instruction instead of ~10). Its inputs are
// DAZ, so vectors holding a denormal or a NaN take the software path: results stay bit-identical
// to numeric.h. Only called when the CPU has avx512_bf16 (has_avx512bf16()); the avx512 variant
// is compiled with -mavx512bf16 for this intrinsic alone.
static inline bool has_avx512bf16() {
  static const bool yes = __builtin_cpu_supports("avx512bf16");
  return yes;
}
static inline void f32_to_bf16v_hw(uint16_t* p, vf v) {
  const __m512 x = (__m512)v;
  if (__builtin_expect(_mm512_fpclass_ps_mask(x, 0x20 | 0x01 | 0x80) != 0, 0)) {
    f32_to_bf16v(p, v);  // denormal (0x20) or NaN (0x01 quiet, 0x80 signalling) lanes
    return;
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(x));
}
#endif

// One vector of VW contiguous elements of dtype DT as fp32, and back (rounding once, nearest even).
template <int DT>
static inline vf loadv(const void* base, int64_t i) {
  if constexpr (DT == kFloat32) {
    return vload(static_cast<const float*>(base) + i);
  } else if constexpr (DT == kBFloat16) {
    return bf16v_to_f32(static_cast<const uint16_t*>(base) + i);
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(base) + i;
#if defined(SSTM_ISA_avx512)
    return (vf)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(SSTM_ISA_avx2)
    return (vf)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
    vf r;
    for (int l = 0; l < VW; ++l) r[l] = f16_to_f32(p[l]);
    return r;
#endif
  }
}
// HW: use the AVX512-BF16 rounding (the caller checked has_avx512bf16()).
template <int DT, bool HW = false>
static inline void storev(void* base, int64_t i, vf v) {
  if constexpr (DT == kFloat32) {
    vstore(static_cast<float*>(base) + i, v);
  } else if constexpr (DT == kBFloat16) {
#if defined(SSTM_ISA_avx512)
    if constexpr (HW) return f32_to_bf16v_hw(static_cast<uint16_t*>(base) + i, v);
#endif
    f32_to_bf16v(static_cast<uint16_t*>(base) + i, v);
  } else {
    uint16_t* p = static_cast<uint16_t*>(base) + i;
#if defined(SSTM_ISA_avx512)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT));
#elif defined(SSTM_ISA_avx2)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT));
#else
    for (int l = 0; l < VW; ++l) p[l] = f32_to_f16(v[l]);
#endif
  }
}

// ---- dtype conversion of contiguous runs (vectorised; bit-identical to numeric.h's scalars) ----

// dst[j] = w * src[j] for j < n, src contiguous of dtype DT.
template <int DT>
static inline void load_run(float* __restrict dst, const void* __restrict src, int64_t n, float w) {
  if constexpr (DT == kFloat32) {
    const float* s = static_cast<const float*>(src);
    for (int64_t j = 0; j < n; ++j) dst[j] = w * s[j];
  } else if constexpr (DT == kBFloat16) {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    int64_t j = 0;
    const vf wv = vbcast(w);
    for (; j + VW <= n; j += VW) vstore(dst + j, wv * bf16v_to_f32(s + j));
    for (; j < n; ++j) dst[j] = w * bits_f32(uint32_t(s[j]) << 16);
  } else {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    int64_t j = 0;
#if defined(SSTM_ISA_avx512) || defined(SSTM_ISA_avx2)
    const __m256 wv = _mm256_set1_ps(w);
    for (; j + 8 <= n; j += 8) {
      __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + j));
      _mm256_storeu_ps(dst + j, _mm256_mul_ps(wv, _mm256_cvtph_ps(h)));
    }
#endif
    for (; j < n; ++j) dst[j] = w * f16_to_f32(s[j]);
  }
}

// dst[j] = w * src[j * s] for j < n (any stride, any dtype).
static inline void load_strided(float* __restrict dst, const void* src, int dt, int64_t s, int64_t n,
                                float w) {
  if (s == 1) {
    if (dt == kFloat32) return load_run<kFloat32>(dst, src, n, w);
    if (dt == kBFloat16) return load_run<kBFloat16>(dst, src, n, w);
    return load_run<kFloat16>(dst, src, n, w);
  }
  if (dt == kFloat32) {
    const float* p = static_cast<const float*>(src);
    for (int64_t j = 0; j < n; ++j) dst[j] = w * p[j * s];
  } else if (dt == kBFloat16) {
    const uint16_t* p = static_cast<const uint16_t*>(src);
    for (int64_t j = 0; j < n; ++j) dst[j] = w * bf16_to_f32(p[j * s]);
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(src);
    for (int64_t j = 0; j < n; ++j) dst[j] = w * f16_to_f32(p[j * s]);
  }
}

static inline const void* elem(const void* base, int dt, int64_t off) {
  return static_cast<const char*>(base) + off * (dt == kFloat32 ? 4 : 2);
}
static inline void* elem(void* base, int dt, int64_t off) {
  return static_cast<char*>(base) + off * (dt == kFloat32 ? 4 : 2);
}

// Round n contiguous fp32 values into dst of dtype dt (element stride s), once, nearest even.
static inline void store_strided(void* dst, int dt, int64_t s, const float* __restrict src,
                                 int64_t n) {
  if (dt == kFloat32) {
    float* d = static_cast<float*>(dst);
    if (s == 1) {
      memcpy(d, src, size_t(n) * 4);
    } else {
      for (int64_t j = 0; j < n; ++j) d[j * s] = src[j];
    }
    return;
  }
  uint16_t* d = static_cast<uint16_t*>(dst);
  if (dt == kBFloat16) {
    if (s == 1) {
      int64_t j = 0;
      for (; j + VW <= n; j += VW) f32_to_bf16v(d + j, vload(src + j));
      for (; j < n; ++j) d[j] = f32_to_bf16(src[j]);
    } else {
      for (int64_t j = 0; j < n; ++j) d[j * s] = f32_to_bf16(src[j]);
    }
    return;
  }
  int64_t j = 0;
#if defined(SSTM_ISA_avx512) || defined(SSTM_ISA_avx2)
  if (s == 1) {
    // F16C conversion is IEEE round-to-nearest-even (subnormals, overflow to inf), as numeric.h.
    for (; j + 8 <= n; j += 8) {
      __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + j), h);
    }
  }
#endif
  for (; j < n; ++j) d[j * s] = f32_to_f16(src[j]);
}

}  // namespace SSTM_ISA
}  // namespace sstm
