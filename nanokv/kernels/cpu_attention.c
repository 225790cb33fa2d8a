/* One query token's attention over one layer of the KV arena, on the CPU.

   Built on first use by nanokv/kernels/native.py (-O3 -march=native) and called through ctypes
   by nanokv/kernels/cpu_attention.py, which states the contract. Per (sequence, kv head): the
   group's query heads are scored against each allowed slot's key in one pass (each key read
   once for the group), the logits are turned into probabilities in fp32, and each allowed
   slot's value is read once more and accumulated in fp32; the output is rounded once to the
   cache's dtype. Vectors are GCC/Clang vector extensions of 16 floats, so the same source
   builds for any x86 or Arm target. */
#include <stdlib.h>

#include "cpu_vector.h"

enum { MAX_VECTORS = 16, MAX_GROUP = 32 }; /* head_dim <= 256 */

/* Logits of the group's queries `qv` against the allowed slots' keys into probs[g][j]
   (-inf where not allowed); returns each query head's maximum in `best`. */
INLINE void score_slots(const vf qv[][MAX_VECTORS], const void *k, int kind, int64_t base,
                        const uint8_t *allowed, int64_t n_slots, int group, int head_dim,
                        float *probs, float *best) {
  const int vectors = head_dim / LANES;
  for (int g = 0; g < group; g++) best[g] = -INFINITY;
  for (int64_t j = 0; j < n_slots; j++) {
    if (allowed && !allowed[j]) {
      for (int g = 0; g < group; g++) probs[g * n_slots + j] = -INFINITY;
      continue;
    }
    vf key[MAX_VECTORS];
    for (int c = 0; c < vectors; c++) key[c] = load_lanes(k, kind, base + j * head_dim + c * LANES);
    for (int g = 0; g < group; g++) {
      vf dot = qv[g][0] * key[0];
      for (int c = 1; c < vectors; c++) dot += qv[g][c] * key[c];
      const float logit = lane_sum(dot);
      probs[g * n_slots + j] = logit;
      best[g] = logit > best[g] ? logit : best[g];
    }
  }
}

/* Turns each row of logits into unnormalised probabilities; returns the row sums in `total`.
   A row's last partial vector is padded with -inf, which exponentiates to 0. */
static void exponentiate(float *probs, const float *best, int64_t n_slots, int group,
                         float *total) {
  for (int g = 0; g < group; g++) {
    float *row = probs + g * n_slots;
    const float top = best[g];
    vf sums = {0}, x;
    int64_t j = 0;
    for (; j + LANES <= n_slots; j += LANES) {
      memcpy(&x, row + j, sizeof x);
      x = exp_nonpositive_lanes(x - top);
      memcpy(row + j, &x, sizeof x);
      sums += x;
    }
    if (j < n_slots) {
      const size_t tail = sizeof(float) * (size_t)(n_slots - j);
      x = (vf){0} - INFINITY;
      memcpy(&x, row + j, tail);
      x = exp_nonpositive_lanes(x - top);
      memcpy(row + j, &x, tail);
      sums += x;
    }
    total[g] = lane_sum(sums);
  }
}

/* acc[g] = sum_j probs[g][j] * v_j over the allowed slots. */
INLINE void mix_values(vf acc[][MAX_VECTORS], const void *v, int kind, int64_t base,
                       const uint8_t *allowed, const float *probs, int64_t n_slots, int group,
                       int head_dim) {
  const int vectors = head_dim / LANES;
  for (int64_t j = 0; j < n_slots; j++) {
    if (allowed && !allowed[j]) continue;
    vf value[MAX_VECTORS];
    for (int c = 0; c < vectors; c++)
      value[c] = load_lanes(v, kind, base + j * head_dim + c * LANES);
    for (int g = 0; g < group; g++) {
      const float p = probs[g * n_slots + j];
      for (int c = 0; c < vectors; c++) acc[g][c] += p * value[c];
    }
  }
}

