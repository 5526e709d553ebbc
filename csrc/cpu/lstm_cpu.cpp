// CPU implementation of fastlstm::lstm_layer_forward / lstm_layer_backward (contract in
// csrc/fastlstm.cpp). Compiled once per instruction set (setup.py: fastlstm._cpu_avx512, _cpu_avx2,
// _cpu_generic); fastlstm/_loader.py imports the one this CPU runs.
//
// Forward: one GEMM projects the input of all timesteps into a [T, B, 4H] buffer (inference: a few
// steps at a time, by each block for its own columns where the weights are small). Each step is one
// parallel loop over blocks of about 32 (AVX-512) or 64 hidden units in whole 16-unit groups
// (UnitBlocks): a thread multiplies h_{t-1} by its block's part of w_hh (all four gates' columns
// for those units: packed panels for long calls, w_hh read in place
// for short ones, see forward_impl), then runs the fused gate and cell update for the block, writing
// the post-activation gates back into the buffer (which in float32/float64 is itself the saved
// `gates`). No thread waits for another between the matmul and the pointwise math; h is
// double-buffered so blocks never read a half-written state. Block sizes and GEMM tiles depend on
// the shapes only, so results do not depend on the thread count. Backward: per step, the gate
// gradients dG_t row by row, then dh_{t-1} = dG_t @ w_hh over column blocks; input and weight
// gradients are large GEMMs over all T*B rows after the loop.
//
// The matmuls use torch's oneDNN brgemm micro-kernel for float32 where it runs (cpu/blas.h), else
// the BLAS that libtorch exports. bfloat16 runs brgemm's bf16 kernel where the CPU has avx512_bf16
// (float32 accumulation, float32 gate math and cell state); elsewhere, and for float16, the float32
// code runs on converted copies. h is rounded to the input dtype at each step, because that is the
// value the next step and the caller see.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Config.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <atomic>
#include <chrono>
#include <thread>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "cpu/blas.h"
#include "cpu/gate_math.h"
#include "lstm_checks.h"

namespace fastlstm {
namespace {

using at::vec::Vectorized;
using cpu::vsigmoid;
using cpu::vtanh;

// Rows [0, rows) are processed; below `grain` rows the work stays on one thread.
template <typename F>
inline void for_rows(int64_t rows, int64_t row_cost, const F& f) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_cost));
  at::parallel_for(0, rows, grain, f);
}

// cnt values of v stored as post_t (rounded when post_t is float16/bfloat16).
template <typename acc_t, typename post_t>
inline void store_as(const Vectorized<acc_t>& v, post_t* dst, int64_t cnt) {
  if constexpr (std::is_same_v<post_t, acc_t>) {
    v.store(dst, cnt);
  } else {
    acc_t tmp[Vectorized<acc_t>::size()];
    v.store(tmp, cnt);
    at::vec::convert(tmp, dst, cnt);
  }
}

// Gate/cell update of n hidden units of one batch row at one step. Gate q of unit j is the sum of
// pre[q * pre_stride + j] (the input part, a pre-activation), rec[q * rec_stride + j] (the
// recurrent part) and bias[q * pre_stride + j] (bias may be null); its post-activation goes to
// post[q * pre_stride + j] (post may be pre itself; a float16/bfloat16 post is the saved gates of
// a low-precision call, written rounded, with no float32 copy of them).
//   c: [n] cell state, updated in place; cell_out: [n] copy of the new c; m: [n] out: o * tanh(c)
// kSave = false (inference): neither the post-activations nor cell_out are written (post and cell_out
// may be null), 0.2-2% of a small inference call.
// Two vectors of units at a time where there are two full ones: each nonlinearity is a chain of
// dependent instructions, and two independent chains keep the core busier (1.28 -> 1.13 ns a unit,
// NOTES.md entry 38); the same arithmetic for every unit either way.
template <typename acc_t, typename post_t, bool kSave = true>
inline void cell_forward(int64_t n, const acc_t* pre, int64_t pre_stride, const acc_t* rec,
                         int64_t rec_stride, const acc_t* bias, acc_t* c, acc_t* cell_out, acc_t* m,
                         post_t* post) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t kV = Vec::size();
  int64_t j = 0;
  for (; j + 2 * kV <= n; j += 2 * kV) {
    auto gate = [&](int q, int64_t jj) {
      Vec v = Vec::loadu(pre + q * pre_stride + jj) + Vec::loadu(rec + q * rec_stride + jj);
      return bias == nullptr ? v : v + Vec::loadu(bias + q * pre_stride + jj);
    };
    const int64_t j1 = j + kV;
    const Vec i0 = vsigmoid(gate(0, j)), i1 = vsigmoid(gate(0, j1));
    const Vec f0 = vsigmoid(gate(1, j)), f1 = vsigmoid(gate(1, j1));
    const Vec z0 = vtanh(gate(2, j)), z1 = vtanh(gate(2, j1));
    const Vec o0 = vsigmoid(gate(3, j)), o1 = vsigmoid(gate(3, j1));
    const Vec c0 = f0 * Vec::loadu(c + j) + i0 * z0, c1 = f1 * Vec::loadu(c + j1) + i1 * z1;
    if constexpr (kSave) {
      store_as(i0, post + j, kV);
      store_as(i1, post + j1, kV);
      store_as(f0, post + pre_stride + j, kV);
      store_as(f1, post + pre_stride + j1, kV);
      store_as(z0, post + 2 * pre_stride + j, kV);
      store_as(z1, post + 2 * pre_stride + j1, kV);
      store_as(o0, post + 3 * pre_stride + j, kV);
      store_as(o1, post + 3 * pre_stride + j1, kV);
      c0.store(cell_out + j);
      c1.store(cell_out + j1);
    }
    c0.store(c + j);
    c1.store(c + j1);
    (o0 * vtanh(c0)).store(m + j);
    (o1 * vtanh(c1)).store(m + j1);
  }
  for (; j < n; j += kV) {
    const int64_t cnt = std::min(kV, n - j);
    auto gate = [&](int q) {
      Vec v = Vec::loadu(pre + q * pre_stride + j, cnt) + Vec::loadu(rec + q * rec_stride + j, cnt);
      return bias == nullptr ? v : v + Vec::loadu(bias + q * pre_stride + j, cnt);
    };
    const Vec i = vsigmoid(gate(0)), f = vsigmoid(gate(1)), z = vtanh(gate(2)), o = vsigmoid(gate(3));
    const Vec cn = f * Vec::loadu(c + j, cnt) + i * z;
    if constexpr (kSave) {
      store_as(i, post + j, cnt);
      store_as(f, post + pre_stride + j, cnt);
      store_as(z, post + 2 * pre_stride + j, cnt);
      store_as(o, post + 3 * pre_stride + j, cnt);
      cn.store(cell_out + j, cnt);
    }
    cn.store(c + j, cnt);
    (o * vtanh(cn)).store(m + j, cnt);
  }
}

// n values of p (float16/bfloat16 saved gates, or acc_t itself) widened to a vector of acc_t: the
// backward reads the saved low-precision gates in place instead of a converted copy of all of them.
template <typename acc_t, typename T>
inline Vectorized<acc_t> load_widened(const T* p, int64_t n) {
  using Vec = Vectorized<acc_t>;
  if constexpr (std::is_same_v<T, acc_t>) {
    return Vec::loadu(p, n);
  } else {
    if (n == Vec::size()) {
      Vec out;
      if constexpr (std::is_same_v<T, at::BFloat16>) {
        at::vec::load_fp32_from_bf16(p, out);
      } else {
        at::vec::load_fp32_from_fp16(p, out);
      }
      return out;
    }
    acc_t tmp[Vec::size()];
    for (int64_t k = 0; k < n; ++k) tmp[k] = static_cast<acc_t>(p[k]);
    return Vec::loadu(tmp, n);
  }
}

