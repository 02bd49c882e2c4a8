// Fused CPU kernels for the bfloat16 forward, built and loaded by server/model/kernels.py.
//
// Each element-wise op rounds to bf16 exactly where the chain of torch ops it replaces does (the Hugging Face
// Llama forward rounds after every op in bf16) and computes in float32 in between, through ATen's own vector types,
// so conversions, rounding and exp() are the very ones torch's kernels use. Only reductions (the RMSNorm sum of
// squares, attention) may sum in another order. Decode attention reads the paged KV cache in place and keeps
// scores, softmax and the weighted sum in float32.

#include <ATen/ATen.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <omp.h>
#include <optional>
#include <tuple>
#include <vector>

namespace {

using at::BFloat16;
using at::Tensor;
using fVec = at::vec::Vectorized<float>;
using bVec = at::vec::Vectorized<BFloat16>;
constexpr int64_t kF = fVec::size();  // floats per vector
constexpr int64_t kB = bVec::size();  // bf16 values per vector: two float vectors' worth

inline std::tuple<fVec, fVec> load2(const BFloat16* p) { return at::vec::convert_bfloat16_float(bVec::loadu(p)); }

inline void store2(BFloat16* p, const fVec& a, const fVec& b) { at::vec::convert_float_bfloat16(a, b).store(p); }

inline void round2(fVec& a, fVec& b) {  // each lane to the nearest bf16, kept as float
  std::tie(a, b) = at::vec::convert_bfloat16_float(at::vec::convert_float_bfloat16(a, b));
}

inline float round1(float x) { return static_cast<float>(BFloat16(x)); }

void check_bf16(const Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 && t.device().is_cpu(), name, " must be a CPU bfloat16 tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// f(begin, end) over [0, n) split into one contiguous range per thread, at least `grain` items each, with the calling
// thread's OpenMP team: the engine thread's (server/threads.py). Not at::parallel_for: compiled into this library,
// its first call on a thread re-applies the process-wide thread count of whichever thread set one last (a loader
// thread pinned to one), which would leave the engine on one core.
template <typename F>
void parallel_range(int64_t n, int64_t grain, const F& f) {
  const int64_t threads = std::min<int64_t>(omp_get_max_threads(), (n + grain - 1) / std::max<int64_t>(grain, 1));
  if (threads <= 1 || omp_in_parallel()) {
    f(0, n);
    return;
  }
#pragma omp parallel num_threads(threads)
  {
    const int64_t team = omp_get_num_threads(), chunk = (n + team - 1) / team;
    const int64_t begin = omp_get_thread_num() * chunk, end = std::min(n, begin + chunk);
    if (begin < end) {
      f(begin, end);
    }
  }
}

// Rows of `n` values in parallel chunks of at least 8K values; small batches run on the calling thread.
template <typename F>
void for_rows(int64_t rows, int64_t n, const F& f) {
  parallel_range(rows, std::max<int64_t>(1, 8192 / std::max<int64_t>(n, 1)), f);
}

// out = weight * bf16(r * rsqrt(mean(r²) + eps)) with r = x, or r = bf16(x + residual) stored back to residual.
template <bool kAdd>
Tensor norm_impl(const Tensor& x, BFloat16* residual, const Tensor& weight, double eps) {
  check_bf16(x, "x");
  check_bf16(weight, "weight");
  const int64_t n = x.size(-1), rows = x.numel() / n;
  TORCH_CHECK(weight.numel() == n, "weight must have the hidden size");
  Tensor out = at::empty_like(x);
  const BFloat16* xs = x.const_data_ptr<BFloat16>();
  const BFloat16* w = weight.const_data_ptr<BFloat16>();
  BFloat16* os = out.mutable_data_ptr<BFloat16>();
  const int64_t main = n - n % kB;
  for_rows(rows, n, [&](int64_t begin, int64_t end) {
    std::vector<float> r(n);
    for (int64_t row = begin; row < end; ++row) {
      const BFloat16* xr = xs + row * n;
      BFloat16* res = kAdd ? residual + row * n : nullptr;
      fVec acc0(0.f), acc1(0.f);
      for (int64_t i = 0; i < main; i += kB) {
        auto [a, b] = load2(xr + i);
        if constexpr (kAdd) {
          auto [c, d] = load2(res + i);
          a = a + c;
          b = b + d;
          round2(a, b);
          store2(res + i, a, b);
        }
        a.store(r.data() + i);
        b.store(r.data() + i + kF);
        acc0 = at::vec::fmadd(a, a, acc0);
        acc1 = at::vec::fmadd(b, b, acc1);
      }
      float tail = 0.f;
      for (int64_t i = main; i < n; ++i) {
        float v = static_cast<float>(xr[i]);
        if constexpr (kAdd) {
          v = round1(v + static_cast<float>(res[i]));
          res[i] = BFloat16(v);
        }
        r[i] = v;
        tail += v * v;
      }
      const float sum = at::vec::vec_reduce_all([](fVec& p, fVec& q) { return p + q; }, acc0 + acc1) + tail;
      const float scale = 1.f / std::sqrt(sum / static_cast<float>(n) + static_cast<float>(eps));
      const fVec s(scale);
      BFloat16* o = os + row * n;
      for (int64_t i = 0; i < main; i += kB) {
        fVec a = fVec::loadu(r.data() + i) * s, b = fVec::loadu(r.data() + i + kF) * s;
        round2(a, b);
        auto [wa, wb] = load2(w + i);
        store2(o + i, wa * a, wb * b);
      }
      for (int64_t i = main; i < n; ++i) {
        o[i] = BFloat16(static_cast<float>(w[i]) * round1(r[i] * scale));
      }
    }
  });
  return out;
}

Tensor rms_norm(const Tensor& x, const Tensor& weight, double eps) { return norm_impl<false>(x, nullptr, weight, eps); }

Tensor add_rms_norm(const Tensor& x, const Tensor& residual, const Tensor& weight, double eps) {
  check_bf16(residual, "residual");
  TORCH_CHECK(residual.sizes() == x.sizes(), "residual and x must have the same shape");
  return norm_impl<true>(x, residual.mutable_data_ptr<BFloat16>(), weight, eps);
}

// bf16(bf16(silu(gate)) * up) for gate_up = [gate | up] along the last dimension.
Tensor silu_mul(const Tensor& gate_up) {
  check_bf16(gate_up, "gate_up");
  const int64_t width = gate_up.size(-1), n = width / 2, rows = gate_up.numel() / width;
  auto sizes = gate_up.sizes().vec();
  sizes.back() = n;
  Tensor out = at::empty(sizes, gate_up.options());
  const BFloat16* src = gate_up.const_data_ptr<BFloat16>();
  BFloat16* dst = out.mutable_data_ptr<BFloat16>();
  const int64_t main = n - n % kB;
  const fVec one(1.f);
  for_rows(rows, n, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const BFloat16* g = src + row * width;
      const BFloat16* u = g + n;
      BFloat16* o = dst + row * n;
      for (int64_t i = 0; i < main; i += kB) {
        auto [ga, gb] = load2(g + i);
        fVec sa = ga / (one + ga.neg().exp()), sb = gb / (one + gb.neg().exp());  // torch's bf16 silu
        round2(sa, sb);
        auto [ua, ub] = load2(u + i);
        store2(o + i, sa * ua, sb * ub);
      }
      for (int64_t i = main; i < n; ++i) {
        const float v = static_cast<float>(g[i]);
        o[i] = BFloat16(round1(v / (1.f + std::exp(-v))) * static_cast<float>(u[i]));
      }
    }
  });
  return out;
}

