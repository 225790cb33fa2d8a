/* What nanokv's C kernels share: 16-float vectors (GCC/Clang vector extensions, so the same
   source builds for any x86 or Arm target), bf16 loads and rounding, and a vector exp.
   Included by cpu_attention.c and cpu_linear.c; native.py rebuilds them when it changes. */
#ifndef NANOKV_CPU_VECTOR_H
#define NANOKV_CPU_VECTOR_H
#include <math.h>
#include <stdint.h>
#include <string.h>

enum { KIND_F32 = 0, KIND_BF16 = 1 };
enum { LANES = 16 };
enum { OK = 0, BAD_SHAPE = 1, NO_MEMORY = 2 };

#define INLINE static inline __attribute__((always_inline))

typedef float vf __attribute__((vector_size(64)));
typedef float vf8 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef uint16_t vh __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(64)));

/* LANES elements at `offset` of a float or bf16 array, as floats (bf16 is fp32's top half). */
static inline vf load_lanes(const void *base, int kind, int64_t offset) {
  vf out;
  if (kind == KIND_BF16) {
    vh half;
    memcpy(&half, (const uint16_t *)base + offset, sizeof half);
    vu wide = __builtin_convertvector(half, vu) << 16;
    memcpy(&out, &wide, sizeof out);
  } else {
    memcpy(&out, (const float *)base + offset, sizeof out);
  }
  return out;
}

static inline float lane_sum(vf x) { /* a tree of halves: 4 adds deep, not 15 */
  vf8 a = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7) +
          __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
  vf4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even; NaN stays NaN */
  uint32_t bits;
  memcpy(&bits, &f, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return (uint16_t)(bits >> 16);
}

/* exp(x) of LANES floats x <= 0 (a logit minus its row's maximum; -inf gives 0): 2^n * p(r)
   with |r| <= ln(2)/2 and p of degree 6, relative error < 3e-7; no branches. */
static inline vf exp_nonpositive_lanes(vf x) {
  const vi low = x < -104.0f; /* also -inf; exp(-104) is below the smallest float */
  x = (vf)(((vi)x & ~low) | ((vi)((vf){0} - 104.0f) & low));
  const vf magic = (vf){0} + 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
  vf n = (x * 1.44269504088896341f + magic) - magic;
  vf r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f; /* ln 2, split */
  vf p = (vf){0} + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  vi biased = __builtin_convertvector(n, vi) + 127;
  biased &= ~(biased < 0); /* 2^n, 0 below the normals */
  return p * (vf)(biased << 23);
}

#endif
