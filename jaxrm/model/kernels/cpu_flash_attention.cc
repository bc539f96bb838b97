// Flash attention for XLA:CPU, called through jax.ffi by jaxrm/cpu_attention.py.
//
// XLA's CPU backend runs attention as separate batched matmuls and memory-bound softmax passes;
// this kernel keeps each block of scores in cache from the query-key product to the output, as
// PyTorch's CPU flash attention does. Layouts are the model's own: q [batch, length, heads, dim],
// k and v [batch, length, kv_heads, dim], float32, length a multiple of BLOCK and dim of 16.
// Query i sees key j when j <= i, segment[i] != 0, and segment[j] is segment[i] or prefix[i]
// (the shared prefix the query continues; 0 for none). Blocks where no query sees any key are
// skipped. Work is split over (row, kv head) pairs on XLA's intra-op thread pool; each pair
// owns its slices of the outputs, so no two threads write the same memory.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using F32Buffer = ffi::Buffer<ffi::F32>;
using S32Buffer = ffi::Buffer<ffi::S32>;

namespace {

constexpr int BLOCK = 64;           // queries and keys per block
constexpr float HIDDEN = -1e30f;    // the score of a key the query does not see
constexpr float NOTHING_SEEN = -1e29f;  // a running maximum below this saw no key yet

// Eight floats; loads and stores through it may read any float array (may_alias), unaligned.
typedef float v8 __attribute__((vector_size(32), aligned(4), __may_alias__));

inline v8 load(const float* p) { return *reinterpret_cast<const v8*>(p); }
inline void store(float* p, v8 x) { *reinterpret_cast<v8*>(p) = x; }

// C[R x 16] (+)= A[R x k] B[k x 16]: A's (i, p) at a[i * a_row + p * a_col], B's rows ldb apart.
template <int R>
inline void micro(int k, const float* a, long a_row, long a_col, const float* b, long ldb,
                  float* c, long ldc, bool add) {
  v8 acc[R][2] = {};
  for (int p = 0; p < k; ++p) {
    const v8 b0 = load(b + p * ldb), b1 = load(b + p * ldb + 8);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const float x = a[r * a_row + p * a_col];
      acc[r][0] += x * b0;
      acc[r][1] += x * b1;
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    float* row = c + r * ldc;
    store(row, add ? load(row) + acc[r][0] : acc[r][0]);
    store(row + 8, add ? load(row + 8) + acc[r][1] : acc[r][1]);
  }
}

// C[m x n] (+)= A[m x k] B[k x n], n a multiple of 16; A strided as in `micro`.
void gemm(int m, int n, int k, const float* a, long a_row, long a_col, const float* b, long ldb,
          float* c, long ldc, bool add) {
  for (int j = 0; j < n; j += 16) {
    int i = 0;
    for (; i + 6 <= m; i += 6) micro<6>(k, a + i * a_row, a_row, a_col, b + j, ldb, c + i * ldc + j, ldc, add);
    const float* ai = a + i * a_row;
    float* ci = c + i * ldc + j;
    switch (m - i) {
      case 5: micro<5>(k, ai, a_row, a_col, b + j, ldb, ci, ldc, add); break;
      case 4: micro<4>(k, ai, a_row, a_col, b + j, ldb, ci, ldc, add); break;
      case 3: micro<3>(k, ai, a_row, a_col, b + j, ldb, ci, ldc, add); break;
      case 2: micro<2>(k, ai, a_row, a_col, b + j, ldb, ci, ldc, add); break;
      case 1: micro<1>(k, ai, a_row, a_col, b + j, ldb, ci, ldc, add); break;
      default: break;
    }
  }
}

struct Shape {
  long batch, length, heads, kv_heads, dim;
  long group() const { return heads / kv_heads; }
  long blocks() const { return length / BLOCK; }
  // Element offsets of (row, position, head) in q / out and in k / v.
  long q_at(long b, long t, long h) const { return ((b * length + t) * heads + h) * dim; }
  long kv_at(long b, long t, long h) const { return ((b * length + t) * kv_heads + h) * dim; }
};

// Which keys the queries of one row see, block by block. Segment ids are compared as ranges
// first: blocks of other sequences are skipped without looking at their tokens, and a block
// inside one sequence and below the diagonal needs no mask at all.
struct RowMask {
  const int32_t* segment;
  const int32_t* prefix;
  std::vector<int32_t> key_low, key_high, own_low, own_high, continued_low, continued_high;
  std::vector<bool> has_padding;