// Backward of cell_forward for one batch row (all H units; gates in the standard layout).
//   dm: [H] gradient of o * tanh(c); dc: [H] in: gradient of c_t, out: gradient of c_{t-1}
//   gates: [4H] saved post-activations (the input dtype); c: [H] saved c_t; c_prev: [H] c_{t-1}
//   dg: [4H] out: gradient of the pre-activations
template <typename acc_t, typename gate_t>
inline void cell_backward_row(int64_t H, const acc_t* dm, acc_t* dc, const gate_t* gates,
                              const acc_t* c, const acc_t* c_prev, acc_t* dg) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t kV = Vec::size();
  const Vec one(acc_t(1));
  for (int64_t j = 0; j < H; j += kV) {
    const int64_t n = std::min(kV, H - j);
    const Vec i = load_widened<acc_t>(gates + j, n), f = load_widened<acc_t>(gates + H + j, n);
    const Vec z = load_widened<acc_t>(gates + 2 * H + j, n);
    const Vec o = load_widened<acc_t>(gates + 3 * H + j, n);
    const Vec tc = vtanh(Vec::loadu(c + j, n));
    const Vec dmv = Vec::loadu(dm + j, n);
    const Vec dct = Vec::loadu(dc + j, n) + dmv * o * (one - tc * tc);
    (dct * z * i * (one - i)).store(dg + j, n);
    (dct * Vec::loadu(c_prev + j, n) * f * (one - f)).store(dg + H + j, n);
    (dct * i * (one - z * z)).store(dg + 2 * H + j, n);
    (dmv * tc * o * (one - o)).store(dg + 3 * H + j, n);
    (dct * f).store(dc + j, n);
  }
}

// Per step, how many leading rows are active. With lengths sorted in decreasing order (what a
// PackedSequence gives) inactive rows are a suffix and the matmuls skip them; otherwise all rows
// take part and the row loops test each one.
struct Activity {
  const int64_t* len = nullptr;  // [B] or null: every row runs every step
  bool sorted = false;
  int64_t B = 0;
  int64_t rows(int64_t t) const {
    if (len == nullptr || !sorted) return B;
    int64_t lo = 0, hi = B;  // first row with len <= t
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (len[mid] > t) lo = mid + 1; else hi = mid;
    }
    return lo;
  }
  bool active(int64_t b, int64_t t) const { return len == nullptr || len[b] > t; }
};

Activity make_activity(const at::Tensor& lengths_cpu, int64_t B) {
  Activity a;
  a.B = B;
  if (!lengths_cpu.defined()) return a;
  a.len = lengths_cpu.data_ptr<int64_t>();
  a.sorted = B > 0;  // an empty batch has no rows to skip (and `rows` users divide by B)
  for (int64_t b = 1; b < B; ++b) a.sorted &= a.len[b] <= a.len[b - 1];
  return a;
}

at::Tensor lengths_on_cpu(const std::optional<at::Tensor>& lengths, int64_t T) {
  if (!lengths.has_value() || !lengths->defined()) return {};
  auto l = lengths->contiguous();
  TORCH_CHECK(l.numel() == 0 || (l.min().item<int64_t>() >= 0 && l.max().item<int64_t>() <= T),
              "lengths must lie in [0, T] = [0, ", T, "]");
  return l;
}

at::Tensor opt_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? *t : at::Tensor();
}

// From this many rows on, the float32 input projection runs on brgemm tiles rather than at::mm (and
// native bfloat16's backward products on oneDNN's matmul). On AMD CPUs the MKL in torch's wheels runs
// float32 at about half of brgemm's rate (NOTES.md entry 12); below this, packing w_ih would cost
// more than the product (a decoding step). The float32 backward runs on brgemm at every size.
constexpr int64_t kBrgemmMinRows = 64;

// Input projection: c[M, 4H] = a[M, I] @ w^T for w [4H, I], a and c in M / B steps of B rows. With
// `rows` (sorted lengths: step s runs rows[s] rows, the rest is padding) only each step's running
// rows: the others are left unwritten (inference reads none of them; training writes them in the
// step loop). Products of kBrgemmMinRows rows or more (padding included, so that the choice does
// not depend on the lengths) go through brgemm on weight panels packed once per call (`panels`,
// filled on first use), tiles within each step's rows. The others go through ATen: with `rows`, one
// product over the running rows gathered together (a product a step ran at a few rows each, at
// half the rate: float64, B = 16, H = 1024), its rows then moved to their steps' places in c.
template <typename acc_t>
void project_input(const at::Tensor& a, const at::Tensor& w, at::Tensor& panels, at::Tensor c, int64_t B,
                   const int64_t* rows) {
  constexpr int64_t nt = 64;
  const int64_t M = a.size(0);
  if constexpr (std::is_same_v<acc_t, float>) {
    if (cpu::brgemm_usable() && M >= kBrgemmMinRows) {
      if (!panels.defined()) panels = cpu::pack_panels(w, nt);
      cpu::matmul_panels<float>(M, w.size(0), a.size(1), a.data_ptr<float>(), a.size(1), panels, nt,
                                c.data_ptr<float>(), c.size(1), B, rows);
      return;
    }
  }
  if (rows == nullptr) {
    at::mm_out(c, a, w.t());
    return;
  }
  const int64_t steps = M / B, I = a.size(1), N = c.size(1);
  int64_t running = 0;
  for (int64_t s = 0; s < steps; ++s) running += rows[s];
  at::Tensor packed = cpu::cached_empty({running, I}, a.options());
  const auto* src = static_cast<const char*>(a.data_ptr());
  auto* dst = static_cast<char*>(packed.data_ptr());
  const int64_t row_bytes = I * static_cast<int64_t>(a.element_size());
  for (int64_t s = 0, r = 0; s < steps; r += rows[s], ++s) {
    std::memcpy(dst + r * row_bytes, src + s * B * row_bytes, rows[s] * row_bytes);
  }
  at::Tensor head = c.narrow(0, 0, running);
  at::mm_out(head, packed, w.t());
  // Step s's rows from [r_s, r_s + rows[s]) to [s * B, ...): r_s <= s * B, so moved from the last
  // step back, no row is overwritten before it has moved.
  auto* out = static_cast<char*>(c.data_ptr());
  const int64_t out_bytes = N * static_cast<int64_t>(c.element_size());
  for (int64_t s = steps - 1, r = running; s >= 0; --s) {
    r -= rows[s];
    if (r != s * B) std::memmove(out + s * B * out_bytes, out + r * out_bytes, rows[s] * out_bytes);
  }
}

// block_proj (forward_impl): rows [r0, r0 + M) of the input projection for block k's gate columns:
// gate q of units [j0, j0 + n) into dst[m, q * H + j0 ...] (row stride 4H), from w_ih's per-block
// panels [blocks, I, 4nb] (gate q at column q * n; VNNI pairs for native
// bfloat16, x then bfloat16). Tiles of at most 256 rows, fixed by M.
template <typename acc_t>
void project_block(bool native, int64_t M, int64_t n, int64_t I, const at::Tensor& x, int64_t r0,
                   const at::Tensor& panels, int64_t k, int64_t nb, acc_t* dst, int64_t H,
                   int64_t j0) {
  const std::pair<int64_t, int64_t> tiles = cpu::row_tiles(M, 256);
  for (int64_t tile = 0; tile < tiles.first; ++tile) {
    const int64_t m0 = tile * tiles.second, mt = std::min(tiles.second, M - m0);
    for (int64_t q = 0; q < 4; ++q) {
      acc_t* c = dst + m0 * 4 * H + q * H + j0;
      if (native) {
        const auto* a = reinterpret_cast<const at::BFloat16*>(x.data_ptr()) + (r0 + m0) * I;
        const auto* b = reinterpret_cast<const at::BFloat16*>(panels.data_ptr()) + k * I * 4 * nb + q * n * 2;
        at::native::cpublas::brgemm(mt, n, I, I, 4 * nb, 4 * H, false, a, b, reinterpret_cast<float*>(c),
                                    true);
      } else {
        cpu::gemm_serial<acc_t>(mt, n, I, x.data_ptr<acc_t>() + (r0 + m0) * I, I,
                                panels.data_ptr<acc_t>() + k * I * 4 * nb + q * n, 4 * nb, c, 4 * H);
      }
    }
  }
}

// The step's hidden units in `count` blocks of whole 16-unit groups, as even as the groups allow:
// block k holds groups [k * groups / count, (k + 1) * groups / count). The count is the even number
// nearest groups / per (per: the groups a block should hold; on a tie the smaller count if it is 4
// or more and its blocks stay within 3 groups), one block if groups <= per. (H = 81-96 in the
// AVX-512 build: 4 blocks of 1-2 groups, not 2 of 3: 1.12 against 0.97-0.99x torch at B = 64, NOTES.md
// entry 54.) An even count gives the two halves of
// the blocks that two threads take the same number of groups, give or take one, whatever H is
// (with equal-width blocks H = 96 had split 64/32 units, H = 160 96/64). Fixed by H and the build
// alone, never by the thread count: every block computes the same sums in the same order whichever
// thread runs it.
struct UnitBlocks {
  int64_t H, groups, count, nb;  // nb: the widest block's units (the panels' stride is 4 * nb)
  int64_t j0(int64_t k) const { return 16 * (k * groups / count); }
  // Units below H: also the block's columns per gate in its panels and products, so a last group
  // that H ends inside is not multiplied past H (H = 200: 4% of the columns; results bitwise the
  // same as with padded groups, about 1-2% faster, NOTES.md entry 53).
  int64_t n(int64_t k) const { return std::min(H, j0(k + 1)) - j0(k); }
};

