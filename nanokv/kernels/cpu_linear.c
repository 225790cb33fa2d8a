/* A few rows times a bf16 weight held in blocks, on the CPU: the projections of a decode step.

   Built on first use by nanokv/kernels/native.py (-O3 -march=native) and called through ctypes
   by nanokv/kernels/cpu_linear.py, which states the contract. Batch-1 decode reads every weight
   once a token, so a projection costs its bytes: the weight is held as (out / 16, in / 2, 16, 2)
   blocks, each 16 outputs' weights for a pair of inputs in one 64-byte line, read front to back
   in one stream. With AVX512-BF16 one instruction multiplies a line by the input pair and adds
   it to 16 fp32 sums; elsewhere the same layout is widened to fp32 with shifts. Around the
   product, what a decoder layer does next to a projection runs on the row while it is at hand:
   RMSNorm of the input, the bias, RoPE of the query and key heads of a fused q/k/v output,
   SiLU(gate) * up of a fused gate/up output and the residual add, in fp32, with the output
   rounded once. */
#include <pthread.h>
#include <stdlib.h>

#include "cpu_vector.h"
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

enum { BLOCK = 16, MAX_HEAD_DIM = 1024, ROWS_AT_ONCE = 4, MAX_THREADS = 30 };
enum { GLU_NONE = 0, GLU_SILU = 1 };

/* The first (low) and second (high) bf16 of each pair as floats (bf16 is fp32's top half). */
static inline vf widen_low(vu pairs) { return (vf)(pairs << 16); }
static inline vf widen_high(vu pairs) { return (vf)(pairs & 0xffff0000u); }
static inline float pair_low(uint32_t pair) { return widen_low((vu){0} + pair)[0]; }
static inline float pair_high(uint32_t pair) { return widen_high((vu){0} + pair)[0]; }

/* LANES floats rounded to bf16 (nearest even; NaN stays NaN), as f32_to_bf16 one by one. */
static inline vh round_lanes(vf x) {
  const vu bits = (vu)x;
  const vu nan = (vu)((bits & 0x7fffffffu) > 0x7f800000u);
  const vu rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  return __builtin_convertvector((rounded & ~nan) | (((bits >> 16) | 0x40u) & nan), vh);
}

/* The first n <= LANES elements at `offset` as floats, zeros after them. */
static inline vf load_some(const void *base, int kind, int64_t offset, int n) {
  if (n == LANES) return load_lanes(base, kind, offset);
  float part[LANES] = {0};
  if (kind == KIND_BF16) {
    for (int i = 0; i < n; i++) {
      const uint32_t bits = (uint32_t)((const uint16_t *)base)[offset + i] << 16;
      memcpy(&part[i], &bits, sizeof bits);
    }
  } else {
    memcpy(part, (const float *)base + offset, n * sizeof(float));
  }
  vf out;
  memcpy(&out, part, sizeof out);
  return out;
}

/* The first n <= LANES lanes of x stored at `offset`, rounded once where the kind is bf16. */
static inline void store_some(void *base, int kind, int64_t offset, vf x, int n) {
  if (kind == KIND_BF16) {
    const vh rounded = round_lanes(x);
    memcpy((uint16_t *)base + offset, &rounded, n * sizeof(uint16_t));
  } else {
    memcpy((float *)base + offset, &x, n * sizeof(float));
  }
}

/* Row `x` (in elements of `kind`) into bf16 pairs `xs` (ceil(in / 2)), RMS-normalised with
   weight `norm` first where it is not NULL; an odd last pair is padded with 0. */
static void prepare_row(const void *x, int kind, int64_t in, const float *norm, float eps,
                        uint16_t *xs) {
  float scale = 1.0f;
  if (norm) {
    vf squares = {0};
    for (int64_t i = 0; i < in; i += LANES) {
      const vf v = load_some(x, kind, i, in - i < LANES ? (int)(in - i) : LANES);
      squares += v * v;
    }
    scale = 1.0f / sqrtf(lane_sum(squares) / (float)in + eps);
  }
  for (int64_t i = 0; i < in; i += LANES) {
    const int n = in - i < LANES ? (int)(in - i) : LANES;
    vf v = load_some(x, kind, i, n) * scale;
    if (norm) v *= load_some(norm, KIND_F32, i, n);
    store_some(xs, KIND_BF16, i, v, n);
  }
  if (in % 2) xs[in] = 0;
}

