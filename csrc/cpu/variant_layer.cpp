// The CPU variant layer (fastlstm::lstm_variant_forward / lstm_variant_backward; contract in
// csrc/fastlstm.cpp, plain-PyTorch definition in fastlstm/reference.py's lstm_variant_layer):
// zoneout, cell clipping and layer normalisation, any of them.
//
// The plain layer (layer_forward.cpp) is left as it is: a variant call never reaches it, so the
// plain LSTM pays nothing for them. Layer normalisation needs a whole row of the recurrent product
// before any gate of it can be computed, which the plain layer's blocks of hidden units (each a
// thread's, all four gates of its units) never have. So a step here is one GEMM over the batch,
// h_{t-1} @ w_hh^T (BLAS, its own threads), then the pointwise stage of every batch row in
// parallel, one row per task: its layer norms, gates, cell, clipping, output and zoneout, written
// with the plain layer's vectorised nonlinearities (gate_math.h). The input's share, x @ w_ih^T,
// is one GEMM over all steps first (normalised row by row there with layer norm), and the
// backward runs the rows' pointwise backward per step, one GEMM per step for dh_{t-1}, and the
// weight, input and layer-norm gain gradients as large GEMMs and reductions after the loop.
//
// float16/bfloat16 compute in float32 (the cell dtype) and round h to the input dtype each step,
// as the plain layer does.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu/block_cache.h"
#include "cpu/gate_math.h"
#include "cpu/gemm/blas.h"
#include "cpu/gemm/pack.h"
#include "cpu/gemm/parallel.h"
#include "cpu/gemm/probe.h"
#include "cpu/gemm/serial.h"
#include "cpu/lengths.h"
#include "cpu/projection.h"
#include "lstm_checks.h"