// Rotate-half rotary on `count` values of each half: x1' = x1·c1 - x2·s1, x2' = x2·c2 + x1·s2, rounded per op.
inline void rotate(BFloat16* x, const BFloat16* c, const BFloat16* s, int64_t half) {
  const int64_t main = half - half % kB;
  for (int64_t i = 0; i < main; i += kB) {
    auto [x1a, x1b] = load2(x + i);
    auto [x2a, x2b] = load2(x + half + i);
    auto [c1a, c1b] = load2(c + i);
    auto [c2a, c2b] = load2(c + half + i);
    auto [s1a, s1b] = load2(s + i);
    auto [s2a, s2b] = load2(s + half + i);
    fVec p1a = x1a * c1a, p1b = x1b * c1b, q1a = x2a * s1a, q1b = x2b * s1b;
    fVec p2a = x2a * c2a, p2b = x2b * c2b, q2a = x1a * s2a, q2b = x1b * s2b;
    round2(p1a, p1b);
    round2(q1a, q1b);
    round2(p2a, p2b);
    round2(q2a, q2b);
    store2(x + i, p1a - q1a, p1b - q1b);
    store2(x + half + i, p2a + q2a, p2b + q2b);
  }
  for (int64_t i = main; i < half; ++i) {
    const float x1 = static_cast<float>(x[i]), x2 = static_cast<float>(x[half + i]);
    const float c1 = static_cast<float>(c[i]), c2 = static_cast<float>(c[half + i]);
    const float s1 = static_cast<float>(s[i]), s2 = static_cast<float>(s[half + i]);
    x[i] = BFloat16(round1(x1 * c1) - round1(x2 * s1));
    x[half + i] = BFloat16(round1(x2 * c2) + round1(x1 * s2));
  }
}