/* 16 outputs' fp32 sums of `R` rows at once: one block (in_pairs lines of 16 pairs) times
   each row's pairs (row r at pairs + r * in_pairs), into sums + r * sums_stride. A line is
   loaded once for the R rows; each row adds its products in the same order whatever R is (four
   sums over k mod 4, added pairwise at the end), so a row's result does not depend on the rows
   beside it: a prompt decoded token by token or prefilled in chunks gets the same bits. */
INLINE void block_times_rows(const uint32_t *block, const uint32_t *pairs, int64_t in_pairs,
                             float *sums, int64_t sums_stride, const int R) {
#if defined(__AVX512BF16__)
  __m512 acc[ROWS_AT_ONCE][4];
  for (int r = 0; r < R; r++)
    for (int u = 0; u < 4; u++) acc[r][u] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 4 <= in_pairs; k += 4)
    for (int u = 0; u < 4; u++) {
      const __m512bh line = (__m512bh)_mm512_loadu_si512(block + (k + u) * BLOCK);
      for (int r = 0; r < R; r++)
        acc[r][u] = _mm512_dpbf16_ps(
            acc[r][u], line, (__m512bh)_mm512_set1_epi32((int)pairs[r * in_pairs + k + u]));
    }
  for (; k < in_pairs; k++) {
    const __m512bh line = (__m512bh)_mm512_loadu_si512(block + k * BLOCK);
    for (int r = 0; r < R; r++)
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], line,
                                   (__m512bh)_mm512_set1_epi32((int)pairs[r * in_pairs + k]));
  }
  for (int r = 0; r < R; r++)
    _mm512_storeu_ps(sums + r * sums_stride, _mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]),
                                                           _mm512_add_ps(acc[r][2], acc[r][3])));
#else
  vf even[ROWS_AT_ONCE], odd[ROWS_AT_ONCE];
  for (int r = 0; r < R; r++) even[r] = odd[r] = (vf){0};
  for (int64_t k = 0; k < in_pairs; k++) {
    vu line;
    memcpy(&line, block + k * BLOCK, sizeof line);
    const vf low = widen_low(line), high = widen_high(line);
    for (int r = 0; r < R; r++) {
      even[r] += low * pair_low(pairs[r * in_pairs + k]);
      odd[r] += high * pair_high(pairs[r * in_pairs + k]);
    }
  }
  for (int r = 0; r < R; r++) {
    const vf sum = even[r] + odd[r];
    memcpy(sums + r * sums_stride, &sum, sizeof sum);
  }
#endif
}

/* Blocks [first, last) times every row, ROWS_AT_ONCE rows a pass (a block stays in L1 for
   them all); sums rows are out_blocks * BLOCK floats apart. */
static void blocks_times_rows(const uint32_t *blocks, int64_t out_blocks, int64_t first,
                              int64_t last, int64_t in_pairs, const uint32_t *pairs, int64_t rows,
                              float *sums) {
  const int64_t stride = out_blocks * BLOCK;
  for (int64_t b = first; b < last; b++) {
    const uint32_t *block = blocks + b * in_pairs * BLOCK;
    int64_t r = 0;
    for (; r + ROWS_AT_ONCE <= rows; r += ROWS_AT_ONCE)
      block_times_rows(block, pairs + r * in_pairs, in_pairs, sums + r * stride + b * BLOCK,
                       stride, ROWS_AT_ONCE);
    switch (rows - r) { /* R a constant in each call: the loops over rows unroll */
      case 3: block_times_rows(block, pairs + r * in_pairs, in_pairs,
                               sums + r * stride + b * BLOCK, stride, 3); break;
      case 2: block_times_rows(block, pairs + r * in_pairs, in_pairs,
                               sums + r * stride + b * BLOCK, stride, 2); break;
      case 1: block_times_rows(block, pairs + r * in_pairs, in_pairs,
                               sums + r * stride + b * BLOCK, stride, 1); break;
      default: break;
    }
  }
}

/* A share of the blocks for one thread of a many-row product (a prefill chunk). */
typedef struct {
  const uint32_t *blocks, *pairs;
  int64_t out_blocks, first, last, in_pairs, rows;
  float *sums;
} Share;