inline UnitBlocks unit_blocks(int64_t H, int64_t units) {
  const int64_t groups = (H + 15) / 16, per = units / 16;
  if (groups == 0) return {H, 0, 0, 16};  // H = 0, which the op accepts: no blocks
  int64_t count = 1;
  if (groups > per) {
    const int64_t lo = 2 * (groups / (2 * per)), hi = lo + 2;  // the even counts around groups / per
    const bool tie = 2 * groups == per * (lo + hi);
    count = lo >= 2 && (2 * groups < per * (lo + hi) || (tie && lo >= 4 && (groups + lo - 1) / lo <= 3)) ? lo : hi;
  }
  return {H, groups, count, 16 * ((groups + count - 1) / count)};
}

// w_hh [4H, P] as per-block panels [blocks, P, 4 * nb]: block k's column q * n + jj (n = its units)
// is gate q of hidden unit j0 + jj, so one matmul over its first 4n columns gives a block all it
// needs for its update (columns past 4n are never read). Each gate's rows of a block are transposed into their columns
// in register tiles (rows_to_panel).
template <typename acc_t>
at::Tensor pack_gate_panels(const at::Tensor& w_hh, const UnitBlocks& ub) {
  const int64_t P = w_hh.size(1), H = ub.H, nb = ub.nb;
  at::Tensor panels = cpu::cached_empty({ub.count, P, 4 * nb}, w_hh.options());
  const acc_t* w = w_hh.data_ptr<acc_t>();
  acc_t* out = panels.data_ptr<acc_t>();
  at::parallel_for(0, ub.count, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t j0 = ub.j0(k), n = ub.n(k);
      acc_t* dst = out + k * P * 4 * nb;
      for (int64_t q = 0; q < 4; ++q) {
        cpu::rows_to_panel(n, n, P, w + (q * H + j0) * P, P, dst + q * n, 4 * nb);
      }
    }
  });
  return panels;
}

// pack_gate_panels' layout for native bfloat16 (pack_vnni_panels: [blocks, K / 2, 4 * nb, 2]), for
// w_hh [4H, P] and, with the per-block projection, w_ih [4H, I].
inline at::Tensor pack_gate_panels_vnni(const at::Tensor& w_rows, const UnitBlocks& ub) {
  const int64_t K = w_rows.size(1), H = ub.H;
  const auto* w = reinterpret_cast<const at::BFloat16*>(w_rows.data_ptr());
  return cpu::pack_vnni_panels(ub.count, K, 4 * ub.nb, [&](int64_t k, int64_t col) {
    const int64_t n = ub.n(k), q = col / n, jj = col % n;
    return q < 4 ? w + (q * H + ub.j0(k) + jj) * K : nullptr;
  });
}

// An override for comparisons: 1 if the environment variable `name` is `first`, 2 if it is `second`,
// else 0 (unset or anything else).
inline int env_choice(const char* name, const char* first, const char* second) {
  const char* env = std::getenv(name);
  if (env == nullptr) return 0;
  if (std::strcmp(env, first) == 0) return 1;
  if (std::strcmp(env, second) == 0) return 2;
  return 0;
}

// Whether the recurrent matmul reads w_hh in place (see forward_impl) rather than from panels packed
// for the call. Packing costs about one strided pass over w_hh; the panels repay it when there are
// many steps. float64 (no brgemm) reads w_hh in place up to 32 rows at any length: there the
// in-place product runs in register tiles (gemm_tiles), while a packed block's product is an MKL
// call that copies h on every call (a fifth of the time at B = 16, H = 1024: 0.96x torch against
// 1.18x in place; NOTES.md entry 52). FASTLSTM_CPU_WHH=direct|packed overrides (for comparisons).
inline bool use_direct_recurrence(int64_t T, int64_t B, bool float64) {
  static const int forced = env_choice("FASTLSTM_CPU_WHH", "direct", "packed");
  if (forced != 0) return forced == 1;
  if (!cpu::brgemm_usable()) return true;
  return T <= 4 || (float64 && B <= 32);
}

// Whether a call projects its input block by block inside the step loop (block_proj in forward_impl):
// where the recurrence runs on packed panels in at least two tasks a step and w_ih and w_hh together
// take at most 8 MB. Above that, projecting every few steps made the steps' weights and w_ih evict
// each other from L3 (H=1024, B=16: 0.80x; NOTES.md entry 42). float32/float64 training keeps the
// projection of all steps up front (`all_steps`: its buffer becomes the saved gates); float16/bfloat16
// training, whose saved gates are a separate tensor, projects block by block like inference
// (bfloat16 at B=64, H=96-400: its forward 1-7% faster, NOTES.md entry 58). FASTLSTM_CPU_PROJ=
// block|whole overrides the choice among the calls that can take either (for comparisons); the
// results are bitwise the same.
inline bool use_block_projection(bool all_steps, bool unpacked, int64_t blocks, int64_t grain,
                                 int64_t weight_bytes) {
  static const int forced = env_choice("FASTLSTM_CPU_PROJ", "block", "whole");
  if (all_steps || unpacked || blocks < 2 * grain) return false;
  if (forced != 0) return forced == 1;
  return weight_bytes <= (int64_t(8) << 20);
}

// Whether the step loop runs as one parallel region with a barrier a step (forward_impl) rather than
// one parallel_for a step: for the calls that do all their work in the blocks (`eligible`), with
// ATen's OpenMP backend (its parallel_for runs every chunk on its own thread at once, which a barrier
// needs; others may run chunks one after another) and more than one thread, outside another
// parallel region. FASTLSTM_CPU_SYNC=fork|barrier overrides (for comparisons: the same results).
inline bool use_step_barrier(bool eligible) {
#if AT_PARALLEL_OPENMP
  static const int forced = env_choice("FASTLSTM_CPU_SYNC", "barrier", "fork");
  return eligible && forced != 2 && at::get_num_threads() > 1 && !at::in_parallel_region();
#else
  (void)eligible;
  return false;
#endif
}

// One wait of a spinning loop: a pause for the first 256, then a yield, so that more threads than
// cores still make progress.
inline void pause_or_yield(int64_t spins) {
  if (spins < 256) {
#if defined(__x86_64__) || defined(_M_X64)
    _mm_pause();
#endif
  } else {
    std::this_thread::yield();
  }
}

// Waits until `count` reaches `target` (acquiring what the other threads wrote before adding to it),
// or returns false once `failed` is set (another thread threw).
inline bool spin_until(const std::atomic<int64_t>& count, int64_t target, const std::atomic<bool>& failed) {
  for (int64_t spins = 0; count.load(std::memory_order_acquire) < target; ++spins) {
    if (failed.load(std::memory_order_relaxed)) return false;
    pause_or_yield(spins);
  }
  return true;
}

// Waits until `state` leaves 0 (all the chunks of a parallel_for have arrived: 1), for at most 100 ms;
// false if it is still 0 then, or if it is 2 (another chunk has taken over).
inline bool wait_for_all(const std::atomic<int>& state) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(100);
  for (int64_t spins = 0;; ++spins) {
    const int s = state.load(std::memory_order_acquire);
    if (s != 0) return s == 1;
    if (spins >= 256 && std::chrono::steady_clock::now() > deadline) return false;
    pause_or_yield(spins);
  }
}