// In place on qkv [T, (H + 2·Hkv)·d]: rotate the H query and Hkv key heads of each token by its cos/sin row
// [T, d], then store the token's key and value heads at its flat slot of the paged caches
// (k: [blocks, Hkv, d, block_size], v: [blocks, Hkv, block_size, d]).
void rope_and_cache(const Tensor& qkv, const Tensor& cos, const Tensor& sin, const Tensor& k_cache,
                    const Tensor& v_cache, const Tensor& slots, int64_t num_heads, int64_t num_kv_heads) {
  for (const auto& [t, name] : {std::pair{qkv, "qkv"}, {cos, "cos"}, {sin, "sin"}, {k_cache, "k_cache"},
                                {v_cache, "v_cache"}}) {
    check_bf16(t, name);
  }
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous(), "slots must be contiguous int64");
  const int64_t tokens = qkv.size(0), width = qkv.size(1), d = cos.size(-1), block_size = k_cache.size(-1);
  TORCH_CHECK(width == (num_heads + 2 * num_kv_heads) * d && d % 2 == 0, "qkv width does not match the heads");
  TORCH_CHECK(slots.numel() == tokens && cos.size(0) == tokens && sin.size(0) == tokens, "one row per token");
  TORCH_CHECK(k_cache.size(1) == num_kv_heads && k_cache.size(2) == d && v_cache.size(3) == d, "cache layout");
  const int64_t capacity = k_cache.size(0) * block_size;
  BFloat16* x = qkv.mutable_data_ptr<BFloat16>();
  const BFloat16* cs = cos.const_data_ptr<BFloat16>();
  const BFloat16* sn = sin.const_data_ptr<BFloat16>();
  BFloat16* kc = k_cache.mutable_data_ptr<BFloat16>();
  BFloat16* vc = v_cache.mutable_data_ptr<BFloat16>();
  const int64_t* slot = slots.const_data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(slot[t] >= 0 && slot[t] < capacity, "KV slot out of range");
  }
  for_rows(tokens, width, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      BFloat16* row = x + t * width;
      for (int64_t h = 0; h < num_heads + num_kv_heads; ++h) {
        rotate(row + h * d, cs + t * d, sn + t * d, d / 2);
      }
      const int64_t block = slot[t] / block_size, offset = slot[t] % block_size;
      for (int64_t h = 0; h < num_kv_heads; ++h) {
        const BFloat16* k = row + (num_heads + h) * d;
        BFloat16* kdst = kc + ((block * num_kv_heads + h) * d) * block_size + offset;
        for (int64_t i = 0; i < d; ++i) {
          kdst[i * block_size] = k[i];
        }
        std::memcpy(vc + ((block * num_kv_heads + h) * block_size + offset) * d,
                    row + (num_heads + num_kv_heads + h) * d, d * sizeof(BFloat16));
      }
    }
  });
}