static void *run_share(void *arg) {
  const Share *share = arg;
  blocks_times_rows(share->blocks, share->out_blocks, share->first, share->last,
                    share->in_pairs, share->pairs, share->rows, share->sums);
  return NULL;
}

/* The product on `threads` threads, each a contiguous share of the blocks (a block's sums
   are the same whichever thread computes them); on this thread alone where threads can not be
   started. */
static void product(const uint32_t *blocks, int64_t out_blocks, int64_t in_pairs,
                    const uint32_t *pairs, int64_t rows, float *sums, int threads) {
  pthread_t ids[MAX_THREADS];
  Share shares[MAX_THREADS];
  threads = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
  threads = out_blocks < threads ? (int)out_blocks : threads;
  int started = 0;
  for (int t = 0; t < threads; t++) {
    shares[t] = (Share){blocks, pairs, out_blocks, out_blocks * t / threads,
                        out_blocks * (t + 1) / threads, in_pairs, rows, sums};
    if (t > 0 && pthread_create(&ids[t], NULL, run_share, &shares[t]) == 0) started |= 1 << t;
  }
  run_share(&shares[0]);
  for (int t = 1; t < threads; t++) {
    if (started & (1 << t))
      pthread_join(ids[t], NULL);
    else
      run_share(&shares[t]);
  }
}

/* SiLU(gate) * up, in fp32: gate * sigmoid(gate) with exp of -|gate| (never overflows). */
static inline vf silu_times(vf gate, vf up) {
  const vi negative = gate < 0.0f;
  const vf magnitude = (vf)((vi)gate & 0x7fffffff);
  const vf e = exp_nonpositive_lanes(-magnitude);
  const vf numerator = (vf)(((vi)e & negative) | ((vi)((vf){0} + 1.0f) & ~negative));
  return gate * (numerator / (1.0f + e)) * up;
}

/* A row's sums plus the bias, then its first rope_width outputs (heads of head_dim) rotated:
   y * cos + rotate_half(y) * sin, where rotate_half(y)[i] = y[(i + D/2) % D] and the sin
   table's first half is negated (models/rope.py). */
static void add_bias_and_rotate(float *sums, int64_t out, const uint16_t *bias, const float *cos,
                                const float *sin, int64_t rope_width, int64_t head_dim) {
  if (bias)
    for (int64_t j = 0; j < out; j += LANES) {
      const int n = out - j < LANES ? (int)(out - j) : LANES;
      const vf sum = load_some(sums, KIND_F32, j, n) + load_some(bias, KIND_BF16, j, n);
      store_some(sums, KIND_F32, j, sum, n);
    }
  if (!cos) return;
  float head[MAX_HEAD_DIM];
  const int64_t half = head_dim / 2;
  for (int64_t start = 0; start < rope_width; start += head_dim) {
    memcpy(head, sums + start, head_dim * sizeof(float));
    for (int64_t i = 0; i < head_dim; i++)
      sums[start + i] = head[i] * cos[i] + head[(i + half) % head_dim] * sin[i];
  }
}

/* One row's outputs from its fp32 sums: SiLU-GLU, residual, rounding. */
static void finish_row(const float *sums, int64_t out, int glu, const void *residual, void *y,
                       int kind) {
  const int64_t width = glu ? out / 2 : out;
  for (int64_t j = 0; j < width; j += LANES) {
    const int n = width - j < LANES ? (int)(width - j) : LANES;
    vf v = load_some(sums, KIND_F32, j, n);
    if (glu) v = silu_times(v, load_some(sums, KIND_F32, width + j, n));
    if (residual) v += load_some(residual, kind, j, n);
    store_some(y, kind, j, v, n);
  }
}

/* y (rows, out, or out / 2 with glu) = [residual +] glu(rope(W . norm(x) + bias)) for the weight
   in blocks (see above; out_blocks = ceil(out / 16), in_pairs = ceil(in / 2), zero padded).
   x rows at x + r * x_stride (elements of x_kind); residual and y rows likewise in y_kind;
   rope (cos and sin not NULL): row r's tables at cos + r * head_dim, sin + r * head_dim.
   `threads` > 1 shares the product out (for many rows: starting a thread costs ~20 us). */