namespace fastlstm::cpu {
namespace {

using OptTensor = std::optional<at::Tensor>;
constexpr double kLayerNormEps = 1e-5;
// Batch rows per thread from which each thread runs its own rows through the whole sequence.
constexpr int64_t kMinRowsPerThread = 4;

bool present(const OptTensor& t) { return t.has_value() && t->defined(); }

// The variants of a call, checked, with the tensors in the cell dtype (acc), contiguous.
struct Variants {
  at::Tensor zc, zh;        // masks [T, B, H] / [T, B, P], or undefined
  double zc_p = 0, zh_p = 0;  // the constant m where a mask is undefined (0: off)
  bool clip = false;
  double clip_v = 0;
  bool ln = false;
  at::Tensor ln_ih, ln_hh, ln_cw, ln_cb;  // [4H], [4H], [H], [H]
  bool zoneout_c() const { return zc.defined() || zc_p != 0; }
  bool zoneout_h() const { return zh.defined() || zh_p != 0; }
  int64_t K(int64_t H) const { return ln ? 16 * H + 3 : 7 * H; }
};

Variants check_variants(const LayerSizes& s, const at::Tensor& input, const OptTensor& zoneout_c,
                        const OptTensor& zoneout_h, double zoneout_c_p, double zoneout_h_p,
                        std::optional<double> cell_clip, const OptTensor& ln_ih, const OptTensor& ln_hh,
                        const OptTensor& ln_c_weight, const OptTensor& ln_c_bias) {
  const auto acc = at::toOpMathType(input.scalar_type());
  Variants v;
  auto mask = [&](const OptTensor& m, const char* name, int64_t n) {
    if (!present(m)) return at::Tensor();
    TORCH_CHECK(m->dim() == 3 && m->size(0) == s.T && m->size(1) == s.B && m->size(2) == n, name,
                " must have shape [T, B, ", n, "] = [", s.T, ", ", s.B, ", ", n, "], got ", m->sizes());
    TORCH_CHECK(m->scalar_type() == acc, name, " must have the cell dtype ", acc, ", got ", m->scalar_type());
    TORCH_CHECK(m->device() == input.device(), name, " must be on the input's device");
    return m->contiguous();
  };
  v.zc = mask(zoneout_c, "zoneout_c", s.H);
  v.zh = mask(zoneout_h, "zoneout_h", s.P);
  TORCH_CHECK(zoneout_c_p >= 0 && zoneout_c_p < 1, "zoneout_c_p must lie in [0, 1), got ", zoneout_c_p);
  TORCH_CHECK(zoneout_h_p >= 0 && zoneout_h_p < 1, "zoneout_h_p must lie in [0, 1), got ", zoneout_h_p);
  v.zc_p = zoneout_c_p;
  v.zh_p = zoneout_h_p;
  if (cell_clip.has_value()) {
    TORCH_CHECK(*cell_clip > 0, "cell_clip must be positive, got ", *cell_clip);
    v.clip = true;
    v.clip_v = *cell_clip;
  }
  const int n_ln = present(ln_ih) + present(ln_hh) + present(ln_c_weight) + present(ln_c_bias);
  TORCH_CHECK(n_ln == 0 || n_ln == 4, "ln_ih, ln_hh, ln_c_weight and ln_c_bias must be given together");
  v.ln = n_ln == 4;
  if (v.ln) {
    auto param = [&](const at::Tensor& p, const char* name, int64_t n) {
      TORCH_CHECK(p.dim() == 1 && p.size(0) == n, name, " must have shape [", n, "], got ", p.sizes());
      TORCH_CHECK(p.scalar_type() == input.scalar_type(), name, " must have the input's dtype ",
                  input.scalar_type(), ", got ", p.scalar_type());
      TORCH_CHECK(p.device() == input.device(), name, " must be on the input's device");
      return p.to(acc).contiguous();
    };
    v.ln_ih = param(*ln_ih, "ln_ih", 4 * s.H);
    v.ln_hh = param(*ln_hh, "ln_hh", 4 * s.H);
    v.ln_cw = param(*ln_c_weight, "ln_c_weight", s.H);
    v.ln_cb = param(*ln_c_bias, "ln_c_bias", s.H);
  }
  return v;
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// ---- vectorised row helpers ----------------------------------------------------------------------

template <typename acc_t, typename F>
C10_ALWAYS_INLINE void for_vec(int64_t n, F f) {
  constexpr int64_t kV = Vectorized<acc_t>::size();
  for (int64_t j = 0; j < n; j += kV) f(j, std::min(kV, n - j));
}

// The lanes of v summed in order (a fixed order: results do not depend on the thread count).
// (gemm/serial.h's lane_sum sums float lanes pairwise in registers: a different rounding, which
// moved this layer's float32 error past tests/test_variant_op.py's bound in one case.)
template <typename acc_t>
acc_t hsum(const Vectorized<acc_t>& v) {
  acc_t lanes[Vectorized<acc_t>::size()];
  v.store(lanes);
  acc_t s = 0;
  for (int64_t k = 0; k < Vectorized<acc_t>::size(); ++k) s += lanes[k];
  return s;
}

template <typename acc_t>
acc_t row_sum(int64_t n, const acc_t* x) {
  using Vec = Vectorized<acc_t>;
  Vec s(acc_t(0));
  for_vec<acc_t>(n, [&](int64_t j, int64_t c) { s = s + Vec::loadu(x + j, c); });
  return hsum(s);
}

// Layer norm of one row without affine: xhat = (x - mean) * rstd; returns rstd.
template <typename acc_t>
acc_t normalise(int64_t n, const acc_t* x, acc_t* xhat) {
  using Vec = Vectorized<acc_t>;
  const acc_t mean = row_sum(n, x) / acc_t(n);
  Vec s(acc_t(0));
  for_vec<acc_t>(n, [&](int64_t j, int64_t c) {
    const Vec d = Vec::set(Vec(acc_t(0)), Vec::loadu(x + j, c) - Vec(mean), c);  // lanes past n: 0
    s = s + d * d;
  });
  const acc_t var = hsum(s) / acc_t(n);
  const acc_t rstd = acc_t(1) / std::sqrt(var + acc_t(kLayerNormEps));
  for_vec<acc_t>(n, [&](int64_t j, int64_t c) {
    ((Vec::loadu(x + j, c) - Vec(mean)) * Vec(rstd)).store(xhat + j, c);
  });
  return rstd;
}

// Backward of normalise: dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)). dx may be
// dxhat.
template <typename acc_t>
void normalise_backward(int64_t n, const acc_t* dxhat, const acc_t* xhat, acc_t rstd, acc_t* dx) {
  using Vec = Vectorized<acc_t>;
  Vec s1(acc_t(0)), s2(acc_t(0));
  for_vec<acc_t>(n, [&](int64_t j, int64_t c) {
    const Vec d = Vec::loadu(dxhat + j, c);
    s1 = s1 + d;
    s2 = s2 + d * Vec::loadu(xhat + j, c);
  });
  const acc_t m1 = hsum(s1) / acc_t(n), m2 = hsum(s2) / acc_t(n);
  for_vec<acc_t>(n, [&](int64_t j, int64_t c) {
    ((Vec::loadu(dxhat + j, c) - Vec(m1) - Vec::loadu(xhat + j, c) * Vec(m2)) * Vec(rstd)).store(dx + j, c);
  });
}

// out[j] = sum over r in [0, rows) of a[r * lda + j] * b[r * ldb + j] (b null: of a alone); n
// columns. Summed in slices of kSliceRows rows (in parallel, each row read contiguously), then the
// slices' sums in order: the same order for any thread count.
constexpr int64_t kSliceRows = 64;

template <typename acc_t>
void column_dot(int64_t rows, int64_t n, const acc_t* a, int64_t lda, const acc_t* b, int64_t ldb, acc_t* out) {
  using Vec = Vectorized<acc_t>;
  const int64_t slices = (rows + kSliceRows - 1) / kSliceRows;
  std::fill(out, out + n, acc_t(0));
  if (slices == 0) return;
  std::vector<acc_t> part(slices * n);
  at::parallel_for(0, slices, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t sl = s0; sl < s1; ++sl) {
      acc_t* p = part.data() + sl * n;
      std::fill(p, p + n, acc_t(0));
      for (int64_t r = sl * kSliceRows; r < std::min(rows, (sl + 1) * kSliceRows); ++r) {
        for_vec<acc_t>(n, [&](int64_t j, int64_t c) {
          const Vec x = Vec::loadu(a + r * lda + j, c);
          (Vec::loadu(p + j, c) + (b ? x * Vec::loadu(b + r * ldb + j, c) : x)).store(p + j, c);
        });
      }
    }
  });
  for (int64_t sl = 0; sl < slices; ++sl) {
    const acc_t* p = part.data() + sl * n;
    for_vec<acc_t>(n, [&](int64_t j, int64_t c) { (Vec::loadu(out + j, c) + Vec::loadu(p + j, c)).store(out + j, c); });
  }
}

// C[M, N] = A[M, K] @ B[K, N] (row-major, leading dimensions given): on the calling thread, or
// (inner) in parallel over column blocks. Each element is summed over k in the same order either way.
template <typename acc_t>
void mm(bool inner, int64_t M, int64_t N, int64_t K, const acc_t* A, int64_t lda, const acc_t* B, int64_t ldb,
        acc_t* C, int64_t ldc) {
  if (M <= 0) return;
  if (inner) {
    gemm_nn_parallel<acc_t>(M, N, K, A, lda, B, ldb, C, ldc);
  } else {
    gemm_nn_serial<acc_t>(M, N, K, A, lda, B, ldb, C, ldc);
  }
}

// run_rows(b0, b1, inner) over the batch: each thread its own share of the rows (inner = false)
// where there are at least kMinRowsPerThread rows a thread, else all rows on the calling thread with
// the work of each step split among the threads (inner = true).
template <typename F>
void by_rows(int64_t B, const F& run_rows) {
  const int64_t threads = at::get_num_threads();
  if (threads > 1 && B >= kMinRowsPerThread * threads) {
    at::parallel_for(0, B, (B + threads - 1) / threads, [&](int64_t b0, int64_t b1) { run_rows(b0, b1, false); });
  } else {
    run_rows(0, B, true);
  }
}

// ---- forward -------------------------------------------------------------------------------------

// Saved-row offsets (csrc/fastlstm.cpp).
struct Layout {
  int64_t H, gates, c, craw, y, xhat, rhat, chat, rstd, K;
  Layout(int64_t H_, bool ln)
      : H(H_), gates(0), c(4 * H_), craw(5 * H_), y(6 * H_), xhat(7 * H_), rhat(11 * H_), chat(15 * H_),
        rstd(16 * H_), K(ln ? 16 * H_ + 3 : 7 * H_) {}
};

// The pointwise forward of one active row: reads xg (x W_ih^T, normalised with layer norm) and rec
// (h_{t-1} W_hh^T), c_prev; writes the saved row sv, c (c_t, in place over c_prev), m (o * y, the
// output before projection and zoneout).
template <typename acc_t>
void row_forward(const Layout& L, const Variants& v, const acc_t* xg, const acc_t* rec, const acc_t* bias,
                 const acc_t* mc, acc_t* c, acc_t* sv, acc_t* m) {
  using Vec = Vectorized<acc_t>;
  const int64_t H = L.H;
  acc_t* pre = sv + L.gates;  // pre-activations, then post-activations in place
  if (v.ln) {
    const acc_t rstd = normalise<acc_t>(4 * H, rec, sv + L.rhat);
    sv[L.rstd + 1] = rstd;
    const acc_t* gi = v.ln_ih.data_ptr<acc_t>();
    const acc_t* gh = v.ln_hh.data_ptr<acc_t>();
    const acc_t* rh = sv + L.rhat;
    for_vec<acc_t>(4 * H, [&](int64_t j, int64_t n) {
      Vec a = Vec::loadu(xg + j, n) * Vec::loadu(gi + j, n) + Vec::loadu(rh + j, n) * Vec::loadu(gh + j, n);
      if (bias) a = a + Vec::loadu(bias + j, n);
      a.store(pre + j, n);
    });
  } else {
    for_vec<acc_t>(4 * H, [&](int64_t j, int64_t n) {
      Vec a = Vec::loadu(xg + j, n) + Vec::loadu(rec + j, n);
      if (bias) a = a + Vec::loadu(bias + j, n);
      a.store(pre + j, n);
    });
  }
  const Vec lo(acc_t(-v.clip_v)), hi(acc_t(v.clip_v));
  acc_t* cc = sv + L.y;  // the clipped candidate, until y replaces it
  for_vec<acc_t>(H, [&](int64_t j, int64_t n) {
    const Vec i = vsigmoid(Vec::loadu(pre + j, n)), f = vsigmoid(Vec::loadu(pre + H + j, n));
    const Vec g = vtanh(Vec::loadu(pre + 2 * H + j, n)), o = vsigmoid(Vec::loadu(pre + 3 * H + j, n));
    i.store(pre + j, n);
    f.store(pre + H + j, n);
    g.store(pre + 2 * H + j, n);
    o.store(pre + 3 * H + j, n);
    const Vec craw = f * Vec::loadu(c + j, n) + i * g;
    craw.store(sv + L.craw + j, n);
    (v.clip ? at::vec::minimum(at::vec::maximum(craw, lo), hi) : craw).store(cc + j, n);
  });
  if (v.ln) {
    sv[L.rstd + 2] = normalise<acc_t>(H, cc, sv + L.chat);
    const acc_t* gw = v.ln_cw.data_ptr<acc_t>();
    const acc_t* gb = v.ln_cb.data_ptr<acc_t>();
    const acc_t* ch = sv + L.chat;
    // c~ itself is still needed below for the zoneout: kept in m until then.
    std::copy(cc, cc + H, m);
    for_vec<acc_t>(H, [&](int64_t j, int64_t n) {
      vtanh(Vec::loadu(ch + j, n) * Vec::loadu(gw + j, n) + Vec::loadu(gb + j, n)).store(sv + L.y + j, n);
    });
    cc = m;
  }
  const Vec zc(acc_t(v.zc_p)), one(acc_t(1));
  for_vec<acc_t>(H, [&](int64_t j, int64_t n) {
    const Vec cand = Vec::loadu(cc + j, n);
    const Vec y = v.ln ? Vec::loadu(sv + L.y + j, n) : vtanh(cand);
    Vec cn = cand;
    if (v.zoneout_c()) {
      const Vec z = mc ? Vec::loadu(mc + j, n) : zc;
      cn = z * Vec::loadu(c + j, n) + (one - z) * cand;
    }
    cn.store(c + j, n);
    cn.store(sv + L.c + j, n);
    y.store(sv + L.y + j, n);
    (Vec::loadu(pre + 3 * H + j, n) * y).store(m + j, n);
  });
}

// h_t of one active row from its candidate: zoneout against h_prev, rounded to scalar_t into out
// and (the rounded value) into h.
template <typename scalar_t, typename acc_t>
void row_output(int64_t P, const Variants& v, const acc_t* cand, const acc_t* mh, acc_t* h, scalar_t* out) {
  using Vec = Vectorized<acc_t>;
  const Vec zh(acc_t(v.zh_p)), one(acc_t(1));
  for_vec<acc_t>(P, [&](int64_t j, int64_t n) {
    Vec hn = Vec::loadu(cand + j, n);
    if (v.zoneout_h()) {
      const Vec z = mh ? Vec::loadu(mh + j, n) : zh;
      hn = z * Vec::loadu(h + j, n) + (one - z) * hn;
    }
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      hn.store(out + j, n);
      hn.store(h + j, n);
    } else {
      acc_t tmp[Vec::size()];
      hn.store(tmp, n);
      at::vec::convert(tmp, out + j, n);
      at::vec::convert(out + j, h + j, n);
    }
  });
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_impl(
    const LayerSizes& s, const Variants& v, const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& bias, const at::Tensor& w_hr,
    const Activity& act, bool reverse, bool training) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = s.T, B = s.B, I = s.I, H = s.H, P = s.P;
  const Layout L(H, v.ln);
  const auto acc = input.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const at::Tensor x = input.reshape({T * B, I}).to(acc).contiguous();
  const at::Tensor wih = w_ih.to(acc).contiguous(), whh = w_hh.to(acc).contiguous();
  const at::Tensor whr = s.has_proj ? w_hr.to(acc).contiguous() : at::Tensor();
  // [P, 4H] and [H, P]: the step products' right-hand sides, row-major (gemm_nn)
  const at::Tensor whh_t = whh.t().contiguous();
  const at::Tensor whr_t = s.has_proj ? whr.t().contiguous() : at::Tensor();
  const at::Tensor b = bias.defined() ? bias.to(acc).contiguous() : at::Tensor();
  at::Tensor xg = cached_empty({T * B, 4 * H}, acc);
  at::Tensor wih_panels;  // packed by project_input where it runs on brgemm
  project_input<acc_t>(x, wih, wih_panels, xg, B, nullptr);
  at::Tensor saved = training ? cached_empty({T, B, L.K}, acc) : at::Tensor();  // rows written below
  at::Tensor scratch = training ? at::Tensor() : at::empty({B, L.K}, acc);
  if (v.ln) {  // normalise x W_ih^T row by row up front; its rstd goes to the saved row
    acc_t* xp = xg.data_ptr<acc_t>();
    acc_t* sp = training ? saved.data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, T * B, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        if (sp) {
          sp[r * L.K + L.rstd] = normalise<acc_t>(4 * H, xp + r * 4 * H, sp + r * L.K + L.xhat);
        } else {
          normalise<acc_t>(4 * H, xp + r * 4 * H, xp + r * 4 * H);
        }
      }
    });
  }
  at::Tensor output = cached_empty({T, B, P}, input.options());
  at::Tensor h = h0.to(acc).contiguous().clone();  // the carried h: always a value of scalar_t
  at::Tensor c = c0.to(acc).contiguous().clone();
  at::Tensor rec = at::empty({B, 4 * H}, acc);
  at::Tensor m = at::empty({B, H}, acc);
  at::Tensor hq = s.has_proj ? at::empty({B, P}, acc) : at::Tensor();
  acc_t *hp = h.data_ptr<acc_t>(), *cp = c.data_ptr<acc_t>(), *rp = rec.data_ptr<acc_t>(), *mp = m.data_ptr<acc_t>();
  const acc_t *xp = xg.data_ptr<acc_t>(), *bp = ptr_or_null<acc_t>(b);
  const acc_t *zcp = ptr_or_null<acc_t>(v.zc), *zhp = ptr_or_null<acc_t>(v.zh);
  scalar_t* op = output.data_ptr<scalar_t>();
  // Rows [b0, b1) through every step. Batch rows never meet, so with enough rows each thread runs
  // its own share of the batch through the whole sequence (serial GEMMs, no synchronisation);
  // otherwise the GEMMs are parallel and the rows' pointwise stage is split per step (inner).
  auto run_rows = [&](int64_t b0, int64_t b1, bool inner) {
    for (int64_t step = 0; step < T; ++step) {
      const int64_t t = reverse ? T - 1 - step : step;
      // With sorted lengths the running rows are a prefix: the GEMMs skip the others.
      const int64_t r1 = act.sorted ? std::min(b1, std::max(b0, act.rows(t))) : b1;
      mm<acc_t>(inner, r1 - b0, 4 * H, P, hp + b0 * P, P, whh_t.data_ptr<acc_t>(), 4 * H, rp + b0 * 4 * H, 4 * H);
      acc_t* sv_t = training ? saved.data_ptr<acc_t>() + t * B * L.K : scratch.data_ptr<acc_t>();
      auto rows_fn = [&](int64_t lo, int64_t hi) {
        for (int64_t bb = lo; bb < hi; ++bb) {
          scalar_t* out = op + (t * B + bb) * P;
          if (!act.active(bb, t)) {
            std::fill(out, out + P, scalar_t(0));
            if (training) std::fill(sv_t + bb * L.K, sv_t + (bb + 1) * L.K, acc_t(0));
            continue;
          }
          // the input's share: with layer norm in training, its normalised copy in the saved row
          const acc_t* xrow = v.ln && training ? saved.data_ptr<acc_t>() + (t * B + bb) * L.K + L.xhat
                                               : xp + (t * B + bb) * 4 * H;
          row_forward<acc_t>(L, v, xrow, rp + bb * 4 * H, bp,
                             zcp ? zcp + (t * B + bb) * H : nullptr, cp + bb * H, sv_t + bb * L.K, mp + bb * H);
          if (!s.has_proj) {
            row_output<scalar_t, acc_t>(P, v, mp + bb * H, zhp ? zhp + (t * B + bb) * P : nullptr, hp + bb * P,
                                        out);
          }
        }
      };
      if (inner) {
        at::parallel_for(b0, b1, std::max<int64_t>(1, 2048 / std::max<int64_t>(H, 1)), rows_fn);
      } else {
        rows_fn(b0, b1);
      }
      if (s.has_proj) {
        acc_t* qp = hq.data_ptr<acc_t>();
        mm<acc_t>(inner, r1 - b0, P, H, mp + b0 * H, H, whr_t.data_ptr<acc_t>(), P, qp + b0 * P, P);
        for (int64_t bb = b0; bb < b1; ++bb) {
          if (act.active(bb, t)) {
            row_output<scalar_t, acc_t>(P, v, qp + bb * P, zhp ? zhp + (t * B + bb) * P : nullptr, hp + bb * P,
                                        op + (t * B + bb) * P);
          }
        }
      }
    }
  };
  by_rows(B, run_rows);
  at::Tensor h_n = h.to(input.scalar_type());
  at::Tensor c_n = c.to(input.scalar_type());
  if (!training) saved = at::empty({0}, acc);
  return {output, h_n, c_n, saved};
}