inline void to_float(const BFloat16* src, float* dst, int64_t n) {
  const int64_t main = n - n % kB;
  for (int64_t i = 0; i < main; i += kB) {
    auto [a, b] = load2(src + i);
    a.store(dst + i);
    b.store(dst + i + kF);
  }
  for (int64_t i = main; i < n; ++i) {
    dst[i] = static_cast<float>(src[i]);
  }
}

inline fVec load_floats(const BFloat16* p, int64_t lanes) {  // up to kF bf16 values as one float vector
  return std::get<0>(at::vec::convert_bfloat16_float(bVec::loadu(p, lanes)));
}

// softmax(q·Kᵀ)·V for G query heads sharing one KV head of one sequence, the accumulators of all G heads in registers,
// over the key positions [start, length) (start > 0 in a sliding window).
// q: [G, d] float, already scaled; blocks: the sequence's cache blocks; scores: room for [G, length]; out: [G, d].
template <int G>
void attend(const float* q, const BFloat16* kc, const BFloat16* vc, const int64_t* blocks, int64_t start,
            int64_t length, int64_t d, int64_t block_size, int64_t kv_heads, int64_t kvh, float* scores,
            BFloat16* out) {
  const int64_t num_blocks = (length + block_size - 1) / block_size, first_block = start / block_size;
  for (int64_t j = first_block; j < num_blocks; ++j) {  // scores: one key row [block_size] per feature, for G heads
    const BFloat16* keys = kc + (blocks[j] * kv_heads + kvh) * d * block_size;
    const int64_t count = std::min(block_size, length - j * block_size);
    for (int64_t p0 = std::max<int64_t>(0, start - j * block_size); p0 < count; p0 += kF) {
      const int64_t lanes = std::min(kF, count - p0);
      fVec acc[G];
      for (int g = 0; g < G; ++g) {
        acc[g] = fVec(0.f);
      }
      for (int64_t i = 0; i < d; ++i) {
        const fVec k = load_floats(keys + i * block_size + p0, lanes);
        for (int g = 0; g < G; ++g) {
          acc[g] = at::vec::fmadd(fVec(q[g * d + i]), k, acc[g]);
        }
      }
      for (int g = 0; g < G; ++g) {
        acc[g].store(scores + g * length + j * block_size + p0, lanes);
      }
    }
  }
  float total[G];
  for (int g = 0; g < G; ++g) {  // softmax, unnormalised; the output divides by the total
    float* s = scores + g * length + start;
    const int64_t n = length - start;
    const float peak = at::vec::reduce_all([](fVec& a, fVec& b) { return at::vec::maximum(a, b); }, s, n);
    at::vec::map([peak](fVec v) { return (v - fVec(peak)).exp(); }, s, s, n);
    total[g] = at::vec::reduce_all([](fVec& a, fVec& b) { return a + b; }, s, n);
  }
  for (int64_t c = 0; c < d; c += kF) {  // values: kF features at a time, one value row per position
    const int64_t lanes = std::min(kF, d - c);
    fVec acc[G];
    for (int g = 0; g < G; ++g) {
      acc[g] = fVec(0.f);
    }
    for (int64_t j = first_block; j < num_blocks; ++j) {
      const BFloat16* values = vc + (blocks[j] * kv_heads + kvh) * block_size * d + c;
      const int64_t count = std::min(block_size, length - j * block_size);
      for (int64_t p = std::max<int64_t>(0, start - j * block_size); p < count; ++p) {
        const fVec v = load_floats(values + p * d, lanes);
        for (int g = 0; g < G; ++g) {
          acc[g] = at::vec::fmadd(fVec(scores[g * length + j * block_size + p]), v, acc[g]);
        }
      }
    }
    for (int g = 0; g < G; ++g) {
      at::vec::convert_float_bfloat16(acc[g] / fVec(total[g]), fVec(0.f)).store(out + g * d + c, lanes);
    }
  }
}