int blocked_linear(const uint16_t *blocks, int64_t out, int64_t in, const void *x, int x_kind,
                   int64_t rows, int64_t x_stride, const float *norm, float eps,
                   const uint16_t *bias, const float *cos, const float *sin, int64_t rope_width,
                   int64_t head_dim, int glu, const void *residual, int64_t residual_stride,
                   void *y, int y_kind, int64_t y_stride, int threads) {
  if (out < 1 || in < 1 || rows < 0 || (glu && out % 2)) return BAD_SHAPE;
  if (cos && (head_dim < 2 || head_dim % 2 || head_dim > MAX_HEAD_DIM || rope_width > out ||
              rope_width % head_dim))
    return BAD_SHAPE;
  const int64_t in_pairs = (in + 1) / 2, out_blocks = (out + BLOCK - 1) / BLOCK;
  const int64_t x_size = x_kind == KIND_BF16 ? 2 : 4, y_size = y_kind == KIND_BF16 ? 2 : 4;
  uint32_t *pairs = calloc((size_t)(rows * in_pairs + 1), sizeof *pairs);
  float *sums = malloc((size_t)(rows * out_blocks * BLOCK + 1) * sizeof *sums);
  if (!pairs || !sums) {
    free(pairs);
    free(sums);
    return NO_MEMORY;
  }
  for (int64_t r = 0; r < rows; r++)
    prepare_row((const char *)x + r * x_stride * x_size, x_kind, in, norm, eps,
                (uint16_t *)(pairs + r * in_pairs));
  product((const uint32_t *)blocks, out_blocks, in_pairs, pairs, rows, sums, threads);
  for (int64_t r = 0; r < rows; r++) {
    float *row = sums + r * out_blocks * BLOCK;
    add_bias_and_rotate(row, out, bias, cos ? cos + r * head_dim : NULL,
                        sin ? sin + r * head_dim : NULL, rope_width, head_dim);
    const void *row_residual =
        residual ? (const char *)residual + r * residual_stride * y_size : NULL;
    finish_row(row, out, glu, row_residual, (char *)y + r * y_stride * y_size, y_kind);
  }
  free(pairs);
  free(sums);
  return OK;
}

/* The half of a pre-norm decoder layer after its attention (Llama, Mistral), `rows` rows:
     mid = h + O . a + o_bias
     out = mid + D . (silu(gate) * up) + down_bias,  (gate, up) = GU . rms_norm(mid) + gu_bias
   as three blocked_linear calls, `mid` and the GLU rounded to `kind` between them: the bits of
   the three calls made one by one, without two returns to Python and their allocations. a:
   (rows, attn_width) of attn_kind; h, out: (rows, hidden) of kind; gate_up_out = 2 * the MLP's
   width. */
int decoder_finish(const uint16_t *o_blocks, const uint16_t *o_bias, int64_t attn_width,
                   const uint16_t *gate_up_blocks, const uint16_t *gate_up_bias,
                   int64_t gate_up_out, const float *norm, float eps, const uint16_t *down_blocks,
                   const uint16_t *down_bias, const void *a, int attn_kind, const void *h,
                   void *out, int kind, int64_t rows, int64_t hidden, int threads) {
  if (gate_up_out % 2 || rows < 0 || hidden < 1) return BAD_SHAPE;
  const int64_t width = gate_up_out / 2, size = kind == KIND_BF16 ? 2 : 4;
  void *mid = malloc((size_t)(rows * hidden * size + 1));
  void *glu = malloc((size_t)(rows * width * size + 1));
  int status = mid && glu ? OK : NO_MEMORY;
  if (status == OK)
    status = blocked_linear(o_blocks, hidden, attn_width, a, attn_kind, rows, attn_width, NULL,
                            0.0f, o_bias, NULL, NULL, 0, 0, 0, h, hidden, mid, kind, hidden,
                            threads);
  if (status == OK)
    status = blocked_linear(gate_up_blocks, gate_up_out, hidden, mid, kind, rows, hidden, norm,
                            eps, gate_up_bias, NULL, NULL, 0, 0, GLU_SILU, NULL, 0, glu, kind,
                            width, threads);
  if (status == OK)
    status = blocked_linear(down_blocks, hidden, width, glu, kind, rows, width, NULL, 0.0f,
                            down_bias, NULL, NULL, 0, 0, 0, mid, hidden, out, kind, hidden,
                            threads);
  free(mid);
  free(glu);
  return status;
}