static void store_row(void *out, int kind, int64_t offset, const vf *acc, float inv,
                      int head_dim) {
  for (int i = 0; i < head_dim; i++) {
    const float y = acc[i / LANES][i % LANES] * inv;
    if (kind == KIND_BF16)
      ((uint16_t *)out)[offset + i] = f32_to_bf16(y);
    else
      ((float *)out)[offset + i] = y;
  }
}

/* The group of query rows q (group, head_dim) of one kv head over its slots: slot j's key at
   k + (base + j * head_dim), allowed where mask is NULL or mask[j]; output rows to out. */
INLINE void attend_group_as(const void *q, void *out, int64_t q_row, const void *k,
                            const void *v, int64_t base, const uint8_t *allowed,
                            int64_t n_slots, int group, int vectors, int kind, float scale,
                            float *probs) {
  const int head_dim = vectors * LANES;
  vf qv[MAX_GROUP][MAX_VECTORS], acc[MAX_GROUP][MAX_VECTORS];
  float best[MAX_GROUP], total[MAX_GROUP];
  for (int g = 0; g < group; g++) {
    for (int c = 0; c < vectors; c++) {
      qv[g][c] = load_lanes(q, kind, q_row + (int64_t)g * head_dim + c * LANES) * scale;
      acc[g][c] = (vf){0};
    }
  }
  score_slots(qv, k, kind, base, allowed, n_slots, group, head_dim, probs, best);
  exponentiate(probs, best, n_slots, group, total);
  mix_values(acc, v, kind, base, allowed, probs, n_slots, group, head_dim);
  for (int g = 0; g < group; g++) {
    const float inv = total[g] > 0.0f ? 1.0f / total[g] : 0.0f;
    store_row(out, kind, q_row + (int64_t)g * head_dim, acc[g], inv, head_dim);
  }
}

/* attend_group_as compiled for each cache dtype and the usual head sizes (16 to 128 dims; any
   other multiple of 16 up to 256 takes the generic copy), so that the loops over a row's
   vectors unroll: 404 -> 327 us a layer of 8,128 bf16 slots against one generic copy (a /tmp
   harness of 30 layers, one thread, Zen 5). */
#define ATTEND_AS(KIND, VECTORS)                                                              \
  attend_group_as(q, out, q_row, k, v, base, allowed, n_slots, group, VECTORS, KIND, scale, \
                  probs)
#define ATTEND_SIZES(KIND)                          \
  switch (head_dim / LANES) {                       \
    case 1: ATTEND_AS(KIND, 1); break;              \
    case 2: ATTEND_AS(KIND, 2); break;              \
    case 4: ATTEND_AS(KIND, 4); break;              \
    case 8: ATTEND_AS(KIND, 8); break;              \
    default: ATTEND_AS(KIND, head_dim / LANES);     \
  }

static void attend_group(const void *q, void *out, int64_t q_row, const void *k, const void *v,
                         int64_t base, const uint8_t *allowed, int64_t n_slots, int group,
                         int head_dim, int kind, float scale, float *probs) {
  if (kind == KIND_BF16) {
    ATTEND_SIZES(KIND_BF16)
  } else {
    ATTEND_SIZES(KIND_F32)
  }
}

static int bad_shape(int group, int head_dim) {
  return head_dim <= 0 || head_dim % LANES || head_dim / LANES > MAX_VECTORS || group <= 0 ||
         group > MAX_GROUP;
}

/* A rectangular layer. q, out: (batch, kv_heads * group, head_dim), contiguous.
   k, v: slot j of (b, h) at b * kv_sb + h * kv_sh + j * head_dim, rows contiguous.
   mask: NULL (every slot below n_slots) or bytes, slot j of (b, h) at b * m_sb + h * m_sh + j.
   lengths: NULL, or (b, h)'s slots are those below lengths[b * kv_heads + h] (at most n_slots).
   All strides in elements. A (b, h) with no allowed slot gets zeros. */