using AttendFn = void (*)(const float*, const BFloat16*, const BFloat16*, const int64_t*, int64_t, int64_t, int64_t,
                          int64_t, int64_t, int64_t, float*, BFloat16*);

AttendFn attend_for(int64_t group) {  // GQA groups up to 8 share each key and value load; larger ones go head by head
  switch (group) {
    case 1: return attend<1>;
    case 2: return attend<2>;
    case 3: return attend<3>;
    case 4: return attend<4>;
    case 5: return attend<5>;
    case 6: return attend<6>;
    case 7: return attend<7>;
    case 8: return attend<8>;
    default: return nullptr;
  }
}

// softmax(q·Kᵀ·scale)·V for the decode rows `tokens` (one query token each) of q [T, H, d] (rows may be strided,
// heads not), reading each row's blocks `tables[r, :ceil(lens[r] / block_size)]` of the caches in place; writes
// out[tokens[r]] of out [T, H, d]. window > 0: a row sees only its last `window` keys (sliding-window layers).
void decode_attention(const Tensor& q_heads, const Tensor& k_cache, const Tensor& v_cache, const Tensor& tokens,
                      const Tensor& tables, const Tensor& lens, const Tensor& out, double scale, int64_t window) {
  for (const auto& [t, name] : {std::pair{k_cache, "k_cache"}, {v_cache, "v_cache"}, {out, "out"}}) {
    check_bf16(t, name);
  }
  for (const auto& [t, name] : {std::pair{tokens, "tokens"}, {tables, "tables"}, {lens, "lens"}}) {
    TORCH_CHECK(t.scalar_type() == at::kLong && t.is_contiguous(), name, " must be contiguous int64");
  }
  TORCH_CHECK(q_heads.scalar_type() == at::kBFloat16 && q_heads.dim() == 3, "q must be bfloat16 [T, heads, d]");
  const int64_t d = k_cache.size(2), block_size = k_cache.size(3), num_heads = q_heads.size(1);
  const int64_t num_kv_heads = k_cache.size(1), width = q_heads.stride(0);
  TORCH_CHECK(q_heads.size(2) == d && q_heads.stride(2) == 1 && q_heads.stride(1) == d, "q heads must be packed");
  TORCH_CHECK(num_heads % num_kv_heads == 0 && out.sizes() == q_heads.sizes(), "out must be shaped like q");
  const int64_t rows = tokens.numel(), group = num_heads / num_kv_heads, table_width = tables.size(1);
  const int64_t num_blocks = k_cache.size(0);
  TORCH_CHECK(tables.size(0) == rows && lens.numel() == rows, "one table and length per decode row");
  const BFloat16* x = q_heads.const_data_ptr<BFloat16>();
  const BFloat16* kc = k_cache.const_data_ptr<BFloat16>();
  const BFloat16* vc = v_cache.const_data_ptr<BFloat16>();
  BFloat16* o = out.mutable_data_ptr<BFloat16>();
  const int64_t* tok = tokens.const_data_ptr<int64_t>();
  const int64_t* table = tables.const_data_ptr<int64_t>();
  const int64_t* len = lens.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(len[r] >= 1 && len[r] <= table_width * block_size, "context length out of range");
    TORCH_CHECK(tok[r] >= 0 && tok[r] < out.size(0), "token index out of range");
    for (int64_t j = 0; j < (len[r] + block_size - 1) / block_size; ++j) {
      TORCH_CHECK(table[r * table_width + j] >= 0 && table[r * table_width + j] < num_blocks, "block out of range");
    }
  }
  const float sc = static_cast<float>(scale);
  const AttendFn fn = attend_for(group);
  parallel_range(rows * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q(group * d), scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / num_kv_heads, kvh = item % num_kv_heads, length = len[r];
      const int64_t start = window > 0 ? std::max<int64_t>(0, length - window) : 0;
      scores.resize(group * length);
      to_float(x + tok[r] * width + kvh * group * d, q.data(), group * d);  // the group's query heads
      at::vec::map([sc](fVec v) { return v * fVec(sc); }, q.data(), q.data(), group * d);
      const int64_t* blocks = table + r * table_width;
      BFloat16* dst = o + (tok[r] * num_heads + kvh * group) * d;
      if (fn != nullptr) {
        fn(q.data(), kc, vc, blocks, start, length, d, block_size, num_kv_heads, kvh, scores.data(), dst);
      } else {
        for (int64_t g = 0; g < group; ++g) {
          attend<1>(q.data() + g * d, kc, vc, blocks, start, length, d, block_size, num_kv_heads, kvh,
                    scores.data(), dst + g * d);
        }
      }
    }
  });
}