  RowMask(const int32_t* segment, const int32_t* prefix, long blocks)
      : segment(segment), prefix(prefix), key_low(blocks), key_high(blocks), own_low(blocks),
        own_high(blocks), continued_low(blocks), continued_high(blocks), has_padding(blocks) {
    for (long block = 0; block < blocks; ++block) {
      const int32_t* ids = segment + block * BLOCK;
      const int32_t* continued = prefix + block * BLOCK;
      key_low[block] = *std::min_element(ids, ids + BLOCK);
      key_high[block] = *std::max_element(ids, ids + BLOCK);
      has_padding[block] = std::find(ids, ids + BLOCK, 0) != ids + BLOCK;
      own_low[block] = continued_low[block] = INT32_MAX;
      own_high[block] = continued_high[block] = INT32_MIN;
      for (int i = 0; i < BLOCK; ++i) {
        if (ids[i] == 0) continue;  // padding sees nothing
        own_low[block] = std::min(own_low[block], ids[i]);
        own_high[block] = std::max(own_high[block], ids[i]);
        if (continued[i] == 0) continue;
        continued_low[block] = std::min(continued_low[block], continued[i]);
        continued_high[block] = std::max(continued_high[block], continued[i]);
      }
    }
  }

  // 0: no query of block qb sees a key of block kb; 1: every query sees every key; 2: mixed.
  int kind(long qb, long kb) const {
    const bool own = own_low[qb] <= key_high[kb] && key_low[kb] <= own_high[qb];
    const bool continued = continued_low[qb] <= key_high[kb] && key_low[kb] <= continued_high[qb];
    if (kb > qb || !(own || continued)) return 0;
    const bool one_sequence = own_low[qb] == own_high[qb] && key_low[kb] == key_high[kb] &&
                              own_low[qb] == key_low[kb] && !continued;
    return kb < qb && one_sequence && !has_padding[qb] ? 1 : 2;
  }

