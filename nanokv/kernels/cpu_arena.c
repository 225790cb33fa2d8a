/* A decode step's write into one layer of the KV arena, on the CPU.

   Built on first use by nanokv/kernels/native.py and called through ctypes by
   nanokv/kernels/cpu_arena.py, which states the contract. The write of one token per (sequence,
   kv head) row is a handful of tiny copies; as torch ops it was ten dispatches a layer (index
   copies of the key, value and position, the statistics' reset, the lengths' increment), as
   much time as reading the layer's 512 cached tokens. */
#include <stdint.h>
#include <string.h>

enum { OK = 0 };

/* Row r (= b * kv_heads + h) gets its token at slot lengths[r] of the flat buffers, whose row
   starts at flat slot starts[r]: the key and value (row_bytes each, from k + r * row_bytes and
   v + r * row_bytes), the position positions[b], 0 in each of the n_states float32 statistics;
   slots[r] gets the slot and lengths[r] grows by one. The caller has checked that every row
   has room (the arena counts it on the host). */
int append_rows(char *k_flat, char *v_flat, int32_t *pos_flat, float *const *states,
                int n_states, const int64_t *starts, int32_t *lengths, int rows, int kv_heads,
                const char *k, const char *v, int64_t row_bytes, const int64_t *positions,
                int64_t *slots) {
  for (int r = 0; r < rows; r++) {
    const int64_t slot = lengths[r], flat = starts[r] + slot;
    memcpy(k_flat + flat * row_bytes, k + r * row_bytes, (size_t)row_bytes);
    memcpy(v_flat + flat * row_bytes, v + r * row_bytes, (size_t)row_bytes);
    pos_flat[flat] = (int32_t)positions[r / kv_heads];
    for (int s = 0; s < n_states; s++) states[s][flat] = 0.0f;
    slots[r] = slot;
    lengths[r] += 1;
  }
  return OK;
}