// x [in] (float) against one granule of A [in, g] (bf16, g = 8 or 16): acc[j] += sum_i x[i]·A[i, j].
inline void shrink_granule(const float* x, const BFloat16* a, int64_t in, int64_t g, float* acc) {
  fVec sum(0.f);
  int64_t i = 0;
  if (g == kF) {
    for (; i < in; ++i) {
      sum = at::vec::fmadd(fVec(x[i]), std::get<0>(at::vec::convert_bfloat16_float(bVec::loadu(a + i * g, kF))), sum);
    }
  } else if (g == kF / 2) {  // two rows of A per vector: lanes 0-7 weigh row i, lanes 8-15 row i + 1
    for (; i + 1 < in; i += 2) {
      const fVec w = fVec::set(fVec(x[i + 1]), fVec(x[i]), kF / 2);
      sum = at::vec::fmadd(w, std::get<0>(at::vec::convert_bfloat16_float(bVec::loadu(a + i * g, kF))), sum);
    }
  }
  float lanes[kF];
  sum.store(lanes);
  if (g == kF) {
    for (int64_t j = 0; j < g; ++j) {
      acc[j] += lanes[j];
    }
  } else if (g == kF / 2) {  // fold the two rows' halves
    for (int64_t j = 0; j < g; ++j) {
      acc[j] += lanes[j] + lanes[j + kF / 2];
    }
  }
  for (; i < in; ++i) {  // an odd last row, or another granule width
    for (int64_t j = 0; j < g; ++j) {
      acc[j] += x[i] * static_cast<float>(a[i * g + j]);
    }
  }
}