int decode_attention(const void *q, void *out, const void *k, const void *v, int64_t kv_sb,
                     int64_t kv_sh, const uint8_t *mask, int64_t m_sb, int64_t m_sh,
                     const int32_t *lengths, int batch, int kv_heads, int group, int head_dim,
                     int64_t n_slots, int kind, float scale) {
  if (bad_shape(group, head_dim) || n_slots < 0) return BAD_SHAPE;
  float *probs = malloc(sizeof(float) * (size_t)group * (size_t)(n_slots > 0 ? n_slots : 1));
  if (!probs) return NO_MEMORY;
  for (int b = 0; b < batch; b++)
    for (int h = 0; h < kv_heads; h++) {
      const int64_t length = lengths ? lengths[b * kv_heads + h] : n_slots;
      attend_group(q, out, ((int64_t)b * kv_heads + h) * group * head_dim, k, v,
                   b * kv_sb + h * kv_sh, mask ? mask + b * m_sb + h * m_sh : NULL,
                   length < 0 ? 0 : length > n_slots ? n_slots : length, group, head_dim, kind,
                   scale, probs);
    }
  free(probs);
  return OK;
}

/* A packed layer: row r = b * kv_heads + h holds slots starts[r] .. starts[r] + slots[r] - 1
   of the flat k, v (S, head_dim), allowed where mask (S bytes) is NULL or set. q, out as above. */
int packed_decode_attention(const void *q, void *out, const void *k, const void *v,
                            const int64_t *starts, const int64_t *slots, const uint8_t *mask,
                            int rows, int group, int head_dim, int kind, float scale) {
  if (bad_shape(group, head_dim)) return BAD_SHAPE;
  int64_t widest = 1;
  for (int r = 0; r < rows; r++) widest = slots[r] > widest ? slots[r] : widest;
  float *probs = malloc(sizeof(float) * (size_t)group * (size_t)widest);
  if (!probs) return NO_MEMORY;
  for (int r = 0; r < rows; r++)
    attend_group(q, out, (int64_t)r * group * head_dim, k, v, starts[r] * head_dim,
                 mask ? mask + starts[r] : NULL, slots[r], group, head_dim, kind, scale, probs);
  free(probs);
  return OK;
}

/* Quest's page score of a kv head: the largest, over the group's query heads, of the upper
   bound scale * sum_i max(q_i kmax_i, q_i kmin_i) (as q+ . kmax + q- . kmin) of any logit in
   the page; NaN counts as -inf. lo, hi: the page's kmin, kmax rows (fp32). */
static float page_score(const vf pos[][MAX_VECTORS], const vf neg[][MAX_VECTORS], const float *lo,
                        const float *hi, int group, int vectors) {
  float score = -INFINITY;
  for (int g = 0; g < group; g++) {
    vf dot = (vf){0};
    for (int c = 0; c < vectors; c++) {
      vf low, high;
      memcpy(&low, lo + c * LANES, sizeof low);
      memcpy(&high, hi + c * LANES, sizeof high);
      dot += pos[g][c] * high + neg[g][c] * low;
    }
    const float bound = lane_sum(dot);
    score = bound > score ? bound : score; /* a NaN bound never wins */
  }
  return score;
}

/* The `keep` best of n_valid pages by score (the caller gives the page being written +inf),
   ties to the lower page, like a stable descending sort: chosen[p] set for each; returns how
   many. order: room for `keep` pages. */
static int choose_pages(const float *score, int n_valid, int keep, int *order, uint8_t *chosen) {
  int count = 0; /* order[0..count): score descending, then page ascending */
  for (int p = 0; p < n_valid; p++) {
    const float s = score[p];
    if (count == keep && !(s > score[order[keep - 1]])) continue;
    int at = count < keep ? count++ : keep - 1;
    while (at > 0 && s > score[order[at - 1]]) {
      order[at] = order[at - 1];
      at--;
    }
    order[at] = p;
  }
  for (int p = 0; p < n_valid; p++) chosen[p] = 0;
  for (int i = 0; i < count; i++) chosen[order[i]] = 1;
  return count;
}