  // visible[i * BLOCK + j]: 1 where query i of block qb sees key j of block kb, else 0.
  void fill(long qb, long kb, float* visible) const {
    for (int i = 0; i < BLOCK; ++i) {
      const long qi = qb * BLOCK + i;
      const int32_t own = segment[qi], continued = prefix[qi];
      const int32_t* keys = segment + kb * BLOCK;
      const long last = qi - kb * BLOCK;  // the last key (in the block) the query may see
      for (int j = 0; j < BLOCK; ++j) {
        const bool seen = own != 0 && j <= last &&
                          (keys[j] == own || (continued != 0 && keys[j] == continued));
        visible[i * BLOCK + j] = seen ? 1.f : 0.f;
      }
    }
  }
};

// The mask of a block where every query sees every key.
const float* all_visible() {
  static const std::vector<float> ones(BLOCK * BLOCK, 1.f);
  return ones.data();
}

// e^x for x <= 0 where masked entries (mask 0) come out exactly 0; x is clamped so that the
// vectorised exp never takes its slow path for huge or tiny inputs.
inline float masked_exp(float x, float mask) {
  return std::exp(std::min(std::max(x, -80.f), 80.f)) * mask;
}

// Runs work(unit) for unit in [0, units) on the caller and the pool's threads. Threads take
// units from a shared counter, so a task the pool starts late finds nothing left and returns;
// the caller returns once every unit is done.
void parallel_for(ffi::ThreadPool& pool, long units, const std::function<void(long)>& work) {
  struct State {
    std::atomic<long> next{0};
    long done = 0;
    std::mutex mutex;
    std::condition_variable finished;
  };
  auto state = std::make_shared<State>();
  auto drain = [state, units, &work]() {
    long mine = 0;
    for (long unit; (unit = state->next.fetch_add(1)) < units; ++mine) work(unit);
    if (mine == 0) return;
    std::lock_guard<std::mutex> lock(state->mutex);
    state->done += mine;
    if (state->done == units) state->finished.notify_all();
  };
  const long helpers = std::min<long>(pool.num_threads(), units) - 1;
  for (long i = 0; i < helpers; ++i) {
    // A late task must not touch `work` (the caller's frame may be gone): it checks the counter
    // first, and by then every unit was taken.
    pool.Schedule([state, units, drain]() {
      if (state->next.load() < units) drain();
    });
  }
  drain();
  std::unique_lock<std::mutex> lock(state->mutex);
  state->finished.wait(lock, [&] { return state->done == units; });
}

// Per-thread buffers that outlive a call: allocating the per-unit arrays afresh each time cost
// page faults and zero-filling on every call (large blocks come from mmap).
class Scratch {
 public:
  // A buffer of `size` floats, contents undefined; `slot` tells a unit's buffers apart.
  float* get(int slot, size_t size) {
    std::vector<float>& buffer = buffers_[slot];
    if (buffer.size() < size) buffer.resize(size);
    return buffer.data();
  }