// ---- backward ------------------------------------------------------------------------------------

// The pointwise backward of one active row. dm: gradient of m = o * y (the output before projection
// and zoneout); dc: in: gradient of c_t, out: of c_{t-1}; c_prev: c_{t-1}. Writes da (the
// pre-activations' gradient, [4H]) and with layer norm dz (the gradient of LN(c~) * g_c + b_c, [H])
// and the gradients of x W_ih^T and h_{t-1} W_hh^T into dxg and dr (without layer norm both are da:
// dxg == da, dr unused).
template <typename acc_t>
void row_backward(const Layout& L, const Variants& v, const acc_t* sv, const acc_t* dm, const acc_t* c_prev,
                  const acc_t* mc, acc_t* dc, acc_t* da, acc_t* dz, acc_t* dxg, acc_t* dr, acc_t* tmp) {
  using Vec = Vectorized<acc_t>;
  const int64_t H = L.H;
  const acc_t* gt = sv + L.gates;
  const Vec one(acc_t(1));
  // dcc: gradient of the clipped candidate through y (kept in da's g slot until the gate loop)
  acc_t* dcc = tmp;
  for_vec<acc_t>(H, [&](int64_t j, int64_t n) {
    const Vec o = Vec::loadu(gt + 3 * H + j, n), y = Vec::loadu(sv + L.y + j, n);
    const Vec d = Vec::loadu(dm + j, n);
    (d * y * o * (one - o)).store(da + 3 * H + j, n);
    const Vec dzv = d * o * (one - y * y);
    dzv.store(v.ln ? dz + j : dcc + j, n);
  });
  if (v.ln) {
    const acc_t* gw = v.ln_cw.data_ptr<acc_t>();
    for_vec<acc_t>(H, [&](int64_t j, int64_t n) {
      (Vec::loadu(dz + j, n) * Vec::loadu(gw + j, n)).store(dcc + j, n);
    });
    normalise_backward<acc_t>(H, dcc, sv + L.chat, sv[L.rstd + 2], dcc);
  }
  const Vec zc(acc_t(v.zc_p)), lo(acc_t(-v.clip_v)), hi(acc_t(v.clip_v)), zero(acc_t(0));
  for_vec<acc_t>(H, [&](int64_t j, int64_t n) {
    Vec d = Vec::loadu(dcc + j, n);
    const Vec dct = Vec::loadu(dc + j, n);
    Vec dcp(acc_t(0));
    if (v.zoneout_c()) {
      const Vec z = mc ? Vec::loadu(mc + j, n) : zc;
      d = d + (one - z) * dct;
      dcp = z * dct;
    } else {
      d = d + dct;
    }
    if (v.clip) {
      const Vec craw = Vec::loadu(sv + L.craw + j, n);
      const Vec inside = (craw >= lo) & (craw <= hi);
      d = Vec::blendv(zero, d, inside);
    }
    const Vec i = Vec::loadu(gt + j, n), f = Vec::loadu(gt + H + j, n), g = Vec::loadu(gt + 2 * H + j, n);
    (d * g * i * (one - i)).store(da + j, n);
    (d * Vec::loadu(c_prev + j, n) * f * (one - f)).store(da + H + j, n);
    (d * i * (one - g * g)).store(da + 2 * H + j, n);
    (dcp + d * f).store(dc + j, n);
  });
  if (v.ln) {
    const acc_t* gi = v.ln_ih.data_ptr<acc_t>();
    const acc_t* gh = v.ln_hh.data_ptr<acc_t>();
    for_vec<acc_t>(4 * H, [&](int64_t j, int64_t n) {
      const Vec d = Vec::loadu(da + j, n);
      (d * Vec::loadu(gi + j, n)).store(dxg + j, n);
      (d * Vec::loadu(gh + j, n)).store(dr + j, n);
    });
    normalise_backward<acc_t>(4 * H, dxg, sv + L.xhat, sv[L.rstd], dxg);
    normalise_backward<acc_t>(4 * H, dr, sv + L.rhat, sv[L.rstd + 1], dr);
  }
}

using BackwardOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                               at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

template <typename scalar_t>
BackwardOut backward_impl(const LayerSizes& s, const Variants& v, const at::Tensor& grad_output,
                          const at::Tensor& grad_h_n, const at::Tensor& grad_c_n, const at::Tensor& input,
                          const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
                          const at::Tensor& w_hh, const at::Tensor& w_hr, const Activity& act, bool reverse,
                          const at::Tensor& output, const at::Tensor& saved_in) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = s.T, B = s.B, I = s.I, H = s.H, P = s.P;
  const Layout L(H, v.ln);
  const auto acc = input.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const at::Tensor saved = saved_in.contiguous();
  const at::Tensor gout = cached_empty({T, B, P}, acc).copy_(grad_output);  // often an expanded scalar
  const at::Tensor out_a = output.to(acc).contiguous();
  const at::Tensor whh = w_hh.to(acc).contiguous();
  const at::Tensor whr = s.has_proj ? w_hr.to(acc).contiguous() : at::Tensor();
  const at::Tensor c0a = c0.to(acc).contiguous(), h0a = h0.to(acc).contiguous();
  at::Tensor dh = grad_h_n.to(acc).contiguous().clone();
  at::Tensor dc = grad_c_n.to(acc).contiguous().clone();
  // da: the pre-activations' gradient; dxg / dr: of x W_ih^T and h_{t-1} W_hh^T (da itself
  // without layer norm)
  // Every row of these is written in the loop (zero for the steps past a sequence's length).
  // Rows ldg apart: padded by 64 bytes where 4H values fill a multiple of 4 KiB (rows exactly 4 KiB
  // apart share cache sets, which slows the weight-gradient products; the plain layer does the same).
  // The padding is never read.
  const int64_t ldg = (4 * H * int64_t(sizeof(acc_t))) % 4096 == 0 ? 4 * H + 64 / int64_t(sizeof(acc_t)) : 4 * H;
  at::Tensor da = cached_empty({T, B, ldg}, acc);
  at::Tensor dxg = v.ln ? cached_empty({T, B, ldg}, acc) : da;
  at::Tensor dr = v.ln ? cached_empty({T, B, ldg}, acc) : da;
  at::Tensor dz = v.ln ? cached_empty({T, B, H}, acc) : at::Tensor();
  at::Tensor dq = s.has_proj ? cached_empty({T, B, P}, acc) : at::Tensor();  // gradient of h~ (projected)
  at::Tensor m_all = s.has_proj ? cached_empty({T, B, H}, acc) : at::Tensor();  // o * y
  at::Tensor hprev = cached_empty({T, B, P}, acc);
  at::Tensor dm = at::empty({B, H}, acc);
  at::Tensor dkeep = at::zeros({B, P}, acc);  // zoneout_h's direct share of dh_{t-1}
  at::Tensor dh_rec = at::empty({B, P}, acc);
  at::Tensor tmp = at::empty({at::get_num_threads(), H}, acc);
  const acc_t* sp = saved.data_ptr<acc_t>();
  const acc_t *zcp = ptr_or_null<acc_t>(v.zc), *zhp = ptr_or_null<acc_t>(v.zh);
  acc_t *dhp = dh.data_ptr<acc_t>(), *dcp = dc.data_ptr<acc_t>(), *dmp = dm.data_ptr<acc_t>();
  acc_t *dap = da.data_ptr<acc_t>(), *dxp = dxg.data_ptr<acc_t>(), *drp = dr.data_ptr<acc_t>();
  acc_t* dzp = v.ln ? dz.data_ptr<acc_t>() : nullptr;
  acc_t* dqp = s.has_proj ? dq.data_ptr<acc_t>() : nullptr;
  acc_t* map = s.has_proj ? m_all.data_ptr<acc_t>() : nullptr;
  acc_t *hpp = hprev.data_ptr<acc_t>(), *dkp = dkeep.data_ptr<acc_t>(), *dhr = dh_rec.data_ptr<acc_t>();
  const acc_t *gop = gout.data_ptr<acc_t>(), *oap = out_a.data_ptr<acc_t>();
  const acc_t *c0p = c0a.data_ptr<acc_t>(), *h0p = h0a.data_ptr<acc_t>();
  const acc_t zh_p = acc_t(v.zh_p);
  // The step before t in the direction of the recurrence, and whether row b ran it.
  auto prev_step = [&](int64_t t) { return reverse ? t + 1 : t - 1; };
  auto ran = [&](int64_t bb, int64_t t) { return t >= 0 && t < T && act.active(bb, t); };
  // Rows [b0, b1) back through every step, as the forward's run_rows.
  auto run_rows = [&](int64_t b0, int64_t b1, bool inner) {
    for (int64_t step = T - 1; step >= 0; --step) {
      const int64_t t = reverse ? T - 1 - step : step;
      const int64_t tp = prev_step(t);
      // dh~ (the candidate's gradient) and zoneout_h's direct share, per active row
      for (int64_t bb = b0; bb < b1; ++bb) {
        const int64_t r = t * B + bb;
        if (!act.active(bb, t)) {  // nothing flows through this step: zero rows for the GEMMs
          std::fill(hpp + r * P, hpp + (r + 1) * P, acc_t(0));
          std::fill(dap + r * ldg, dap + r * ldg + 4 * H, acc_t(0));
          if (v.ln) {
            std::fill(dxp + r * ldg, dxp + r * ldg + 4 * H, acc_t(0));
            std::fill(drp + r * ldg, drp + r * ldg + 4 * H, acc_t(0));
            std::fill(dzp + r * H, dzp + (r + 1) * H, acc_t(0));
          }
          if (s.has_proj) {
            std::fill(dqp + r * P, dqp + (r + 1) * P, acc_t(0));
            std::fill(map + r * H, map + (r + 1) * H, acc_t(0));
          }
          continue;
        }
        const acc_t* mh = zhp ? zhp + r * P : nullptr;
        acc_t* dcand = s.has_proj ? dqp + r * P : dmp + bb * H;
        for (int64_t j = 0; j < P; ++j) {
          const acc_t d = dhp[bb * P + j] + gop[r * P + j];
          if (v.zoneout_h()) {
            const acc_t z = mh ? mh[j] : zh_p;
            dcand[j] = (acc_t(1) - z) * d;
            dkp[bb * P + j] = z * d;
          } else {
            dcand[j] = d;
          }
        }
        const acc_t* hsrc = ran(bb, tp) ? oap + (tp * B + bb) * P : h0p + bb * P;
        std::copy(hsrc, hsrc + P, hpp + r * P);
      }
      if (s.has_proj) {  // dm = dh~ @ w_hr (rows of inactive steps are zero)
        mm<acc_t>(inner, b1 - b0, H, P, dqp + (t * B + b0) * P, P, whr.data_ptr<acc_t>(), H, dmp + b0 * H, H);
      }
      auto rows_fn = [&](int64_t lo, int64_t hi) {
        acc_t* tp_buf = tmp.data_ptr<acc_t>() + at::get_thread_num() * H;
        for (int64_t bb = lo; bb < hi; ++bb) {
          if (!act.active(bb, t)) continue;
          const acc_t* sv = sp + (t * B + bb) * L.K;
          const acc_t* c_prev = ran(bb, tp) ? sp + (tp * B + bb) * L.K + L.c : c0p + bb * H;
          const int64_t r = t * B + bb;
          row_backward<acc_t>(L, v, sv, dmp + bb * H, c_prev, zcp ? zcp + r * H : nullptr, dcp + bb * H,
                              dap + r * ldg, dzp ? dzp + r * H : nullptr, dxp + r * ldg, drp + r * ldg, tp_buf);
          if (s.has_proj) {
            using Vec = Vectorized<acc_t>;
            for_vec<acc_t>(H, [&](int64_t j, int64_t n) {
              (Vec::loadu(sv + L.gates + 3 * H + j, n) * Vec::loadu(sv + L.y + j, n)).store(map + r * H + j, n);
            });
          }
        }
      };
      if (inner) {
        at::parallel_for(b0, b1, std::max<int64_t>(1, 2048 / std::max<int64_t>(H, 1)), rows_fn);
      } else {
        rows_fn(b0, b1);
      }
      // dh_{t-1} = dr_t @ w_hh (+ zoneout_h's share) for active rows; others keep theirs
      mm<acc_t>(inner, b1 - b0, P, 4 * H, drp + (t * B + b0) * ldg, ldg, whh.data_ptr<acc_t>(), P, dhr + b0 * P, P);
      for (int64_t bb = b0; bb < b1; ++bb) {
        if (!act.active(bb, t)) continue;
        for (int64_t j = 0; j < P; ++j) {
          dhp[bb * P + j] = dhr[bb * P + j] + (v.zoneout_h() ? dkp[bb * P + j] : acc_t(0));
        }
      }
    }
  };
  by_rows(B, run_rows);
  const auto dt = input.scalar_type();
  at::Tensor x = input.reshape({T * B, I}).to(acc);
  if (act.len != nullptr) {
    // Steps past a sequence's length: zeros instead of whatever the padding holds, so that a NaN
    // there cannot reach grad_w_ih through their zero rows of dxg.
    x = cached_empty({T * B, I}, acc).copy_(x);
    acc_t* xw = x.data_ptr<acc_t>();
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t bb = 0; bb < B; ++bb) {
        if (!act.active(bb, t)) std::fill(xw + (t * B + bb) * I, xw + (t * B + bb + 1) * I, acc_t(0));
      }
    }
  }
  const at::Tensor dx2 = dxg.view({T * B, ldg}).narrow(1, 0, 4 * H);
  // The large products into block-cache tensors (no fresh pages a call).
  auto product = [&](const at::Tensor& a, const at::Tensor& b) {
    at::Tensor out = cached_empty({a.size(0), b.size(1)}, acc);
    at::mm_out(out, a, b);
    return out.to(dt);
  };
  at::Tensor grad_input, grad_w_ih, grad_w_hh, grad_w_hr;
  bool done = false;
  if constexpr (std::is_same_v<acc_t, float>) {
    // float32 on brgemm, as the plain layer's backward (MKL runs these well below brgemm's rate
    // on AMD CPUs): grad_input on column panels of w_ih, the weight gradients by
    // weight_grad_parallel (each tile's sum in a fixed order: independent of the thread count).
    if (brgemm_usable() && T * B >= kBrgemmMinRows) {
      constexpr int64_t kPanel = 64;
      const at::Tensor wih = w_ih.to(acc).contiguous();
      const at::Tensor panels = pack_panels_nn<float>(wih.data_ptr<float>(), 4 * H, I, kPanel, acc);
      at::Tensor gi = cached_empty({T, B, I}, acc);
      gemm_panels_parallel<float>(T * B, I, 4 * H, dxp, ldg, panels, kPanel, gi.data_ptr<float>(), I);
      grad_input = gi.to(dt);
      const float* xr = x.data_ptr<float>();
      at::Tensor gw = cached_empty({4 * H, I}, acc);
      weight_grad_parallel(I, 4 * H, T * B, [&](int64_t k) { return xr + k * I; }, dxp, ldg, gw.data_ptr<float>(), I);
      grad_w_ih = gw.to(dt);
      at::Tensor gh = cached_empty({4 * H, P}, acc);
      weight_grad_parallel(P, 4 * H, T * B, [&](int64_t k) { return hpp + k * P; }, drp, ldg, gh.data_ptr<float>(), P);
      grad_w_hh = gh.to(dt);
      if (s.has_proj) {
        at::Tensor gr = cached_empty({P, H}, acc);
        weight_grad_parallel(H, P, T * B, [&](int64_t k) { return map + k * H; }, dqp, P, gr.data_ptr<float>(), H);
        grad_w_hr = gr.to(dt);
      }
      done = true;
    }
  }
  if (!done) {
    grad_input = product(dx2, w_ih.to(acc)).view({T, B, I});
    grad_w_ih = product(dx2.t(), x);
    grad_w_hh = product(dr.view({T * B, ldg}).narrow(1, 0, 4 * H).t(), hprev.view({T * B, P}));
    if (s.has_proj) grad_w_hr = product(dq.view({T * B, P}).t(), m_all.view({T * B, H}));
  }
  if (!s.has_proj) grad_w_hr = at::empty({0}, input.options());
  auto column_sum = [&](int64_t n, const acc_t* a, int64_t lda, const acc_t* b, int64_t ldb) {
    at::Tensor out = at::empty({n}, acc);
    column_dot<acc_t>(T * B, n, a, lda, b, ldb, out.data_ptr<acc_t>());
    return out.to(dt);
  };
  at::Tensor grad_bias = column_sum(4 * H, dap, ldg, nullptr, 0);
  at::Tensor g_ih, g_hh, g_cw, g_cb;
  if (v.ln) {
    g_ih = column_sum(4 * H, dap, ldg, sp + L.xhat, L.K);
    g_hh = column_sum(4 * H, dap, ldg, sp + L.rhat, L.K);
    g_cw = column_sum(H, dzp, H, sp + L.chat, L.K);
    g_cb = column_sum(H, dzp, H, nullptr, 0);
  } else {
    g_ih = at::empty({0}, input.options());
    g_hh = at::empty({0}, input.options());
    g_cw = at::empty({0}, input.options());
    g_cb = at::empty({0}, input.options());
  }
  return {grad_input, dh.to(dt), dc.to(dt), grad_w_ih, grad_w_hh, grad_bias, grad_w_hr, g_ih, g_hh, g_cw, g_cb};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> variant_forward_cpu(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& w_hr,
    const OptTensor& lengths, bool reverse, const OptTensor& zoneout_c, const OptTensor& zoneout_h,
    double zoneout_c_p, double zoneout_h_p, std::optional<double> cell_clip, const OptTensor& ln_ih,
    const OptTensor& ln_hh, const OptTensor& ln_c_weight, const OptTensor& ln_c_bias, bool training) {
  const LayerSizes s = check_layer_args(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths);
  const Variants v = check_variants(s, input, zoneout_c, zoneout_h, zoneout_c_p, zoneout_h_p, cell_clip, ln_ih,
                                    ln_hh, ln_c_weight, ln_c_bias);
  at::Tensor bias;
  if (present(b_ih)) bias = *b_ih;
  if (present(b_hh)) bias = bias.defined() ? bias + *b_hh : *b_hh;
  const at::Tensor len = lengths_on_cpu(lengths, s.T);
  const Activity act = make_activity(len, s.B);
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "lstm_variant_forward_cpu", [&] {
    out = forward_impl<scalar_t>(s, v, input.contiguous(), h0, c0, w_ih, w_hh, bias,
                                 present(w_hr) ? *w_hr : at::Tensor(), act, reverse, training);
  });
  return out;
}