/* Quest's decode step on a rectangular layer, without emission or a sliding window: for each
   (b, h), score the valid pages against the page bounds kmin, kmax (fp32, (B, H_kv, P, D)
   contiguous), keep the best `keep` (the one being written always), and attend over the
   valid slots of those pages only (the others' K/V are never read). q, out, k, v as in
   decode_attention; lengths (B, H_kv) int64. Adds the pages read and the valid pages held to
   counts[0] and counts[1]. */
int quest_decode_attention(const void *q, void *out, const void *k, const void *v,
                           int64_t kv_sb, int64_t kv_sh, const int64_t *lengths,
                           const float *kmin, const float *kmax, int64_t pages, int page_size,
                           int keep, int batch, int kv_heads, int group, int head_dim, int kind,
                           float scale, int64_t *counts) {
  if (bad_shape(group, head_dim) || keep < 1 || page_size < 1 || pages < 1) return BAD_SHAPE;
  const int vectors = head_dim / LANES;
  const int64_t capacity = pages * page_size;
  float *probs = malloc(sizeof(float) * (size_t)group * (size_t)capacity);
  float *score = malloc(sizeof(float) * (size_t)pages);
  int *order = malloc(sizeof(int) * (size_t)keep);
  uint8_t *chosen = malloc((size_t)pages), *allowed = malloc((size_t)capacity);
  int status = probs && score && order && chosen && allowed ? OK : NO_MEMORY;
  for (int b = 0; status == OK && b < batch; b++) {
    for (int h = 0; h < kv_heads; h++) {
      const int64_t row = ((int64_t)b * kv_heads + h) * group * head_dim;
      const int64_t length = lengths[b * kv_heads + h];
      const int64_t valid_pages = (length + page_size - 1) / page_size;
      const int n_valid = (int)(valid_pages < pages ? valid_pages : pages);
      const float *lo = kmin + ((int64_t)b * kv_heads + h) * pages * head_dim;
      const float *hi = kmax + ((int64_t)b * kv_heads + h) * pages * head_dim;
      vf pos[MAX_GROUP][MAX_VECTORS], neg[MAX_GROUP][MAX_VECTORS];
      for (int g = 0; g < group; g++)
        for (int c = 0; c < vectors; c++) {
          const vf x = load_lanes(q, kind, row + (int64_t)g * head_dim + c * LANES) * scale;
          const vi positive = x > 0.0f;
          pos[g][c] = (vf)((vi)x & positive);
          neg[g][c] = (vf)((vi)x & ~positive);
        }
      for (int p = 0; p < n_valid; p++)
        score[p] = page_score(pos, neg, lo + p * head_dim, hi + p * head_dim, group, vectors);
      if (n_valid > 0) score[n_valid - 1] = INFINITY;
      const int read = choose_pages(score, n_valid, keep, order, chosen);
      for (int64_t j = 0; j < length; j++) allowed[j] = chosen[j / page_size];
      attend_group(q, out, row, k, v, b * kv_sb + h * kv_sh, allowed, length, group, head_dim,
                   kind, scale, probs);
      counts[0] += read;
      counts[1] += n_valid;
    }
  }
  free(probs);
  free(score);
  free(order);
  free(chosen);
  free(allowed);
  return status;
}

/* Folds the key each (b, h) just appended at slots[b, h] (int64 (B, H_kv)) into its page's
   bounds kmin, kmax (fp32 (B, H_kv, P, D) contiguous), in place: an element-wise min and max,
   NaN kept (as torch.minimum / maximum do). k as in decode_attention. */