// h rounded to the output dtype into out, and that rounded value into the carried state.
template <typename scalar_t, typename acc_t>
inline void store_h(int64_t n, const acc_t* h, acc_t* state, scalar_t* out) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::copy(h, h + n, out);
    std::copy(h, h + n, state);
  } else {
    at::vec::convert(h, out, n);
    at::vec::convert(out, state, n);
  }
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_impl(
    const LayerSizes& s, const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& bias, const at::Tensor& w_hr,
    const at::Tensor& lengths, bool reverse, bool training) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kLowPrecision = !std::is_same_v<acc_t, scalar_t>;
  const int64_t T = s.T, B = s.B, I = s.I, H = s.H, P = s.P;
  const bool has_proj = s.has_proj;
  const auto acc = input.options().dtype(c10::CppTypeToScalarType<acc_t>::value);

  // bfloat16 where brgemm multiplies it natively (avx512_bf16): the input projection and the
  // recurrent product read bfloat16 operands (packed weight panels in VNNI layout; h is bfloat16
  // anyway, being rounded each step) and accumulate in float32; the gate math stays float32.
  // Elsewhere bfloat16 runs the float32 code on converted copies.
  constexpr bool kBF16 = std::is_same_v<scalar_t, at::BFloat16>;
  const bool native = kBF16 && !has_proj && I % 2 == 0 && P % 2 == 0 && cpu::brgemm_bf16_usable();
  const at::Tensor x_a = native ? input.reshape({T * B, I}) : input.reshape({T * B, I}).to(acc).contiguous();
  const at::Tensor w_ih_a = native ? w_ih.contiguous() : w_ih.to(acc).contiguous();
  at::Tensor w_ih_panels;
  const at::Tensor bias_a = bias.defined() ? bias.to(acc).contiguous() : at::Tensor();
  const acc_t* bias_p = bias.defined() ? bias_a.data_ptr<acc_t>() : nullptr;

  // Blocks of hidden units (UnitBlocks), each one matmul and one fused update on one thread.
  //   batch <= 2: dot products with w_hh's rows (nothing packed);
  //   `direct`: rec^T[4n, B] = w_hh[block rows, P] @ h^T[P, B], w_hh read in place and h kept
  //     transposed (a [P, B] copy per step, cheap): no packing, for calls with few steps (decoding)
  //     and where brgemm is unavailable (BLAS packs internally anyway);
  //   otherwise brgemm on per-block panels of w_hh packed once per call ([blocks, P, 4nb]), which
  //     keeps a wide batch in full vectors and pays off over many steps.
  // Packed on every call, never cached: a cache keyed on the weight's version counter would miss
  // in-place writes through `.data`, which do not bump it.
  // Blocks of about 32 units (128 columns) in the AVX-512 build, 64 otherwise: with AVX-512 the
  // smaller blocks kept h128 inference at 1.03-1.09x torch's speed during this machine's slow
  // phases, where 64-unit blocks read 0.92-0.97x (the same otherwise); the AVX2 build ran 2-4%
  // slower with them. The sums are bitwise those of 64-unit blocks (NOTES.md entries 45, 48).
#if defined(CPU_CAPABILITY_AVX512)
  constexpr int64_t kBlockUnits = 32;
#else
  constexpr int64_t kBlockUnits = 64;