BackwardOut variant_backward_cpu(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                                 const at::Tensor& grad_c_n, const at::Tensor& input, const at::Tensor& h0,
                                 const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                                 const OptTensor& w_hr, const OptTensor& lengths, bool reverse,
                                 const OptTensor& zoneout_c, const OptTensor& zoneout_h, double zoneout_c_p,
                                 double zoneout_h_p, std::optional<double> cell_clip, const OptTensor& ln_ih,
                                 const OptTensor& ln_hh, const OptTensor& ln_c_weight, const OptTensor& ln_c_bias,
                                 const at::Tensor& output, const at::Tensor& saved) {
  const LayerSizes s = check_layer_args(input, h0, c0, w_ih, w_hh, std::nullopt, std::nullopt, w_hr, lengths);
  const Variants v = check_variants(s, input, zoneout_c, zoneout_h, zoneout_c_p, zoneout_h_p, cell_clip, ln_ih,
                                    ln_hh, ln_c_weight, ln_c_bias);
  FASTLSTM_CHECK_SHAPE(grad_output, s.T, s.B, s.P);
  FASTLSTM_CHECK_SHAPE(grad_h_n, s.B, s.P);
  FASTLSTM_CHECK_SHAPE(grad_c_n, s.B, s.H);
  FASTLSTM_CHECK_SHAPE(output, s.T, s.B, s.P);
  FASTLSTM_CHECK_SHAPE(saved, s.T, s.B, v.K(s.H));
  TORCH_CHECK(saved.scalar_type() == at::toOpMathType(input.scalar_type()), "saved must have the cell dtype ",
              at::toOpMathType(input.scalar_type()), ", got ", saved.scalar_type());
  const at::Tensor len = lengths_on_cpu(lengths, s.T);
  const Activity act = make_activity(len, s.B);
  BackwardOut out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "lstm_variant_backward_cpu", [&] {
    out = backward_impl<scalar_t>(s, v, grad_output, grad_h_n, grad_c_n, input.contiguous(), h0, c0, w_ih, w_hh,
                                  present(w_hr) ? *w_hr : at::Tensor(), act, reverse, output, saved);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlstm, CPU, m) {
  m.impl("lstm_variant_forward", &variant_forward_cpu);
  m.impl("lstm_variant_backward", &variant_backward_cpu);
}

}  // namespace fastlstm::cpu