int quest_merge_bounds(const void *k, int64_t kv_sb, int64_t kv_sh, const int64_t *slots,
                       float *kmin, float *kmax, int64_t pages, int page_size, int batch,
                       int kv_heads, int head_dim, int kind) {
  if (head_dim <= 0 || head_dim % LANES || page_size < 1) return BAD_SHAPE;
  for (int b = 0; b < batch; b++) {
    for (int h = 0; h < kv_heads; h++) {
      const int64_t slot = slots[b * kv_heads + h], page = slot / page_size;
      if (slot < 0 || page >= pages) return BAD_SHAPE;
      const int64_t key = b * kv_sb + h * kv_sh + slot * head_dim;
      float *lo = kmin + (((int64_t)b * kv_heads + h) * pages + page) * head_dim;
      float *hi = kmax + (((int64_t)b * kv_heads + h) * pages + page) * head_dim;
      for (int c = 0; c < head_dim / LANES; c++) {
        const vf x = load_lanes(k, kind, key + c * LANES);
        vf low, high;
        memcpy(&low, lo + c * LANES, sizeof low);
        memcpy(&high, hi + c * LANES, sizeof high);
        const vi nan = x != x, below = x < low, above = x > high;
        low = (vf)(((vi)x & (below | nan)) | ((vi)low & ~(below | nan)));
        high = (vf)(((vi)x & (above | nan)) | ((vi)high & ~(above | nan)));
        memcpy(lo + c * LANES, &low, sizeof low);
        memcpy(hi + c * LANES, &high, sizeof high);
      }
    }
  }
  return OK;
}

/* The statistics a policy gets from `steps` decode steps of one layer, summed over the steps
   and each kv head's group (`emitted_over_steps` with summed=True and no sliding window).
   q: (batch, steps, kv_heads * group, head_dim) of q_kind, contiguous. Row r = b * kv_heads + h
   holds its slot j's key at k + k_base[r] + j * head_dim (elements of k_kind); step t saw the
   slots below lengths[(b * steps + t) * kv_heads + h]. For each step and query head g of the
   row, with p its probability of slot j: mass[r * capacity + j] += p, and where norms is not
   NULL contribution[r * capacity + j] += p * norms[norm_base[r * group + g] + j * norm_stride]
   (mass and contribution zeroed by the caller). */
int emit_over_steps(const void *q, int q_kind, const void *k, int k_kind, const int64_t *k_base,
                    const int64_t *lengths, const float *norms, const int64_t *norm_base,
                    int64_t norm_stride, float *mass, float *contribution, int64_t capacity,
                    int batch, int steps, int kv_heads, int group, int head_dim, float scale) {
  if (bad_shape(group, head_dim) || capacity < 0) return BAD_SHAPE;
  float *probs = malloc(sizeof(float) * (size_t)group * (size_t)(capacity > 0 ? capacity : 1));
  if (!probs) return NO_MEMORY;
  const int vectors = head_dim / LANES;
  vf qv[MAX_GROUP][MAX_VECTORS];
  float best[MAX_GROUP], total[MAX_GROUP];
  for (int64_t r = 0; r < (int64_t)batch * kv_heads; r++) {
    const int64_t b = r / kv_heads, h = r % kv_heads;
    for (int t = 0; t < steps; t++) {
      int64_t n = lengths[(b * steps + t) * kv_heads + h];
      n = n < 0 ? 0 : n > capacity ? capacity : n;
      if (n == 0) continue;
      const int64_t q_row = ((b * steps + t) * kv_heads + h) * group * head_dim;
      for (int g = 0; g < group; g++)
        for (int c = 0; c < vectors; c++)
          qv[g][c] = load_lanes(q, q_kind, q_row + (int64_t)g * head_dim + c * LANES) * scale;
      score_slots(qv, k, k_kind, k_base[r], NULL, n, group, head_dim, probs, best);
      exponentiate(probs, best, n, group, total);
      for (int g = 0; g < group; g++) {
        const float inv = 1.0f / total[g];
        const float *p = probs + g * n;
        float *row_mass = mass + r * capacity;
        for (int64_t j = 0; j < n; j++) row_mass[j] += p[j] * inv;
        if (!norms) continue;
        const float *norm = norms + norm_base[r * group + g];
        float *row_contribution = contribution + r * capacity;
        for (int64_t j = 0; j < n; j++) row_contribution[j] += p[j] * inv * norm[j * norm_stride];
      }
    }
  }
  free(probs);
  return OK;
}