#endif
  const UnitBlocks ub = unit_blocks(H, kBlockUnits);
  const int64_t nb = ub.nb, blocks = ub.count;
  const bool dot_rows = B <= 2;
  const bool direct = !dot_rows && !native && use_direct_recurrence(T, B, std::is_same_v<acc_t, double>);
  // Blocks per task of the step loop's parallel_for (a task is at least about 128K multiply-adds).
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 17) / std::max<int64_t>(1, B * 4 * nb * P));

  // The input part of the pre-activations (x @ w_ih^T), into gates_a. float32/float64 training
  // keeps every step's (the buffer becomes the saved gates); inference keeps a few steps at a time
  // in one reused buffer, and so does float16/bfloat16 training, whose saved gates are a separate
  // low-precision tensor that the gate math writes directly (block_proj too where eligible).
  //   block_proj (brgemm, panels, at least two tasks a step): every `pchunk` steps each block projects
  //     its own gate columns inside the step loop, on the thread that then reads them, so they are
  //     still in that core's L2 (about 1 MB of pre-activations a chunk for all blocks). A projection
  //     of all steps up front, split by rows among the threads, left each step reading half its
  //     pre-activations from the other core's writes, several MB back (NOTES.md entry 42).
  //   otherwise one GEMM over `chunk` steps at a time (about 16 MB), split among the threads.
  // Either way the split is fixed by the shape, never by the thread count.
  const int64_t weight_bytes = (I + P) * 4 * H * (native ? 2 : static_cast<int64_t>(sizeof(acc_t)));
  const bool block_proj = use_block_projection(training && !kLowPrecision, dot_rows || direct, blocks, grain,
                                               weight_bytes) &&
                          (native || (std::is_same_v<acc_t, float> && cpu::brgemm_usable()));
  const int64_t pchunk =
      block_proj ? std::clamp<int64_t>(std::max<int64_t>((int64_t(1) << 18) / std::max<int64_t>(1, B * 4 * H),
                                                          (256 + B - 1) / std::max<int64_t>(1, B)),
                                       1, std::max<int64_t>(T, 1))
                 : 1;
  const int64_t chunk =
      training && !kLowPrecision
          ? T
          : block_proj ? pchunk
                       : std::clamp<int64_t>((int64_t(1) << 22) / std::max<int64_t>(1, B * 4 * H), 1,
                                             std::max<int64_t>(T, 1));
  at::Tensor gates_a = cpu::cached_empty({chunk, B, 4 * H}, acc);
  // Low-precision weights are read as they are by the batch <= 2 dot products and by native bf16.
  const bool keep_w_hh = kLowPrecision && (dot_rows || native);
  const at::Tensor w_hh_a = keep_w_hh ? w_hh.contiguous() : w_hh.to(acc).contiguous();
  at::Tensor panels;
  if (native && !dot_rows) {
    panels = pack_gate_panels_vnni(w_hh_a, ub);
  } else if (!dot_rows && !direct) {
    panels = pack_gate_panels<acc_t>(w_hh_a, ub);
  }
  // block_proj: w_ih as per-block panels like w_hh's ([blocks, I, 4nb]; VNNI for native bfloat16).
  if (block_proj && native) {
    w_ih_panels = pack_gate_panels_vnni(w_ih_a, ub);
  } else if (block_proj) {
    w_ih_panels = pack_gate_panels<acc_t>(w_ih_a, ub);
  }
  const at::Tensor w_hr_a = has_proj ? w_hr.to(acc).contiguous() : at::Tensor();
  // float32 on brgemm: the projection h = m @ w_hr^T in column blocks of w_hr^T (fixed by the shape,
  // so the result does not depend on the thread count, as an MKL call's did).
  const bool proj_blocks = has_proj && std::is_same_v<acc_t, float> && cpu::brgemm_usable();
  const at::Tensor w_hr_t = proj_blocks ? w_hr_a.t().contiguous() : at::Tensor();  // [H, P]
  // Per thread: the block's recurrent pre-activations [B, 4nb] and, for `direct`, their transpose.
  at::Tensor scratch = at::empty({at::get_num_threads(), direct ? 2 : 1, B, 4 * nb}, acc);
  at::Tensor hT_buf = direct ? at::empty({2, P, B}, acc) : at::Tensor();  // h^T of h_buf
  if (direct) hT_buf[0].copy_(h0.t());

  at::Tensor output = cpu::cached_empty({T, B, P}, input.options());
  at::Tensor cells = training ? cpu::cached_empty({T, B, H}, acc) : at::Tensor();
  // Saved post-activation gates of a float16/bfloat16 call (see `chunk`); float32/float64 training
  // keeps them in gates_a itself.
  const bool low_gates = kLowPrecision && training;
  at::Tensor gates_low = low_gates ? cpu::cached_empty({T, B, 4 * H}, input.options()) : at::Tensor();
  scalar_t* gates_low_p = low_gates ? gates_low.data_ptr<scalar_t>() : nullptr;
  at::Tensor hidden = has_proj ? cpu::cached_empty({training ? T : 1, B, H}, acc) : at::Tensor();
  at::Tensor h_buf = at::empty({2, B, P}, acc);  // h_{t-1} and h_t
  h_buf[0].copy_(h0);
  at::Tensor hb_buf = native ? at::empty({2, B, P}, input.options()) : at::Tensor();  // h_buf in bf16
  if (native) hb_buf[0].copy_(h0);
  at::Tensor c = c0.to(acc).contiguous().clone();  // [B, H]
  at::Tensor m_step = has_proj ? at::Tensor() : at::empty({B, H}, acc);
  at::Tensor h_proj = has_proj ? at::empty({B, P}, acc) : at::Tensor();

  const Activity act = make_activity(lengths, B);
  std::vector<int64_t> chunk_rows(act.sorted ? chunk : 0);  // running rows of a chunk's steps
  const scalar_t* w_hh_low = keep_w_hh ? w_hh_a.data_ptr<scalar_t>() : nullptr;
  const acc_t* w_hh_p = keep_w_hh ? nullptr : w_hh_a.data_ptr<acc_t>();
  // What step `step` reads and writes: a function of the step alone, so that any thread can work it
  // out (the persistent loop below).
  struct StepView {
    int64_t t, t_lo, p_n;  // time index; first time index held by gates_a; steps this step projects
  };
  const auto view_of = [&](int64_t step) {
    StepView v;
    v.t = reverse ? T - 1 - step : step;
    const int64_t c_first = step - step % chunk, c_n = std::min(chunk, T - c_first);
    v.t_lo = reverse ? T - c_first - c_n : c_first;
    // block_proj (chunk == pchunk): the first step of a chunk projects all of its steps, which start
    // at t_lo in either direction.
    v.p_n = block_proj && step == c_first ? c_n : 0;
    return v;
  };
  // Blocks [k0, k1) of step `step`, on the calling thread.
  const auto step_blocks = [&](int64_t step, int64_t k0, int64_t k1) {
    const StepView v = view_of(step);
    const int64_t t = v.t, t_lo = v.t_lo, p_n = v.p_n;
    const int64_t rows = act.rows(t);
    acc_t* g_t = gates_a.data_ptr<acc_t>() + (t - t_lo) * B * 4 * H;
    acc_t* cp = c.data_ptr<acc_t>();
    acc_t* cell_t = training ? cells.data_ptr<acc_t>() + t * B * H : cp;
    scalar_t* out_t = output.data_ptr<scalar_t>() + t * B * P;
    acc_t* m_t = has_proj ? hidden.data_ptr<acc_t>() + (training ? t : 0) * B * H
                          : m_step.data_ptr<acc_t>();
    const acc_t* h_cur = h_buf.data_ptr<acc_t>() + (step % 2) * B * P;
    acc_t* h_next = h_buf.data_ptr<acc_t>() + ((step + 1) % 2) * B * P;
    const acc_t* hT_cur = direct ? hT_buf.data_ptr<acc_t>() + (step % 2) * P * B : nullptr;
    acc_t* hT_next = direct ? hT_buf.data_ptr<acc_t>() + ((step + 1) % 2) * P * B : nullptr;
    const scalar_t* hb_cur = native ? hb_buf.data_ptr<scalar_t>() + (step % 2) * B * P : nullptr;
    scalar_t* hb_next = native ? hb_buf.data_ptr<scalar_t>() + ((step + 1) % 2) * B * P : nullptr;
    acc_t* rec = scratch.data_ptr<acc_t>() + at::get_thread_num() * (direct ? 2 : 1) * B * 4 * nb;
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t j0 = ub.j0(k), n = ub.n(k);  // rec: [B, 4n], gate q at q * n
      if (p_n > 0 && act.sorted) {  // each step's running rows only (see project_input)
        for (int64_t i = 0; i < p_n; ++i) {
          project_block<acc_t>(native, act.rows(t_lo + i), n, I, x_a, (t_lo + i) * B, w_ih_panels, k, nb,
                               gates_a.data_ptr<acc_t>() + i * B * 4 * H, H, j0);
        }
      } else if (p_n > 0) {
        project_block<acc_t>(native, p_n * B, n, I, x_a, t_lo * B, w_ih_panels, k, nb,
                             gates_a.data_ptr<acc_t>(), H, j0);
      }
      if (dot_rows) {
        for (int q = 0; q < 4 && rows > 0; ++q) {
#ifdef FASTLSTM_HAVE_DPBF16
          if constexpr (kBF16) {
            if (native) {
              cpu::dot_rows_bf16(rows, n, P, reinterpret_cast<const at::BFloat16*>(hb_cur), P,
                                 reinterpret_cast<const at::BFloat16*>(w_hh_low) + (q * H + j0) * P,
                                 P, reinterpret_cast<float*>(rec) + q * n, 4 * n);
              continue;
            }
          }
#endif
          if (keep_w_hh) {
            cpu::gemm_nt_small<acc_t, scalar_t>(rows, n, P, h_cur, P, w_hh_low + (q * H + j0) * P, P,
                                                rec + q * n, 4 * n);
          } else {
            cpu::gemm_nt_small<acc_t, acc_t>(rows, n, P, h_cur, P, w_hh_p + (q * H + j0) * P, P,
                                             rec + q * n, 4 * n);
          }
        }
      } else if (direct) {
        acc_t* recT = rec + B * 4 * nb;  // [4n, B]: row q * n + jj is gate q of unit j0 + jj
        for (int q = 0; q < 4 && rows > 0; ++q) {
          if constexpr (std::is_same_v<acc_t, double>) {  // no brgemm: not MKL on small products
            cpu::gemm_tiles<acc_t>(n, rows, P, w_hh_p + (q * H + j0) * P, P, hT_cur, B, recT + q * n * B, B);
          } else {
            cpu::gemm_serial<acc_t>(n, rows, P, w_hh_p + (q * H + j0) * P, P, hT_cur, B,
                                    recT + q * n * B, B);
          }
        }
        cpu::transpose_tile(4 * n, rows, recT, B, rec, 4 * n);
      } else if (native) {
        if (rows > 0) {
          at::native::cpublas::brgemm(rows, 4 * n, P, P, 4 * nb, 4 * n, false,
                                      reinterpret_cast<const at::BFloat16*>(hb_cur),
                                      reinterpret_cast<const at::BFloat16*>(panels.data_ptr()) +
                                          k * P * 4 * nb,
                                      reinterpret_cast<float*>(rec), true);
        }
      } else {
        cpu::gemm_serial<acc_t>(rows, 4 * n, P, h_cur, P,
                                panels.data_ptr<acc_t>() + k * P * 4 * nb, 4 * nb, rec, 4 * n);
      }
      for (int64_t b = 0; b < B; ++b) {
        acc_t* g = g_t + b * 4 * H + j0;
        acc_t* m = m_t + b * H + j0;
        // The saved post-activations of this row (low_gates), else they go back into g.
        scalar_t* gl = low_gates ? gates_low_p + (t * B + b) * 4 * H + j0 : nullptr;
        if (!act.active(b, t)) {
          if (training) {  // the saved gates and cell of a finished row (inference saves neither)
            for (int q = 0; q < 4; ++q) {
              if (low_gates) {
                std::fill(gl + q * H, gl + q * H + n, scalar_t(0));
              } else {
                std::fill(g + q * H, g + q * H + n, acc_t(0));
              }
            }
            std::copy(cp + b * H + j0, cp + b * H + j0 + n, cell_t + b * H + j0);
          }
          std::fill(m, m + n, acc_t(0));
          if (native) {  // h carried as bfloat16 only (see below)
            std::copy(hb_cur + b * P + j0, hb_cur + b * P + j0 + n, hb_next + b * P + j0);
          } else if (!has_proj) {
            std::copy(h_cur + b * P + j0, h_cur + b * P + j0 + n, h_next + b * P + j0);
          }
          if (!has_proj) {
            std::fill(out_t + b * P + j0, out_t + b * P + j0 + n, scalar_t(0));
          }
          continue;
        }
        if (low_gates) {
          cell_forward<acc_t, scalar_t>(n, g, H, rec + b * 4 * n, n, bias_p ? bias_p + j0 : nullptr,
                                        cp + b * H + j0, cell_t + b * H + j0, m, gl);
        } else {
          if (training) {
            cell_forward<acc_t, acc_t>(n, g, H, rec + b * 4 * n, n, bias_p ? bias_p + j0 : nullptr,
                                       cp + b * H + j0, cell_t + b * H + j0, m, g);
          } else {
            cell_forward<acc_t, acc_t, false>(n, g, H, rec + b * 4 * n, n, bias_p ? bias_p + j0 : nullptr,
                                              cp + b * H + j0, nullptr, m, nullptr);
          }
        }
        if (native) {  // the next step reads h as bfloat16 (hb_next); h_buf is not read
          at::vec::convert(m, out_t + b * P + j0, n);
          std::copy(out_t + b * P + j0, out_t + b * P + j0 + n, hb_next + b * P + j0);
        } else if (!has_proj) {
          store_h<scalar_t, acc_t>(n, m, h_next + b * P + j0, out_t + b * P + j0);
        }
      }
      if (direct && !has_proj) cpu::transpose_tile(B, n, h_next + j0, P, hT_next + j0 * B, B);
    }
  };

  if (use_step_barrier(block_proj && !has_proj && T > 1)) {
    // One parallel region for all steps: each thread keeps its blocks and, after each step, waits
    // at a barrier until every block has finished it (h is double-buffered, so one barrier a step
    // suffices). This saves a fork/join per step: 1-3 us, a tenth of a small step (NOTES.md entry 43).
    // The blocks compute what they compute in the per-step loop below: results are bitwise equal.
    // The barrier needs every chunk of the parallel_for running at once, which ATen's OpenMP
    // parallel_for does (one chunk per thread of the team). That is checked, not assumed: the chunks
    // first wait (up to 100 ms) until all blocks have arrived; if they have not, the first to give
    // up runs every block of every step itself and the chunks that arrive later do nothing.
    std::atomic<int64_t> arrived{0}, done{0};
    std::atomic<int> state{0};  // 0 arriving, 1 all arrived (barrier steps), 2 one chunk runs all
    std::atomic<bool> failed{false};
    at::parallel_for(0, blocks, grain, [&](int64_t k0, int64_t k1) {
      try {
        if (arrived.fetch_add(k1 - k0, std::memory_order_acq_rel) + (k1 - k0) == blocks) {
          int expected = 0;
          state.compare_exchange_strong(expected, 1);
        }
        if (!wait_for_all(state)) {  // not all arrived in time
          int expected = 0;
          if (state.compare_exchange_strong(expected, 2)) {  // the first to give up runs every block
            for (int64_t step = 0; step < T; ++step) step_blocks(step, 0, blocks);
            return;
          }
          if (expected == 2) return;  // another chunk took over; else all arrived meanwhile
        }
        for (int64_t step = 0; step < T; ++step) {
          step_blocks(step, k0, k1);
          if (step + 1 == T) break;  // the region's own join waits for the last step
          done.fetch_add(k1 - k0, std::memory_order_acq_rel);
          if (!spin_until(done, (step + 1) * blocks, failed)) return;
        }
      } catch (...) {
        failed.store(true);  // releases the other threads' waits; parallel_for rethrows
        throw;
      }
    });
  } else {
    for (int64_t step = 0; step < T; ++step) {
      const StepView v = view_of(step);
      const int64_t t = v.t, t_lo = v.t_lo;
      if (!block_proj && step % chunk == 0) {
        const int64_t n = std::min(chunk, T - step);
        at::Tensor dst = gates_a.view({chunk * B, 4 * H}).narrow(0, 0, n * B);
        // With sorted lengths, the running rows of each of the n steps only (project_input).
        if (act.sorted) {
          for (int64_t i = 0; i < n; ++i) chunk_rows[i] = act.rows(t_lo + i);
        }
        const int64_t* rows_of = act.sorted ? chunk_rows.data() : nullptr;
        if (native) {
          if (!w_ih_panels.defined()) {
            const auto* w = reinterpret_cast<const at::BFloat16*>(w_ih_a.data_ptr());
            w_ih_panels = cpu::pack_vnni_panels((4 * H + 63) / 64, I, 64, [&](int64_t p, int64_t col) {
              return p * 64 + col < 4 * H ? w + (p * 64 + col) * I : nullptr;
            });
          }
          cpu::matmul_vnni_panels(n * B, 4 * H, I,
                                  reinterpret_cast<const at::BFloat16*>(x_a.data_ptr()) + t_lo * B * I, I,
                                  w_ih_panels, 64, reinterpret_cast<float*>(dst.data_ptr()), 4 * H, B,
                                  rows_of);
        } else {
          project_input<acc_t>(x_a.narrow(0, t_lo * B, n * B), w_ih_a, w_ih_panels, dst, B, rows_of);
        }
      }
      at::parallel_for(0, blocks, grain, [&](int64_t k0, int64_t k1) { step_blocks(step, k0, k1); });

      if (has_proj) {
        const int64_t rows = act.rows(t);
        const acc_t* m_t = hidden.data_ptr<acc_t>() + (training ? t : 0) * B * H;
        const acc_t* h_cur = h_buf.data_ptr<acc_t>() + (step % 2) * B * P;
        acc_t* h_next = h_buf.data_ptr<acc_t>() + ((step + 1) % 2) * B * P;
        scalar_t* out_t = output.data_ptr<scalar_t>() + t * B * P;
        acc_t* hq = h_proj.data_ptr<acc_t>();
        if (proj_blocks) {
          cpu::matmul_cols<acc_t>(rows, P, H, m_t, H, w_hr_t.data_ptr<acc_t>(), P, hq, P);
        } else {
          cpu::gemm<acc_t>(false, true, rows, P, H, acc_t(1), m_t, H, w_hr_a.data_ptr<acc_t>(), H,
                           acc_t(0), hq, P);
        }
        for (int64_t b = 0; b < B; ++b) {
          if (act.active(b, t)) {
            store_h<scalar_t, acc_t>(P, hq + b * P, h_next + b * P, out_t + b * P);
          } else {
            std::copy(h_cur + b * P, h_cur + (b + 1) * P, h_next + b * P);
            std::fill(out_t + b * P, out_t + (b + 1) * P, scalar_t(0));
          }
        }
        if (direct) {
          acc_t* hT_next = hT_buf.data_ptr<acc_t>() + ((step + 1) % 2) * P * B;
          cpu::transpose_tile(B, P, h_next, P, hT_next, B);
        }
      }
    }
  }

  // Native bfloat16 carries h only as bfloat16 (hb_buf), the value h_buf would hold rounded.
  at::Tensor h_n = native ? hb_buf[T % 2].clone()
                          : h_buf[T % 2].to(input.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
  at::Tensor c_n = c.to(input.scalar_type());
  if (!training) {  // distinct empty tensors: a custom op's outputs must not alias one another
    return {output, h_n, c_n, at::empty({0}, input.options()), at::empty({0}, acc),
            at::empty({0}, input.options())};
  }
  at::Tensor gates = low_gates ? gates_low : gates_a;
  at::Tensor hidden_out = has_proj ? hidden.to(input.scalar_type())
                                   : at::empty({0}, input.options());
  return {output, h_n, c_n, gates, cells, hidden_out};
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
backward_impl(const LayerSizes& s, const at::Tensor& grad_output, const at::Tensor& grad_h_n,
              const at::Tensor& grad_c_n, const at::Tensor& input, const at::Tensor& h0,
              const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
              const at::Tensor& w_hr, const at::Tensor& lengths, const at::Tensor& output,
              const at::Tensor& gates, const at::Tensor& cells, const at::Tensor& hidden,
              bool reverse) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = s.T, B = s.B, I = s.I, H = s.H, P = s.P;
  const bool has_proj = s.has_proj;
  const auto acc = input.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const auto dtype = input.scalar_type();

  const at::Tensor gates_c = gates.contiguous();  // read in its own dtype (cell_backward_row)
  const at::Tensor cells_a = cells.to(acc).contiguous();
  const at::Tensor grad_out_c = grad_output.contiguous();
  const at::Tensor c0_a = c0.to(acc).contiguous();
  const at::Tensor w_hh_a = w_hh.to(acc).contiguous();
  // dh_{t-1} = dG_t @ w_hh: above batch 2, brgemm reads w_hh as contiguous column panels (cheap row
  // copies); read in place, a large w_hh's rows are too far apart for the micro-kernel's loads.
  constexpr int64_t kPanel = 64;
  // bfloat16 where the CPU multiplies it natively (avx512_bf16): dG is also kept rounded to
  // bfloat16 (dG_low), as torch.nn.LSTM's own bf16 backward rounds it for its GEMMs; above batch 2
  // the per-step product runs on brgemm's bf16 kernel (w_hh as VNNI column panels), and the large
  // GEMMs after the loop on oneDNN's bf16 matmul. Float32 accumulation throughout.
  const bool native = std::is_same_v<scalar_t, at::BFloat16> && cpu::brgemm_bf16_usable();
  const bool native_dh = native && B > 2;
  at::Tensor dG_low = native ? cpu::cached_empty({T, B, 4 * H}, input.options()) : at::Tensor();
  const at::Tensor w_hh_panels =
      native_dh ? cpu::pack_vnni_rows(reinterpret_cast<const at::BFloat16*>(w_hh.contiguous().data_ptr()),
                                      4 * H, P, P, kPanel)
      : B > 2   ? cpu::column_panels<acc_t>(w_hh_a.data_ptr<acc_t>(), 4 * H, P, kPanel, acc)
                : at::Tensor();
  const at::Tensor w_hr_a = has_proj ? w_hr.to(acc).contiguous() : at::Tensor();
  const bool proj_blocks = has_proj && std::is_same_v<acc_t, float> && cpu::brgemm_usable();

  // dG's rows are 4H apart, or 64 bytes more where 4H values fill a multiple of 4 KiB (H a multiple
  // of 256 in float32): the weight gradients' brgemm reads dG's rows one after another as its B
  // operand, and rows 4 KiB apart share their cache sets. On AVX2 that ran at 57% speed (NOTES.md
  // entry 35). The padding is never read.
  const int64_t ldg = (4 * H * static_cast<int64_t>(sizeof(acc_t))) % 4096 == 0
                          ? 4 * H + 64 / static_cast<int64_t>(sizeof(acc_t))
                          : 4 * H;
  at::Tensor dG = cpu::cached_empty({T, B, ldg}, acc).narrow(2, 0, 4 * H);
  // Gradient of h_t (after the step) for every step: needed for grad_w_hr; one step's worth otherwise.
  at::Tensor dH = cpu::cached_empty({has_proj ? T : 1, B, P}, acc);
  at::Tensor dm_step = has_proj ? at::empty({B, H}, acc) : at::Tensor();
  at::Tensor dh = grad_h_n.to(acc).contiguous().clone();  // [B, P]
  at::Tensor dc = grad_c_n.to(acc).contiguous().clone();  // [B, H]
  at::Tensor dh_prev = at::empty({B, P}, acc);
  at::Tensor db_rows = at::zeros({B, 4 * H}, acc);  // per batch row: the sum of its dG over the steps
  acc_t* db_all = db_rows.data_ptr<acc_t>();
  using Vec = Vectorized<acc_t>;

  const Activity act = make_activity(lengths, B);
  const scalar_t* g_all = gates_c.data_ptr<scalar_t>();
  const acc_t* cell_all = cells_a.data_ptr<acc_t>();
  const scalar_t* go_all = grad_out_c.data_ptr<scalar_t>();
  acc_t* dG_all = dG.data_ptr<acc_t>();
  acc_t* dhp = dh.data_ptr<acc_t>();
  acc_t* dcp = dc.data_ptr<acc_t>();
  acc_t* dhq = dh_prev.data_ptr<acc_t>();

  for (int64_t step = T - 1; step >= 0; --step) {
    const int64_t t = reverse ? T - 1 - step : step;
    const int64_t t_prev = reverse ? t + 1 : t - 1;  // the step processed before t in the forward
    const bool first = step == 0;
    const int64_t rows = act.rows(t);
    acc_t* dH_t = dH.data_ptr<acc_t>() + (has_proj ? t * B * P : 0);
    // Row b of dH_t: the gradient of h_t, the carried dh plus the output's gradient (0 past a length).
    const auto grad_h_row = [&](int64_t b) {
      acc_t* dst = dH_t + b * P;
      if (!act.active(b, t)) {
        std::fill(dst, dst + P, acc_t(0));
        return;
      }
      const scalar_t* go = go_all + (t * B + b) * P;
      const acc_t* src = dhp + b * P;
      for (int64_t j = 0; j < P; j += Vec::size()) {
        const int64_t n = std::min<int64_t>(Vec::size(), P - j);
        (Vec::loadu(src + j, n) + load_widened<acc_t>(go + j, n)).store(dst + j, n);
      }
    };
    const acc_t* dm_t = dH_t;
    if (has_proj) {  // the projection's product reads every row of dH_t
      for (int64_t b = 0; b < B; ++b) grad_h_row(b);
      if (proj_blocks) {  // as in the forward: column blocks fixed by the shape
        cpu::matmul_cols<acc_t>(rows, H, P, dH_t, P, w_hr_a.data_ptr<acc_t>(), H,
                                dm_step.data_ptr<acc_t>(), H);
      } else {
        cpu::gemm<acc_t>(false, false, rows, H, P, acc_t(1), dH_t, P, w_hr_a.data_ptr<acc_t>(), H,
                         acc_t(0), dm_step.data_ptr<acc_t>(), H);
      }
      dm_t = dm_step.data_ptr<acc_t>();
    }

    acc_t* dG_t = dG_all + t * B * ldg;
    for_rows(B, 8 * H, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        acc_t* dg = dG_t + b * ldg;
        if (!has_proj) grad_h_row(b);  // dm_t = dH_t: each row's own, on the row's thread
        if (!act.active(b, t)) {
          std::fill(dg, dg + 4 * H, acc_t(0));
        } else {
          // The previous cell state: the carried state of the previously processed step, or c0.
          const acc_t* c_prev = first ? c0_a.data_ptr<acc_t>() + b * H
                                      : cell_all + (t_prev * B + b) * H;
          cell_backward_row<acc_t, scalar_t>(H, dm_t + b * H, dcp + b * H, g_all + (t * B + b) * 4 * H,
                                   cell_all + (t * B + b) * H, c_prev, dg);
          // The bias gradient, summed per row over the steps (fixed order: independent of threads).
          acc_t* db = db_all + b * 4 * H;
          for (int64_t j = 0; j < 4 * H; j += Vec::size()) {
            const int64_t n = std::min<int64_t>(Vec::size(), 4 * H - j);
            (Vec::loadu(db + j, n) + Vec::loadu(dg + j, n)).store(db + j, n);
          }
        }
        if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
          if (native) at::vec::convert(dg, dG_low.data_ptr<scalar_t>() + (t * B + b) * 4 * H, 4 * H);
        }
      }
    });

    if (native_dh) {
      cpu::matmul_vnni_panels(rows, P, 4 * H,
                              reinterpret_cast<const at::BFloat16*>(dG_low.data_ptr()) + t * B * 4 * H,
                              4 * H, w_hh_panels, kPanel, reinterpret_cast<float*>(dhq), P);
    } else if (w_hh_panels.defined()) {
      cpu::matmul_panels<acc_t>(rows, P, 4 * H, dG_t, ldg, w_hh_panels, kPanel, dhq, P);
    } else {
      cpu::matmul_cols<acc_t>(rows, P, 4 * H, dG_t, ldg, w_hh_a.data_ptr<acc_t>(), P, dhq, P);
    }
    // dhq becomes the carried dh; a row not running at t (its product skipped, or computed from
    // dG = 0 where the rows are not sorted) carries its dh through.
    for (int64_t b = 0; b < B; ++b) {
      if (b < rows && act.active(b, t)) continue;
      std::copy(dhp + b * P, dhp + (b + 1) * P, dhq + b * P);
    }
    std::swap(dhp, dhq);
  }

  const at::Tensor dG2 = dG.view({T * B, 4 * H});
  // The input with zeros past each length: the forward never read those rows, and a NaN there
  // (padding is the caller's) must not reach grad_w_ih through dG's zero rows (0 * NaN).
  const at::Tensor x_in = lengths.defined()
      ? input.reshape({T * B, I}).masked_fill(
            (at::arange(T, lengths.options()).unsqueeze(1) >= lengths.unsqueeze(0)).view({T * B, 1}), 0)
      : input.reshape({T * B, I});
  at::Tensor grad_input, grad_w_ih, grad_w_hh;
  // Native bfloat16 (see above): at::mm in bfloat16 is oneDNN's matmul, float32 accumulation
  // inside, a bfloat16 result (the gradients' dtype).
  const bool native_mm = native && T * B >= kBrgemmMinRows;
  const at::Tensor x2 = native_mm ? at::Tensor() : x_in.to(acc);  // native_mm reads x_in as it is
  // float32 on brgemm also below kBrgemmMinRows rows: MKL splits a product over a long K (4H) among
  // threads, so at::mm's grad_input changed in the last bit with the thread count; brgemm tiles
  // are fixed by the shape.
  const bool blocked = !native_mm && std::is_same_v<acc_t, float> && cpu::brgemm_usable();
  const at::Tensor dG_low2 = native ? dG_low.view({T * B, 4 * H}) : at::Tensor();
  if (native_mm) {
    grad_input = at::mm(dG_low2, w_ih.contiguous()).view({T, B, I});
    grad_w_ih = at::mm(dG_low2.t(), x_in);
  }
  if constexpr (std::is_same_v<acc_t, float>) {
    if (blocked) {
      // grad_input = dG @ w_ih (w_ih as column panels: cheap row copies). The weight gradients are
      // computed transposed, grad_w^T = in^T @ dG, so that dG (the larger operand) is read in place
      // and only chunks of the input are transposed.
      const at::Tensor w_ih_a = w_ih.to(acc).contiguous();
      const at::Tensor w_ih_panels = cpu::column_panels<float>(w_ih_a.data_ptr<float>(), 4 * H, I, kPanel, acc);
      grad_input = cpu::cached_empty({T, B, I}, acc);
      cpu::matmul_panels<float>(T * B, I, 4 * H, dG_all, ldg, w_ih_panels, kPanel,
                                grad_input.data_ptr<float>(), I);
      grad_w_ih = cpu::cached_empty({4 * H, I}, acc);
      const float* xp = x2.data_ptr<float>();
      cpu::weight_grad_blocked(I, 4 * H, T * B, [&](int64_t k) { return xp + k * I; }, dG_all, ldg,
                               grad_w_ih.data_ptr<float>(), I);
    }
  }
  if (!blocked && !native_mm) {
    grad_input = at::mm(dG2, w_ih.to(acc)).view({T, B, I});
    grad_w_ih = at::mm(dG2.t(), x2);
  }
  at::Tensor grad_bias = at::zeros({4 * H}, acc);  // the rows' sums added in row order
  acc_t* gb = grad_bias.data_ptr<acc_t>();
  for (int64_t b = 0; b < B; ++b) {
    const acc_t* db = db_all + b * 4 * H;
    for (int64_t j = 0; j < 4 * H; ++j) gb[j] += db[j];
  }

  // grad_w_hh = sum_t dG_t^T h_prev_t. For a step t after another active step h_prev is that step's
  // output; for each sequence's first step it is h0 (where output is zero past a length, so the
  // shifted product picks up nothing there).
  const at::Tensor out_a = native_mm ? at::Tensor() : output.to(acc);
  // The h that row k = t * B + b of dG was computed from (both one-product paths below pair them):
  // the output of the step processed before t, or h0 at each sequence's first processed step (in
  // reverse with lengths, step len - 1; rows past a length have dG = 0). {from h0, offset of the
  // row in h0 [B, P] or in the output [T, B, P]}.
  const int64_t* len = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
  const auto h_read = [&](int64_t k) -> std::pair<bool, int64_t> {
    const int64_t t = k / B, b = k % B;
    const bool first = reverse ? (t == T - 1 || (len != nullptr && t + 1 >= len[b])) : t == 0;
    return {first, first ? b * P : ((reverse ? t + 1 : t - 1) * B + b) * P};
  };
  if (blocked) {
    // One product over all T*B rows, each dG row with the h it was computed from (h_read).
    grad_w_hh = cpu::cached_empty({4 * H, P}, acc);
    const at::Tensor h0_a = h0.to(acc).contiguous();
    const at::Tensor out_c = out_a.contiguous();
    const float* h0p = reinterpret_cast<const float*>(h0_a.data_ptr());
    const float* op = reinterpret_cast<const float*>(out_c.data_ptr());
    auto row = [&](int64_t k) -> const float* {
      const std::pair<bool, int64_t> r = h_read(k);
      return (r.first ? h0p : op) + r.second;
    };
    cpu::weight_grad_blocked(P, 4 * H, T * B, row, reinterpret_cast<const float*>(dG_all), ldg,
                             reinterpret_cast<float*>(grad_w_hh.data_ptr<acc_t>()), P);
  } else if (native_mm) {
    // One bfloat16 product over all T*B rows, dG^T @ h_prev, h_prev's row k the h of h_read(k).
    const at::Tensor h0_l = h0.to(dtype).contiguous();
    const at::Tensor out_l = output.contiguous();
    const scalar_t* h0p = h0_l.data_ptr<scalar_t>();
    const scalar_t* op = out_l.data_ptr<scalar_t>();
    at::Tensor h_prev = at::empty({T * B, P}, output.options());
    scalar_t* hp = h_prev.data_ptr<scalar_t>();
    at::parallel_for(0, T * B, 64, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const std::pair<bool, int64_t> r = h_read(k);
        const scalar_t* src = (r.first ? h0p : op) + r.second;
        std::copy(src, src + P, hp + k * P);
      }
    });
    grad_w_hh = at::mm(dG_low2.t(), h_prev);
  } else {
    at::Tensor gw_hh_t = cpu::cached_zeros({P, 4 * H}, acc);  // grad_w_hh^T
    if (T > 1) {
      const int64_t first_row = reverse ? 0 : B;  // dG rows of the steps that follow another
      const at::Tensor h_shift = (reverse ? out_a.narrow(0, 1, T - 1) : out_a.narrow(0, 0, T - 1))
                                     .reshape({(T - 1) * B, P});
      gw_hh_t.addmm_(h_shift.t(), dG2.narrow(0, first_row, (T - 1) * B));
    }
    if (T > 0) {
      at::Tensor dG_first;  // [B, 4H]: each sequence's gradient at its first processed step
      if (!reverse) {
        dG_first = dG[0];
      } else if (!lengths.defined()) {
        dG_first = dG[T - 1];
      } else {
        const at::Tensor idx = (lengths - 1).clamp_min(0).view({1, B, 1}).expand({1, B, 4 * H});
        dG_first = dG.gather(0, idx).squeeze(0).mul((lengths > 0).to(acc).unsqueeze(1));
      }
      gw_hh_t.addmm_(h0.to(acc).t(), dG_first);
    }
    grad_w_hh = gw_hh_t.t().contiguous();
  }

  at::Tensor grad_w_hr;
  if (proj_blocks) {  // grad_w_hr [P, H] = dH^T @ hidden, on brgemm tiles fixed by the shape
    grad_w_hr = cpu::cached_empty({P, H}, acc);
    const at::Tensor hidden_a = hidden.to(acc).contiguous();
    const float* hp = reinterpret_cast<const float*>(hidden_a.data_ptr());
    cpu::weight_grad_blocked(H, P, T * B, [&](int64_t k) { return hp + k * H; },
                             reinterpret_cast<const float*>(dH.data_ptr()), P,
                             reinterpret_cast<float*>(grad_w_hr.data_ptr()), H);
  } else {
    grad_w_hr = has_proj ? at::mm(dH.view({T * B, P}).t(), hidden.to(acc).reshape({T * B, H}))
                         : at::empty({0}, input.options());
  }
  // The carried dh is in whichever of dh and dh_prev dhp points to after the last swap.
  const at::Tensor dh_out = dhp == dh.data_ptr<acc_t>() ? dh : dh_prev;
  return {grad_input.to(dtype), dh_out.to(dtype), dc.to(dtype), grad_w_ih.to(dtype),
          grad_w_hh.to(dtype), grad_bias.to(dtype), grad_w_hr.to(dtype)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_layer_forward_cpu(const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0,
                       const at::Tensor& w_ih, const at::Tensor& w_hh,
                       const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
                       const std::optional<at::Tensor>& w_hr,
                       const std::optional<at::Tensor>& lengths, bool reverse, bool training) {
  const LayerSizes s = check_layer_args(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths);
  at::Tensor bias;
  if (b_ih.has_value() && b_ih->defined()) bias = *b_ih;
  if (b_hh.has_value() && b_hh->defined()) bias = bias.defined() ? bias + *b_hh : *b_hh;
  const at::Tensor len = lengths_on_cpu(lengths, s.T);
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "lstm_layer_forward_cpu", [&] {
    out = forward_impl<scalar_t>(s, input.contiguous(), h0, c0, w_ih, w_hh, bias,
                                 opt_or_undefined(w_hr), len, reverse, training);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_layer_backward_cpu(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                        const at::Tensor& grad_c_n, const at::Tensor& input, const at::Tensor& h0,
                        const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                        const std::optional<at::Tensor>& w_hr,
                        const std::optional<at::Tensor>& lengths, const at::Tensor& output,
                        const at::Tensor& gates, const at::Tensor& cells, const at::Tensor& hidden,
                        bool reverse) {
  const LayerSizes s = check_backward_args(grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh,
                                           w_hr, lengths, output, gates, cells, hidden);
  const at::Tensor len = lengths_on_cpu(lengths, s.T);
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "lstm_layer_backward_cpu", [&] {
    out = backward_impl<scalar_t>(s, grad_output, grad_h_n, grad_c_n, input.contiguous(), h0, c0,
                                  w_ih, w_hh, opt_or_undefined(w_hr), len, output.contiguous(),
                                  gates, cells, hidden, reverse);
  });
  return out;
}

TORCH_LIBRARY_IMPL(fastlstm, CPU, m) {
  // training=None reaching a backend (a call below autograd) saves nothing: csrc/fastlstm.cpp.
  m.impl("lstm_layer_forward",
         [](const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
            const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
            const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr,
            const std::optional<at::Tensor>& lengths, bool reverse, std::optional<bool> training) {
           return lstm_layer_forward_cpu(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse,
                                         training.value_or(false));
         });
  m.impl("lstm_layer_backward", &lstm_layer_backward_cpu);
}

}  // namespace fastlstm

// For fastlstm.empty_cpu_cache() and cpu_cache_bytes() (through ctypes): the block cache of this
// library (cpu/block_cache.h).
extern "C" __attribute__((visibility("default"))) size_t fastlstm_cpu_cache_release() {
  return fastlstm::cpu::block_cache().release();
}

extern "C" __attribute__((visibility("default"))) size_t fastlstm_cpu_cache_bytes() {
  return fastlstm::cpu::block_cache().cached_bytes();
}