// Per-token LoRA (BGMV) for the tokens whose slot-buffer row rows[t] has a rank here (row_ranks[row] > 0):
// y[t, start : start + out] += (x[t]·Aᵀ)·(s·B)ᵀ, in float32, rounded to bf16 once.
// a_t: [rows, granules, in, g] (Aᵀ in granules of g ranks), b_t: [rows, cap, out] ((s·B)ᵀ).
void lora_gather(const Tensor& x, const Tensor& y, const Tensor& rows, const Tensor& row_ranks, const Tensor& a_t,
                 const Tensor& b_t, int64_t start) {
  for (const auto& [t, name] : {std::pair{x, "x"}, {y, "y"}, {a_t, "a_t"}, {b_t, "b_t"}}) {
    check_bf16(t, name);
  }
  for (const auto& [t, name] : {std::pair{rows, "rows"}, {row_ranks, "row_ranks"}}) {
    TORCH_CHECK(t.scalar_type() == at::kLong && t.is_contiguous(), name, " must be contiguous int64");
  }
  const int64_t tokens = x.size(0), in = x.size(1), width = y.size(1), buffers = a_t.size(0);
  const int64_t granules = a_t.size(1), g = a_t.size(3), cap = b_t.size(1), out = b_t.size(2);
  TORCH_CHECK(a_t.size(2) == in && b_t.size(0) == buffers && cap <= granules * g, "slot buffer shapes");
  TORCH_CHECK(rows.numel() == tokens && y.size(0) == tokens && start >= 0 && start + out <= width, "token shapes");
  TORCH_CHECK(row_ranks.numel() == buffers, "one rank per buffer row");
  const int64_t* row = rows.const_data_ptr<int64_t>();
  const int64_t* rank = row_ranks.const_data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(row[t] >= 0 && row[t] < buffers, "buffer row out of range");
    TORCH_CHECK(rank[row[t]] >= 0 && rank[row[t]] <= cap, "rank out of range");
  }
  const BFloat16* xs = x.const_data_ptr<BFloat16>();
  const BFloat16* as = a_t.const_data_ptr<BFloat16>();
  const BFloat16* bs = b_t.const_data_ptr<BFloat16>();
  BFloat16* ys = y.mutable_data_ptr<BFloat16>();
  parallel_range(tokens, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> xf(in), xa(granules * g), delta(out);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r = rank[row[t]];
      if (r == 0) {
        continue;
      }
      to_float(xs + t * in, xf.data(), in);
      std::fill(xa.begin(), xa.end(), 0.f);
      for (int64_t k = 0; k * g < r; ++k) {
        shrink_granule(xf.data(), as + ((row[t] * granules + k) * in) * g, in, g, xa.data() + k * g);
      }
      std::fill(delta.begin(), delta.end(), 0.f);
      const BFloat16* b = bs + row[t] * cap * out;
      const int64_t main = out - out % kB;
      for (int64_t j = 0; j < r; ++j) {
        const fVec w(xa[j]);
        for (int64_t o = 0; o < main; o += kB) {
          auto [lo, hi] = load2(b + j * out + o);
          at::vec::fmadd(w, lo, fVec::loadu(delta.data() + o)).store(delta.data() + o);
          at::vec::fmadd(w, hi, fVec::loadu(delta.data() + o + kF)).store(delta.data() + o + kF);
        }
        for (int64_t o = main; o < out; ++o) {
          delta[o] += xa[j] * static_cast<float>(b[j * out + o]);
        }
      }
      BFloat16* yr = ys + t * width + start;
      for (int64_t o = 0; o < main; o += kB) {
        auto [lo, hi] = load2(yr + o);
        store2(yr + o, lo + fVec::loadu(delta.data() + o), hi + fVec::loadu(delta.data() + o + kF));
      }
      for (int64_t o = main; o < out; ++o) {
        yr[o] = BFloat16(static_cast<float>(yr[o]) + delta[o]);
      }
    }
  });
}


// `rows` rows of G values, from rows `stride` values apart to consecutive ones: a granule of Aᵀ into a slot buffer.
template <int64_t G>
inline void copy_granule(BFloat16* dst, const BFloat16* src, int64_t rows, int64_t stride) {
  for (int64_t i = 0; i < rows; ++i) {
    std::memcpy(dst + i * G, src + i * stride, G * sizeof(BFloat16));
  }
}

// t [m, n] as the memory of tᵀ [n, m] in bf16: t itself where it is a view of such memory, else a copy.
const BFloat16* transposed_bf16(const Tensor& t, Tensor& keep) {
  const bool view = t.scalar_type() == at::kBFloat16 && t.device().is_cpu() && t.stride(0) == 1 &&
                    (t.size(1) == 1 || t.stride(1) == t.size(0));
  keep = view ? t : t.t().to(at::kBFloat16).contiguous().t();
  TORCH_CHECK(keep.device().is_cpu(), "the update must be in host memory");
  return keep.const_data_ptr<BFloat16>();
}