 private:
  std::vector<float> buffers_[10];
};

thread_local Scratch scratch;

// `length` rows of `d` floats, `stride` apart in src, times `scale`, as contiguous rows.
void pack_rows(const float* src, long stride, long length, long d, float scale, float* dst) {
  for (long t = 0; t < length; ++t)
    for (long e = 0; e < d; ++e) dst[t * d + e] = src[t * stride + e] * scale;
}

// The same rows transposed block by block: [length / BLOCK][d][BLOCK], so that a block's panel
// is contiguous (whole-length rows of 4 KB strides would fight over the same cache sets).
void pack_blocks_t(const float* src, long stride, long length, long d, float scale, float* dst) {
  for (long block = 0; block < length / BLOCK; ++block)
    for (long e = 0; e < d; ++e) {
      const float* column = src + block * BLOCK * stride + e;
      float* row = dst + (block * d + e) * BLOCK;
      for (int i = 0; i < BLOCK; ++i) row[i] = column[i * stride] * scale;
    }
}

// One (row, kv head): the group's query heads stacked block by block, BLOCK rows per head.
void forward_unit(const Shape& s, long unit, float scale, const float* q, const float* k,
                  const float* v, const int32_t* segment, const int32_t* prefix, float* out,
                  float* lse) {
  const long b = unit / s.kv_heads, kvh = unit % s.kv_heads, g = s.group(), d = s.dim;
  const long n = s.length, rows = g * BLOCK;
  const RowMask mask(segment + b * n, prefix + b * n, s.blocks());
  float* keys_t = scratch.get(0, d * n);
  float* values = scratch.get(1, n * d);
  float* queries = scratch.get(2, rows * d);
  float* scores = scratch.get(3, rows * BLOCK);
  float* acc = scratch.get(4, rows * d);
  float* visible = scratch.get(5, BLOCK * BLOCK);
  float* top = scratch.get(6, rows);
  float* total = scratch.get(7, rows);
  pack_blocks_t(k + s.kv_at(b, 0, kvh), s.kv_heads * d, n, d, 1.f, keys_t);
  pack_rows(v + s.kv_at(b, 0, kvh), s.kv_heads * d, n, d, 1.f, values);
  for (long qb = 0; qb < s.blocks(); ++qb) {
    for (long h = 0; h < g; ++h)
      pack_rows(q + s.q_at(b, qb * BLOCK, kvh * g + h), s.heads * d, BLOCK, d, scale,
                queries + h * BLOCK * d);
    std::fill(top, top + rows, HIDDEN);
    std::fill(total, total + rows, 0.f);
    std::fill(acc, acc + rows * d, 0.f);
    for (long kb = 0; kb <= qb; ++kb) {
      const int kind = mask.kind(qb, kb);
      if (kind == 0) continue;
      if (kind == 2) mask.fill(qb, kb, visible);
      const float* seen_block = kind == 1 ? all_visible() : visible;
      gemm(rows, BLOCK, d, queries, d, 1, keys_t + kb * d * BLOCK, BLOCK, scores, BLOCK, false);
      for (long r = 0; r < rows; ++r) {
        float* row = scores + r * BLOCK;
        const float* seen = seen_block + (r % BLOCK) * BLOCK;
        float best = top[r];
        for (int j = 0; j < BLOCK; ++j) row[j] = seen[j] != 0.f ? row[j] : HIDDEN;
        for (int j = 0; j < BLOCK; ++j) best = std::max(best, row[j]);
        if (best < NOTHING_SEEN) {
          std::fill(row, row + BLOCK, 0.f);
          continue;
        }
        float sum = 0.f;
        for (int j = 0; j < BLOCK; ++j) {
          row[j] = masked_exp(row[j] - best, seen[j]);
          sum += row[j];
        }
        const float rescale = masked_exp(top[r] - best, 1.f);
        total[r] = total[r] * rescale + sum;
        top[r] = best;
        float* acc_row = acc + r * d;
        for (long e = 0; e < d; ++e) acc_row[e] *= rescale;
      }
      gemm(rows, d, BLOCK, scores, BLOCK, 1, values + kb * BLOCK * d, d, acc, d, true);
    }
    for (long r = 0; r < rows; ++r) {
      const long t = qb * BLOCK + r % BLOCK, h = kvh * g + r / BLOCK;
      const float inverse = total[r] > 0.f ? 1.f / total[r] : 0.f;
      float* dst = out + s.q_at(b, t, h);
      for (long e = 0; e < d; ++e) dst[e] = acc[r * d + e] * inverse;
      lse[(b * s.heads + h) * n + t] = total[r] > 0.f ? top[r] + std::log(total[r]) : 0.f;
    }
  }
}

// One (row, kv head): key blocks outside, the query blocks that see them inside, so dk and dv
// of a key block are finished in cache; dq accumulates over key blocks per query head.
void backward_unit(const Shape& s, long unit, float scale, const float* q, const float* k,
                   const float* v, const int32_t* segment, const int32_t* prefix,
                   const float* out, const float* lse, const float* grad, float* dq, float* dk,
                   float* dv) {
  const long b = unit / s.kv_heads, kvh = unit % s.kv_heads, g = s.group(), d = s.dim;
  const long n = s.length, q_stride = s.heads * d, kv_stride = s.kv_heads * d;
  const RowMask mask(segment + b * n, prefix + b * n, s.blocks());
  // Keys [n, d] and block-transposed, values block-transposed; per query head of the group:
  // scaled queries [n, d], the output gradient [n, d], rowsum(dO * O) [n], dq [n, d].
  float* keys = scratch.get(0, n * d);
  float* keys_t = scratch.get(1, n * d);
  float* values_t = scratch.get(2, n * d);
  float* queries = scratch.get(3, g * n * d);
  float* grads = scratch.get(4, g * n * d);
  float* delta = scratch.get(5, g * n);
  float* dq_acc = scratch.get(6, g * n * d);
  std::fill(dq_acc, dq_acc + g * n * d, 0.f);
  pack_rows(k + s.kv_at(b, 0, kvh), kv_stride, n, d, 1.f, keys);
  pack_blocks_t(k + s.kv_at(b, 0, kvh), kv_stride, n, d, 1.f, keys_t);
  pack_blocks_t(v + s.kv_at(b, 0, kvh), kv_stride, n, d, 1.f, values_t);
  for (long h = 0; h < g; ++h) {
    const long at = s.q_at(b, 0, kvh * g + h);
    pack_rows(q + at, q_stride, n, d, scale, queries + h * n * d);
    pack_rows(grad + at, q_stride, n, d, 1.f, grads + h * n * d);
    for (long t = 0; t < n; ++t) {
      const float* gt = grads + (h * n + t) * d;
      const float* ot = out + at + t * q_stride;
      float dot = 0.f;
      for (long e = 0; e < d; ++e) dot += gt[e] * ot[e];
      delta[h * n + t] = dot;
    }
  }
  float* visible = scratch.get(7, BLOCK * BLOCK);
  float* probs = scratch.get(8, BLOCK * BLOCK);
  float* dscores = scratch.get(9, BLOCK * BLOCK + 2 * BLOCK * d);  // then a key block's dk, dv
  float* dk_acc = dscores + BLOCK * BLOCK;
  float* dv_acc = dk_acc + BLOCK * d;
  for (long kb = 0; kb < s.blocks(); ++kb) {
    std::fill(dk_acc, dk_acc + 2 * BLOCK * d, 0.f);
    const float* key_rows = keys + kb * BLOCK * d;
    for (long qb = kb; qb < s.blocks(); ++qb) {
      const int kind = mask.kind(qb, kb);
      if (kind == 0) continue;
      if (kind == 2) mask.fill(qb, kb, visible);
      const float* seen_block = kind == 1 ? all_visible() : visible;
      for (long h = 0; h < g; ++h) {
        const long rows = (h * n + qb * BLOCK) * d;
        const float* head_lse = lse + (b * s.heads + kvh * g + h) * n + qb * BLOCK;
        const float* head_delta = delta + h * n + qb * BLOCK;
        gemm(BLOCK, BLOCK, d, queries + rows, d, 1, keys_t + kb * d * BLOCK, BLOCK, probs, BLOCK,
             false);
        gemm(BLOCK, BLOCK, d, grads + rows, d, 1, values_t + kb * d * BLOCK, BLOCK, dscores,
             BLOCK, false);
        for (int i = 0; i < BLOCK; ++i) {
          float* p = probs + i * BLOCK;
          float* ds = dscores + i * BLOCK;
          const float* seen = seen_block + i * BLOCK;
          for (int j = 0; j < BLOCK; ++j) {
            p[j] = masked_exp(p[j] - head_lse[i], seen[j]);
            ds[j] = p[j] * (ds[j] - head_delta[i]);  // the scores' gradient
          }
        }
        // dv += P^T dO, dk += dS^T (scaled q), dq += dS k
        gemm(BLOCK, d, BLOCK, probs, 1, BLOCK, grads + rows, d, dv_acc, d, true);
        gemm(BLOCK, d, BLOCK, dscores, 1, BLOCK, queries + rows, d, dk_acc, d, true);
        gemm(BLOCK, d, BLOCK, dscores, BLOCK, 1, key_rows, d, dq_acc + rows, d, true);
      }
    }
    for (int j = 0; j < BLOCK; ++j) {
      const long at = s.kv_at(b, kb * BLOCK + j, kvh);
      std::copy(dk_acc + j * d, dk_acc + (j + 1) * d, dk + at);
      std::copy(dv_acc + j * d, dv_acc + (j + 1) * d, dv + at);
    }
  }
  for (long h = 0; h < g; ++h)
    for (long t = 0; t < n; ++t) {
      float* dst = dq + s.q_at(b, t, kvh * g + h);
      const float* src = dq_acc + (h * n + t) * d;
      for (long e = 0; e < d; ++e) dst[e] = src[e] * scale;
    }
}

// q [..., length, heads, dim], k and v [..., length, kv_heads, dim], the ids [..., length]; the
// leading axes (a batch, and any that jax.vmap adds in front of it) are one batch here.
ffi::Error check_shape(const F32Buffer& q, const F32Buffer& k, const F32Buffer& v,
                       const S32Buffer& segment, const S32Buffer& prefix, Shape* shape) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  const size_t rank = qd.size();
  if (rank < 4 || kd.size() != rank || !std::equal(kd.begin(), kd.end(), vd.begin(), vd.end()))
    return ffi::Error::InvalidArgument("q, k and v must be [batch, length, heads, dim]");
  long batch = 1;
  for (size_t i = 0; i + 3 < rank; ++i) {
    if (kd[i] != qd[i]) return ffi::Error::InvalidArgument("q and k must have the same batch");
    batch *= qd[i];
  }
  *shape = Shape{batch, qd[rank - 3], qd[rank - 2], kd[rank - 2], qd[rank - 1]};
  if (kd[rank - 3] != shape->length || kd[rank - 1] != shape->dim || shape->heads % shape->kv_heads)
    return ffi::Error::InvalidArgument("k and v must be [batch, length, kv_heads, dim]");
  for (const S32Buffer* ids : {&segment, &prefix}) {
    auto id = ids->dimensions();
    if (id.size() != rank - 2 || !std::equal(id.begin(), id.end(), qd.begin()))
      return ffi::Error::InvalidArgument("segment and prefix ids must be [batch, length]");
  }
  if (shape->length % BLOCK != 0 || shape->dim % 16 != 0)
    return ffi::Error::InvalidArgument("length must be a multiple of 64 and dim of 16");
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, F32Buffer q, F32Buffer k, F32Buffer v,
                   S32Buffer segment, S32Buffer prefix, float scale,
                   ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse) {
  Shape s;
  if (ffi::Error error = check_shape(q, k, v, segment, prefix, &s); error.failure()) return error;
  parallel_for(pool, s.batch * s.kv_heads, [&](long unit) {
    forward_unit(s, unit, scale, q.typed_data(), k.typed_data(), v.typed_data(),
                 segment.typed_data(), prefix.typed_data(), out->typed_data(), lse->typed_data());
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, F32Buffer q, F32Buffer k, F32Buffer v,
                    S32Buffer segment, S32Buffer prefix, F32Buffer out, F32Buffer lse,
                    F32Buffer grad, float scale, ffi::ResultBuffer<ffi::F32> dq,
                    ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv) {
  Shape s;
  if (ffi::Error error = check_shape(q, k, v, segment, prefix, &s); error.failure()) return error;
  parallel_for(pool, s.batch * s.kv_heads, [&](long unit) {
    backward_unit(s, unit, scale, q.typed_data(), k.typed_data(), v.typed_data(),
                  segment.typed_data(), prefix.typed_data(), out.typed_data(), lse.typed_data(),
                  grad.typed_data(), dq->typed_data(), dk->typed_data(), dv->typed_data());
  });
  return ffi::Error::Success();
}

// Both handlers take the thread pool, then q, k, v, segment ids and prefix ids.
auto bind_attention_inputs() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<F32Buffer>()
      .Arg<F32Buffer>()
      .Arg<F32Buffer>()
      .Arg<S32Buffer>()
      .Arg<S32Buffer>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxrmFlashForward, Forward,
                              bind_attention_inputs()
                                  .Attr<float>("scale")
                                  .Ret<F32Buffer>()  // out
                                  .Ret<F32Buffer>());  // log-sum-exp

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxrmFlashBackward, Backward,
                              bind_attention_inputs()
                                  .Arg<F32Buffer>()  // out
                                  .Arg<F32Buffer>()  // log-sum-exp
                                  .Arg<F32Buffer>()  // the output's gradient
                                  .Attr<float>("scale")
                                  .Ret<F32Buffer>()  // dq
                                  .Ret<F32Buffer>()  // dk
                                  .Ret<F32Buffer>());  // dv
