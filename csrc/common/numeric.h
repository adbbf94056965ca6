// Scalar math shared by the C++ CPU build and the CUDA build.
//
// Everything here is `SSTM_HD` (host + device inline), so the per-element math of the CUDA kernels is
// compiled and tested by the CPU build too; only launch and tiling code is CUDA-only.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define SSTM_HD __host__ __device__ __forceinline__
#else
#define SSTM_HD inline
#endif

namespace sstm {

// dtype codes used across the Python/C++ boundary (python/sstmerge/ops/_cpp.py mirrors them).
enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

SSTM_HD uint32_t f32_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
}
SSTM_HD float bits_f32(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}

// bf16 -> fp32 is exact: the bf16 bits are the top half of the fp32 bits.
SSTM_HD float bf16_to_f32(uint16_t h) { return bits_f32(uint32_t(h) << 16); }

// fp32 -> bf16, round to nearest even (as torch does); NaN stays a quiet NaN.
SSTM_HD uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

// fp16 -> fp32 is exact (normals, subnormals, inf, NaN).
SSTM_HD float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0) {
    if (mant == 0) return bits_f32(sign);
    // subnormal: value = mant * 2^-24, exactly representable in fp32
    float v = float(mant) * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  if (exp == 31) return bits_f32(sign | 0x7f800000u | (mant << 13));
  return bits_f32(sign | ((exp + 112u) << 23) | (mant << 13));
}

// fp32 -> fp16, round to nearest even; overflow to inf, subnormals rounded correctly.
SSTM_HD uint16_t f32_to_f16(float value) {
  const uint32_t f32_infty = 255u << 23;
  const uint32_t f16_max = (127u + 16u) << 23;                       // 65536.0f
  const uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;  // 0.5f
  uint32_t f = f32_bits(value);
  uint32_t sign = f & 0x80000000u;
  f ^= sign;
  uint16_t o;
  if (f >= f16_max) {
    o = (f > f32_infty) ? 0x7e00u : 0x7c00u;
  } else if (f < (113u << 23)) {  // below the smallest fp16 normal: the float add rounds for us
    float t = bits_f32(f) + bits_f32(denorm_magic);
    o = uint16_t(f32_bits(t) - denorm_magic);
  } else {
    uint32_t mant_odd = (f >> 13) & 1u;
    f += (uint32_t(15 - 127) << 23) + 0xfffu;
    f += mant_odd;
    o = uint16_t(f >> 13);
  }
  return uint16_t(o | (sign >> 16));
}

// Load element i of a buffer of dtype `dt` as fp32.
SSTM_HD float load_f32(const void* p, int64_t i, int dt) {
  if (dt == kFloat32) return static_cast<const float*>(p)[i];
  if (dt == kBFloat16) return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
  return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
}

// Store an fp32 value into element i of a buffer of dtype `dt`, rounding once (nearest even).
SSTM_HD void store_f32(void* p, int64_t i, int dt, float v) {
  if (dt == kFloat32) {
    static_cast<float*>(p)[i] = v;
  } else if (dt == kBFloat16) {
    static_cast<uint16_t*>(p)[i] = f32_to_bf16(v);
  } else {
    static_cast<uint16_t*>(p)[i] = f32_to_f16(v);
  }
}

}  // namespace sstm