// One slot's row of the LoRA slot buffers (server/model/lora.py) made to hold an update of rank r (0: none) where
// an update of rank `held` was: a_t [rows, granules, in, g] gets Aᵀ in granules of g ranks, b_t [rows, cap, out]
// gets (s·B)ᵀ, ranks from r up to `held` become zero, row_ranks[row] = r. a [r, in] and b [out, r] are the host
// weights, views of Aᵀ [in, r] and (s·B)ᵀ [r, out] memory (server/adapters/packing.py), so every copy is a run of
// contiguous values; other layouts and dtypes are made so first. One call instead of a dozen torch ops per
// projection: a fill runs on the engine thread between steps.
void lora_fill(const Tensor& a_t, const Tensor& b_t, const Tensor& row_ranks, int64_t row, int64_t held,
               const std::optional<Tensor>& a, const std::optional<Tensor>& b) {
  check_bf16(a_t, "a_t");
  check_bf16(b_t, "b_t");
  TORCH_CHECK(row_ranks.scalar_type() == at::kLong && row_ranks.is_contiguous(), "row_ranks must be contiguous int64");
  TORCH_CHECK(a.has_value() == b.has_value(), "a and b come together");
  const int64_t buffers = a_t.size(0), granules = a_t.size(1), in = a_t.size(2), g = a_t.size(3);
  const int64_t cap = b_t.size(1), out = b_t.size(2);
  TORCH_CHECK(b_t.size(0) == buffers && row_ranks.numel() == buffers && cap <= granules * g, "slot buffer shapes");
  TORCH_CHECK(row >= 0 && row < buffers && held >= 0 && held <= cap, "row or held rank out of range");
  Tensor a_keep, b_keep;
  const BFloat16 *at_src = nullptr, *bt_src = nullptr;  // Aᵀ [in, r] and (s·B)ᵀ [r, out]
  int64_t r = 0;
  if (a.has_value()) {
    r = a->size(0);
    TORCH_CHECK(a->dim() == 2 && a->size(1) == in && b->dim() == 2 && b->size(0) == out && b->size(1) == r,
                "a must be [r, in] and b [out, r] for this projection");
    TORCH_CHECK(r <= cap, "rank ", r, " is over the buffers' capacity ", cap);
    at_src = transposed_bf16(*a, a_keep);
    bt_src = transposed_bf16(*b, b_keep);
  }
  BFloat16* arow = a_t.mutable_data_ptr<BFloat16>() + row * granules * in * g;
  const int64_t touched = (std::max(r, held) + g - 1) / g;  // granules either adapter reaches
  for (int64_t k = 0; k < touched; ++k) {
    const int64_t ranks = std::clamp<int64_t>(r - k * g, 0, g);  // of the new adapter, in this granule
    BFloat16* dst = arow + k * in * g;
    const BFloat16* src = at_src + k * g;
    if (ranks == 16 && g == 16) {
      copy_granule<16>(dst, src, in, r);
    } else if (ranks == 8 && g == 8) {
      copy_granule<8>(dst, src, in, r);
    } else if (ranks == 0) {
      std::fill(dst, dst + in * g, BFloat16(0.f));
    } else {
      for (int64_t i = 0; i < in; ++i) {
        std::memcpy(dst + i * g, src + i * r, ranks * sizeof(BFloat16));
        std::fill(dst + i * g + ranks, dst + (i + 1) * g, BFloat16(0.f));
      }
    }
  }
  BFloat16* brow = b_t.mutable_data_ptr<BFloat16>() + row * cap * out;
  if (r > 0) {
    std::memcpy(brow, bt_src, r * out * sizeof(BFloat16));
  }
  if (held > r) {
    std::fill(brow + r * out, brow + held * out, BFloat16(0.f));
  }
  row_ranks.mutable_data_ptr<int64_t>()[row] = r;
}

}  // namespace

TORCH_LIBRARY(loraplex, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor(a!) residual, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def(
      "rope_and_cache(Tensor(a!) qkv, Tensor cos, Tensor sin, Tensor(b!) k_cache, Tensor(c!) v_cache, Tensor slots, "
      "int num_heads, int num_kv_heads) -> ()");
  m.def(
      "decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor tokens, Tensor tables, Tensor lens, "
      "Tensor(a!) out, float scale, int window) -> ()");
  m.def(
      "lora_gather(Tensor x, Tensor(a!) y, Tensor rows, Tensor row_ranks, Tensor a_t, Tensor b_t, int start) -> ()");
  m.def(
      "lora_fill(Tensor(a!) a_t, Tensor(b!) b_t, Tensor(c!) row_ranks, int row, int held, Tensor? a, Tensor? b) -> ()");
}

TORCH_LIBRARY_IMPL(loraplex, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("silu_mul", &silu_mul);
  m.impl("rope_and_cache", &rope_and_cache);
  m.impl("decode_attention", &decode_attention);
  m.impl("lora_gather", &lora_gather);
  m.impl("lora_fill", &lora_fill);
}
