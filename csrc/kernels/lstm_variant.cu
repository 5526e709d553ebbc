// The variant layer's row-wise kernels (declared and documented in lstm_variant.cuh). One block of
// kThreads threads per batch row; thread k handles the hidden units j = k, k + kThreads, ... (all
// four gates of each), so that the values a thread wrote in one pass are the ones it reads in the
// next, and only the layer-norm statistics cross threads (block_sum).
#include <type_traits>

#include "lstm_device.cuh"
#include "lstm_launch.cuh"
#include "lstm_variant.cuh"

namespace fastlstm {
namespace cuda {
namespace {

using namespace detail;

__device__ __forceinline__ float rsqrt_(float x) { return 1.f / sqrtf(x); }
__device__ __forceinline__ double rsqrt_(double x) { return 1.0 / sqrt(x); }

// Sums each of the kN values over the block's threads and gives every thread the totals. A fixed
// tree over thread indices, so the result does not depend on scheduling. Every thread must call it.
template <int kN, typename Acc>
__device__ __forceinline__ void block_sum(Acc (&v)[kN]) {
  FASTLSTM_SHARED(Acc, red, [kN][kThreads]);
  const int tid = threadIdx.x;
#pragma unroll
  for (int n = 0; n < kN; ++n) red[n][tid] = v[n];
  __syncthreads();
#pragma unroll
  for (int s = kThreads / 2; s > 0; s /= 2) {
    if (tid < s) {
#pragma unroll
      for (int n = 0; n < kN; ++n) red[n][tid] += red[n][tid + s];
    }
    __syncthreads();
  }
#pragma unroll
  for (int n = 0; n < kN; ++n) v[n] = red[n][0];
  __syncthreads();  // red may be reused by the next call
}

template <typename Acc>
__device__ __forceinline__ Acc zone_at(const ZoneoutStep<Acc>& z, int64_t i) {
  return z.mask != nullptr ? z.mask[i] : z.p;
}

// fastlstm/reference.py's _zoneout: m * prev + (1 - m) * cand, in that order.
template <typename Acc>
__device__ __forceinline__ Acc zone_mix(Acc m, Acc prev, Acc cand) {
  return m * prev + (Acc(1) - m) * cand;
}

// torch.clamp(x, -clip, clip), NaN kept.
template <typename Acc>
__device__ __forceinline__ Acc clamp_(Acc x, Acc clip) {
  return x < -clip ? -clip : (x > clip ? clip : x);
}

__device__ __forceinline__ bool active_row(const int64_t* lengths, int64_t t, int b) {
  return lengths == nullptr || t < lengths[b];
}

template <typename T>
struct ForwardCellParams {
  int B, H, P;
  int64_t t;
  const int64_t* lengths;
  const AccT<T>* xg;
  const AccT<T>* rec;
  const T* bias;
  const T* ln_ih;
  const T* ln_hh;
  const T* ln_c_weight;
  const T* ln_c_bias;
  AccT<T> clip;
  ZoneoutStep<AccT<T>> zc, zh;
  AccT<T>* c_state;
  AccT<T>* saved;
  const AccT<T>* h_prev;
  AccT<T>* h_next;
  T* output;
  AccT<T>* m;
};

// Grid: (B). See lstm_variant_forward_cell.
template <typename T, bool kLN, bool kClip, bool kZone>
__global__ void __launch_bounds__(kThreads) lstm_variant_forward_cell_kernel(ForwardCellParams<T> p) {
  using Acc = AccT<T>;
  const int b = blockIdx.x, tid = threadIdx.x;
  const int H = p.H;
  const int64_t H4 = 4 * static_cast<int64_t>(H);
  const int64_t K = variant_saved_width(H, kLN);
  const int64_t bH = static_cast<int64_t>(b) * H;
  Acc* s = p.saved + static_cast<int64_t>(b) * K;
  const bool proj = p.m != nullptr;
  if (!active_row(p.lengths, p.t, b)) {
    for (int64_t n = tid; n < K; n += kThreads) s[n] = Acc(0);
    for (int j = tid; j < H; j += kThreads) {
      if (proj) {
        p.m[bH + j] = Acc(0);
      } else {
        p.output[bH + j] = zero<T>();
        p.h_next[bH + j] = p.h_prev[bH + j];
      }
    }
    return;
  }
  const Acc* xr = p.xg + b * H4;
  const Acc* rr = p.rec + b * H4;

  Acc mean_x = Acc(0), rstd_x = Acc(0), mean_r = Acc(0), rstd_r = Acc(0);
  if constexpr (kLN) {
    Acc v[2] = {Acc(0), Acc(0)};
    for (int64_t n = tid; n < H4; n += kThreads) {
      v[0] += xr[n];
      v[1] += rr[n];
    }
    block_sum(v);
    mean_x = v[0] / Acc(H4);
    mean_r = v[1] / Acc(H4);
    v[0] = v[1] = Acc(0);
    for (int64_t n = tid; n < H4; n += kThreads) {
      const Acc dx = xr[n] - mean_x, dr = rr[n] - mean_r;
      v[0] += dx * dx;
      v[1] += dr * dr;
    }
    block_sum(v);
    rstd_x = rsqrt_(v[0] / Acc(H4) + Acc(kLayerNormEps));
    rstd_r = rsqrt_(v[1] / Acc(H4) + Acc(kLayerNormEps));
  }

  // c_t, m and (without projection) h_t of unit j from c~_t (clipped), y and o.
  auto finish = [&](int j, Acc cc, Acc y, Acc o, Acc c_prev) {
    s[6 * H + j] = y;
    Acc c_t = cc;
    if constexpr (kZone) c_t = zone_mix(zone_at(p.zc, bH + j), c_prev, cc);
    p.c_state[bH + j] = c_t;
    s[4 * H + j] = c_t;
    const Acc mm = o * y;
    if (proj) {
      p.m[bH + j] = mm;
    } else {
      Acc h = mm;
      if constexpr (kZone) h = zone_mix(zone_at(p.zh, bH + j), p.h_prev[bH + j], mm);
      const T hr = from_acc<T>(h);
      p.output[bH + j] = hr;
      p.h_next[bH + j] = to_acc(hr);
    }
  };

  Acc c_sum = Acc(0);
  for (int j = tid; j < H; j += kThreads) {
    Acc a[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t n = static_cast<int64_t>(q) * H + j;
      Acc pre;
      if constexpr (kLN) {
        const Acc xh = (xr[n] - mean_x) * rstd_x;
        const Acc rh = (rr[n] - mean_r) * rstd_r;
        s[7 * H + n] = xh;
        s[11 * H + n] = rh;
        pre = xh * to_acc(p.ln_ih[n]) + rh * to_acc(p.ln_hh[n]);
      } else {
        pre = xr[n] + rr[n];
      }
      if (p.bias != nullptr) pre += to_acc(p.bias[n]);
      a[q] = pre;
    }
    const Acc i = sigmoid(a[0]), f = sigmoid(a[1]), g = tanh_(a[2]), o = sigmoid(a[3]);
    s[j] = i;
    s[H + j] = f;
    s[2 * H + j] = g;
    s[3 * H + j] = o;
    const Acc c_prev = p.c_state[bH + j];
    const Acc c_raw = f * c_prev + i * g;
    s[5 * H + j] = c_raw;
    Acc cc = c_raw;
    if constexpr (kClip) cc = clamp_(c_raw, p.clip);
    if constexpr (kLN) {
      s[4 * H + j] = cc;  // until the statistics of c~ are known
      c_sum += cc;
    } else {
      finish(j, cc, tanh_(cc), o, c_prev);
    }
  }

  if constexpr (kLN) {
    Acc v[1] = {c_sum};
    block_sum(v);
    const Acc mean_c = v[0] / Acc(H);
    v[0] = Acc(0);
    for (int j = tid; j < H; j += kThreads) {
      const Acc d = s[4 * H + j] - mean_c;
      v[0] += d * d;
    }
    block_sum(v);
    const Acc rstd_c = rsqrt_(v[0] / Acc(H) + Acc(kLayerNormEps));
    for (int j = tid; j < H; j += kThreads) {
      const Acc cc = s[4 * H + j];
      const Acc ch = (cc - mean_c) * rstd_c;
      s[15 * H + j] = ch;
      const Acc y = tanh_(ch * to_acc(p.ln_c_weight[j]) + to_acc(p.ln_c_bias[j]));
      finish(j, cc, y, s[3 * H + j], p.c_state[bH + j]);
    }
    if (tid == 0) {
      s[16 * H] = rstd_x;
      s[16 * H + 1] = rstd_r;
      s[16 * H + 2] = rstd_c;
    }
  }
}

// Grid: (B). See lstm_variant_forward_output.
template <typename T, bool kZone>
__global__ void __launch_bounds__(kThreads)
    lstm_variant_forward_output_kernel(int P, int64_t t, const int64_t* __restrict__ lengths,
                                       const AccT<T>* __restrict__ h_cand, ZoneoutStep<AccT<T>> zh,
                                       const AccT<T>* __restrict__ h_prev,
                                       AccT<T>* __restrict__ h_next, T* __restrict__ output) {
  using Acc = AccT<T>;
  const int b = blockIdx.x;
  const int64_t bP = static_cast<int64_t>(b) * P;
  const bool active = active_row(lengths, t, b);
  for (int j = threadIdx.x; j < P; j += kThreads) {
    if (active) {
      Acc h = h_cand[bP + j];
      if constexpr (kZone) h = zone_mix(zone_at(zh, bP + j), h_prev[bP + j], h);
      const T hr = from_acc<T>(h);
      output[bP + j] = hr;
      h_next[bP + j] = to_acc(hr);
    } else {
      output[bP + j] = zero<T>();
      h_next[bP + j] = h_prev[bP + j];
    }
  }
}

// The gradient of h_t at unit (b, j): the carried parts and, where active, the output's. Splits it
// into dh~ (returned) and the part zoneout keeps for h_{t-1} (written to dh_keep).
template <typename T, bool kZone>
__device__ __forceinline__ AccT<T> split_dh(int64_t bj, const T* grad_output, AccT<T>* dh_keep,
                                            const AccT<T>* dh_rec, const ZoneoutStep<AccT<T>>& zh) {
  using Acc = AccT<T>;
  Acc dh = dh_keep[bj];
  if (dh_rec != nullptr) dh += dh_rec[bj];
  dh += to_acc(grad_output[bj]);
  if constexpr (kZone) {
    const Acc mh = zone_at(zh, bj);
    dh_keep[bj] = mh * dh;
    return (Acc(1) - mh) * dh;
  } else {
    dh_keep[bj] = Acc(0);
    return dh;
  }
}

// Grid: (B). See lstm_variant_backward_output.
template <typename T, bool kZone>
__global__ void __launch_bounds__(kThreads)
    lstm_variant_backward_output_kernel(int P, int64_t t, const int64_t* __restrict__ lengths,
                                        const T* __restrict__ grad_output, ZoneoutStep<AccT<T>> zh,
                                        AccT<T>* __restrict__ dh_keep,
                                        const AccT<T>* __restrict__ dh_rec,
                                        AccT<T>* __restrict__ dh_cand) {
  using Acc = AccT<T>;
  const int b = blockIdx.x;
  const int64_t bP = static_cast<int64_t>(b) * P;
  const bool active = active_row(lengths, t, b);
  for (int j = threadIdx.x; j < P; j += kThreads) {
    Acc d = Acc(0);
    if (active) {
      d = split_dh<T, kZone>(bP + j, grad_output, dh_keep, dh_rec, zh);
    } else if (dh_rec != nullptr) {
      dh_keep[bP + j] += dh_rec[bP + j];
    }
    dh_cand[bP + j] = d;
  }
}

template <typename T>
struct BackwardCellParams {
  int B, H, P;
  int64_t t;
  const int64_t* lengths;
  const AccT<T>* saved_t;
  const AccT<T>* saved_prev;
  int64_t prev_t;
  const AccT<T>* c0;
  const T* ln_ih;
  const T* ln_hh;
  const T* ln_c_weight;
  AccT<T> clip;
  ZoneoutStep<AccT<T>> zc, zh;
  const AccT<T>* dm;
  const T* grad_output;
  AccT<T>* dh_keep;
  const AccT<T>* dh_rec;
  AccT<T>* dc_state;
  AccT<T>* dpre;
  AccT<T>* dxg;
  AccT<T>* dr;
  AccT<T>* dz;
  AccT<T>* m;
};

// Grid: (B). See lstm_variant_backward_cell.
template <typename T, bool kLN, bool kClip, bool kZone>
__global__ void __launch_bounds__(kThreads)
    lstm_variant_backward_cell_kernel(BackwardCellParams<T> p) {
  using Acc = AccT<T>;
  const int b = blockIdx.x, tid = threadIdx.x;
  const int H = p.H;
  const int64_t H4 = 4 * static_cast<int64_t>(H);
  const int64_t K = variant_saved_width(H, kLN);
  const int64_t bH = static_cast<int64_t>(b) * H;
  const bool proj = p.dm != nullptr;
  Acc* dpre = p.dpre + b * H4;
  if (!active_row(p.lengths, p.t, b)) {
    for (int64_t n = tid; n < H4; n += kThreads) {
      dpre[n] = Acc(0);
      if constexpr (kLN) {
        p.dxg[b * H4 + n] = Acc(0);
        p.dr[b * H4 + n] = Acc(0);
      }
    }
    for (int j = tid; j < H; j += kThreads) {
      if constexpr (kLN) p.dz[bH + j] = Acc(0);
      if (p.m != nullptr) p.m[bH + j] = Acc(0);
      if (!proj && p.dh_rec != nullptr) p.dh_keep[bH + j] += p.dh_rec[bH + j];
    }
    return;
  }
  const Acc* s = p.saved_t + static_cast<int64_t>(b) * K;
  const bool prev_active = p.saved_prev != nullptr && active_row(p.lengths, p.prev_t, b);
  const Acc* c_prev = prev_active ? p.saved_prev + static_cast<int64_t>(b) * K + 4 * H : p.c0 + bH;

  // From dc~_t (the gradient of the clipped candidate through y) and do: the rest of the cell, the
  // gate pre-activations, dc_{t-1}.
  Acc u[4] = {Acc(0), Acc(0), Acc(0), Acc(0)};
  auto finish = [&](int j, Acc dct, Acc d_o) {
    const Acc dc = p.dc_state[bH + j];
    Acc keep = Acc(0);
    if constexpr (kZone) {
      const Acc mc = zone_at(p.zc, bH + j);
      dct += (Acc(1) - mc) * dc;
      keep = mc * dc;
    } else {
      dct += dc;
    }
    if constexpr (kClip) {
      const Acc c_raw = s[5 * H + j];
      if (!(c_raw >= -p.clip && c_raw <= p.clip)) dct = Acc(0);
    }
    const Acc i = s[j], f = s[H + j], g = s[2 * H + j], o = s[3 * H + j];
    p.dc_state[bH + j] = keep + dct * f;
    Acc d[4];
    d[0] = dct * g * i * (Acc(1) - i);
    d[1] = dct * c_prev[j] * f * (Acc(1) - f);
    d[2] = dct * i * (Acc(1) - g * g);
    d[3] = d_o * o * (Acc(1) - o);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t n = static_cast<int64_t>(q) * H + j;
      dpre[n] = d[q];
      if constexpr (kLN) {
        const Acc dxh = d[q] * to_acc(p.ln_ih[n]), drh = d[q] * to_acc(p.ln_hh[n]);
        u[0] += dxh;
        u[1] += dxh * s[7 * H + n];
        u[2] += drh;
        u[3] += drh * s[11 * H + n];
      }
    }
    if (p.m != nullptr) p.m[bH + j] = o * s[6 * H + j];
  };

  Acc v[2] = {Acc(0), Acc(0)};
  for (int j = tid; j < H; j += kThreads) {
    const Acc dmj = proj ? p.dm[bH + j] : split_dh<T, kZone>(bH + j, p.grad_output, p.dh_keep,
                                                               p.dh_rec, p.zh);
    const Acc o = s[3 * H + j], y = s[6 * H + j];
    const Acc d_o = dmj * y;
    const Acc dzj = dmj * o * (Acc(1) - y * y);
    if constexpr (kLN) {
      const Acc dch = dzj * to_acc(p.ln_c_weight[j]);
      v[0] += dch;
      v[1] += dch * s[15 * H + j];
      p.dz[bH + j] = dzj;
      dpre[3 * H + j] = d_o;  // until the statistics of dc~ are known
    } else {
      finish(j, dzj, d_o);
    }
  }

  if constexpr (kLN) {
    block_sum(v);
    const Acc m1 = v[0] / Acc(H), m2 = v[1] / Acc(H), rstd_c = s[16 * H + 2];
    for (int j = tid; j < H; j += kThreads) {
      const Acc dch = p.dz[bH + j] * to_acc(p.ln_c_weight[j]);
      finish(j, rstd_c * (dch - m1 - s[15 * H + j] * m2), dpre[3 * H + j]);
    }
    block_sum(u);
    const Acc ux = u[0] / Acc(H4), uxx = u[1] / Acc(H4), ur = u[2] / Acc(H4), urr = u[3] / Acc(H4);
    const Acc rstd_x = s[16 * H], rstd_r = s[16 * H + 1];
    for (int j = tid; j < H; j += kThreads) {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int64_t n = static_cast<int64_t>(q) * H + j;
        const Acc d = dpre[n];
        p.dxg[b * H4 + n] = rstd_x * (d * to_acc(p.ln_ih[n]) - ux - s[7 * H + n] * uxx);
        p.dr[b * H4 + n] = rstd_r * (d * to_acc(p.ln_hh[n]) - ur - s[11 * H + n] * urr);
      }
    }
  }
}

// Grid: (ceil(N / kThreads), slices). Slice s sums rows [s * per, min(rows, (s + 1) * per)).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    lstm_variant_column_partial_kernel(int64_t rows, int64_t per, int N,
                                       const AccT<T>* __restrict__ a, int64_t lda,
                                       const AccT<T>* __restrict__ b, int64_t ldb,
                                       AccT<T>* __restrict__ partial) {
  using Acc = AccT<T>;
  const int n = blockIdx.x * kThreads + threadIdx.x;
  if (n >= N) return;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * per;
  const int64_t r1 = r0 + per < rows ? r0 + per : rows;
  Acc sum = Acc(0);
  if (b != nullptr) {
    for (int64_t r = r0; r < r1; ++r) sum += a[r * lda + n] * b[r * ldb + n];
  } else {
    for (int64_t r = r0; r < r1; ++r) sum += a[r * lda + n];
  }
  partial[static_cast<int64_t>(blockIdx.y) * N + n] = sum;
}

// Grid: (ceil(N / kThreads)).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    lstm_variant_column_total_kernel(int slices, int N, const AccT<T>* __restrict__ partial,
                                     T* __restrict__ out) {
  using Acc = AccT<T>;
  const int n = blockIdx.x * kThreads + threadIdx.x;
  if (n >= N) return;
  Acc sum = Acc(0);
  for (int s = 0; s < slices; ++s) sum += partial[static_cast<int64_t>(s) * N + n];
  out[n] = from_acc<T>(sum);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    lstm_variant_add_kernel(int64_t n, const AccT<T>* __restrict__ a, const AccT<T>* __restrict__ b,
                            T* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride) {
    out[i] = from_acc<T>(b != nullptr ? a[i] + b[i] : a[i]);
  }
}

// Grid-stride over [T_, B, I]. See lstm_variant_input.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    lstm_variant_input_kernel(int64_t T_, int B, int I, const T* __restrict__ x,
                              const int64_t* __restrict__ lengths, AccT<T>* __restrict__ out) {
  const int64_t BI = static_cast<int64_t>(B) * I;
  const int64_t n = T_ * BI;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t t = i / BI;
    const bool active = lengths == nullptr || t < lengths[(i % BI) / I];
    out[i] = active ? to_acc(x[i]) : AccT<T>(0);
  }
}

// Grid-stride over [T_, B, P]. See lstm_variant_recurrent_inputs.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    lstm_variant_recurrent_inputs_kernel(int64_t T_, int B, int P, const T* __restrict__ output,
                                         const T* __restrict__ h0,
                                         const int64_t* __restrict__ lengths, bool reverse,
                                         AccT<T>* __restrict__ h_prev) {
  const int64_t BP = static_cast<int64_t>(B) * P;
  const int64_t n = T_ * BP;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t t = i / BP, bp = i % BP;
    const int64_t prev_t = reverse ? t + 1 : t - 1;
    const bool prev_active =
        prev_t >= 0 && prev_t < T_ && (lengths == nullptr || prev_t < lengths[bp / P]);
    h_prev[i] = to_acc(prev_active ? output[prev_t * BP + bp] : h0[bp]);
  }
}

// Blocks for a grid-stride kernel over n elements: enough for every element, at most 1024.
unsigned stride_blocks(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 1024 ? blocks : 1024);
}

// Calls f(kLN, kClip, kZone) with the three flags as std::bool_constant.
template <typename F>
cudaError_t with_flags(bool ln, bool clip, bool zone, F&& f) {
  auto with_zone = [&](auto kln, auto kclip) -> cudaError_t {
    return zone ? f(kln, kclip, std::true_type{}) : f(kln, kclip, std::false_type{});
  };
  auto with_clip = [&](auto kln) -> cudaError_t {
    return clip ? with_zone(kln, std::true_type{}) : with_zone(kln, std::false_type{});
  };
  return ln ? with_clip(std::true_type{}) : with_clip(std::false_type{});
}

template <typename T>
ZoneoutStep<AccT<T>> no_zoneout() {
  return {nullptr, AccT<T>(0)};
}

}  // namespace

template <typename T>
cudaError_t lstm_variant_forward_cell(int B, int H, int P, int64_t t, const int64_t* lengths,
                                      const AccT<T>* xg, const AccT<T>* rec, const T* bias,
                                      const VariantOptions<T>& opt, ZoneoutStep<AccT<T>> zc,
                                      ZoneoutStep<AccT<T>> zh, AccT<T>* c_state, AccT<T>* saved,
                                      const AccT<T>* h_prev, AccT<T>* h_next, T* output, AccT<T>* m,
                                      cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  if (m == nullptr && (P != H || h_prev == nullptr || h_next == nullptr || output == nullptr)) {
    return cudaErrorInvalidValue;
  }
  ForwardCellParams<T> p{B, H, P, t, lengths, xg, rec, bias, opt.ln_ih, opt.ln_hh, opt.ln_c_weight,
                         opt.ln_c_bias, static_cast<AccT<T>>(opt.cell_clip), zc, zh, c_state, saved,
                         h_prev, h_next, output, m};
  return with_flags(opt.layer_norm(), opt.has_clip, opt.zoneout(), [&](auto ln, auto clip, auto zone) {
    return launch(lstm_variant_forward_cell_kernel<T, decltype(ln)::value, decltype(clip)::value,
                                                   decltype(zone)::value>,
                  dim3(static_cast<unsigned>(B)), stream, p);
  });
}

template <typename T>
cudaError_t lstm_variant_forward_output(int B, int P, int64_t t, const int64_t* lengths,
                                        const AccT<T>* h_cand, bool zoneout, ZoneoutStep<AccT<T>> zh,
                                        const AccT<T>* h_prev, AccT<T>* h_next, T* output,
                                        cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(B));
  if (zoneout) {
    return launch(lstm_variant_forward_output_kernel<T, true>, grid, stream, P, t, lengths, h_cand,
                  zh, h_prev, h_next, output);
  }
  return launch(lstm_variant_forward_output_kernel<T, false>, grid, stream, P, t, lengths, h_cand,
                no_zoneout<T>(), h_prev, h_next, output);
}

template <typename T>
cudaError_t lstm_variant_backward_output(int B, int P, int64_t t, const int64_t* lengths,
                                         const T* grad_output, bool zoneout, ZoneoutStep<AccT<T>> zh,
                                         AccT<T>* dh_keep, const AccT<T>* dh_rec,
                                         AccT<T>* dh_cand, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(B));
  if (zoneout) {
    return launch(lstm_variant_backward_output_kernel<T, true>, grid, stream, P, t, lengths,
                  grad_output, zh, dh_keep, dh_rec, dh_cand);
  }
  return launch(lstm_variant_backward_output_kernel<T, false>, grid, stream, P, t, lengths,
                grad_output, no_zoneout<T>(), dh_keep, dh_rec, dh_cand);
}

template <typename T>
cudaError_t lstm_variant_backward_cell(int B, int H, int P, int64_t t, const int64_t* lengths,
                                       const AccT<T>* saved_t, const AccT<T>* saved_prev,
                                       int64_t prev_t, const AccT<T>* c0,
                                       const VariantOptions<T>& opt, ZoneoutStep<AccT<T>> zc,
                                       ZoneoutStep<AccT<T>> zh, const AccT<T>* dm,
                                       const T* grad_output, AccT<T>* dh_keep,
                                       const AccT<T>* dh_rec, AccT<T>* dc_state, AccT<T>* dpre,
                                       AccT<T>* dxg, AccT<T>* dr, AccT<T>* dz, AccT<T>* m,
                                       cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  if (dm == nullptr && (P != H || grad_output == nullptr || dh_keep == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (opt.layer_norm() && (dxg == nullptr || dr == nullptr || dz == nullptr)) {
    return cudaErrorInvalidValue;
  }
  BackwardCellParams<T> p{B, H, P, t, lengths, saved_t, saved_prev, prev_t, c0, opt.ln_ih,
                          opt.ln_hh, opt.ln_c_weight, static_cast<AccT<T>>(opt.cell_clip), zc, zh,
                          dm, grad_output, dh_keep, dh_rec, dc_state, dpre, dxg, dr, dz, m};
  return with_flags(opt.layer_norm(), opt.has_clip, opt.zoneout(), [&](auto ln, auto clip, auto zone) {
    return launch(lstm_variant_backward_cell_kernel<T, decltype(ln)::value, decltype(clip)::value,
                                                    decltype(zone)::value>,
                  dim3(static_cast<unsigned>(B)), stream, p);
  });
}

template <typename T>
cudaError_t lstm_variant_column_sums(int64_t rows, int N, const AccT<T>* a, int64_t lda,
                                     const AccT<T>* b, int64_t ldb, AccT<T>* partial, T* out,
                                     cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  const int64_t slices = variant_column_slices(rows);
  const int64_t per = (rows + slices - 1) / slices;
  const cudaError_t err =
      launch(lstm_variant_column_partial_kernel<T>,
             dim3(blocks_for(N, kThreads), static_cast<unsigned>(slices)), stream, rows, per, N, a,
             lda, b, ldb, partial);
  if (err != cudaSuccess) return err;
  return launch(lstm_variant_column_total_kernel<T>, dim3(blocks_for(N, kThreads)), stream,
                static_cast<int>(slices), N, partial, out);
}

template <typename T>
cudaError_t lstm_variant_add(int64_t n, const AccT<T>* a, const AccT<T>* b, T* out,
                             cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return launch(lstm_variant_add_kernel<T>, dim3(stride_blocks(n)), stream, n, a, b, out);
}

template <typename T>
cudaError_t lstm_variant_input(int64_t T_, int B, int I, const T* x, const int64_t* lengths,
                               AccT<T>* out, cudaStream_t stream) {
  const int64_t n = T_ * B * I;
  if (n == 0) return cudaSuccess;
  return launch(lstm_variant_input_kernel<T>, dim3(stride_blocks(n)), stream, T_, B, I, x, lengths,
                out);
}

template <typename T>
cudaError_t lstm_variant_recurrent_inputs(int64_t T_, int B, int P, const T* output, const T* h0,
                                          const int64_t* lengths, bool reverse, AccT<T>* h_prev,
                                          cudaStream_t stream) {
  const int64_t n = T_ * B * P;
  if (n == 0) return cudaSuccess;
  return launch(lstm_variant_recurrent_inputs_kernel<T>, dim3(stride_blocks(n)), stream, T_, B, P,
                output, h0, lengths, reverse, h_prev);
}

#define FASTLSTM_INSTANTIATE_VARIANT(T)                                                            \
  template cudaError_t lstm_variant_forward_cell<T>(                                               \
      int, int, int, int64_t, const int64_t*, const AccT<T>*, const AccT<T>*, const T*,            \
      const VariantOptions<T>&, ZoneoutStep<AccT<T>>, ZoneoutStep<AccT<T>>, AccT<T>*, AccT<T>*,    \
      const AccT<T>*, AccT<T>*, T*, AccT<T>*, cudaStream_t);                                       \
  template cudaError_t lstm_variant_forward_output<T>(int, int, int64_t, const int64_t*,           \
                                                      const AccT<T>*, bool, ZoneoutStep<AccT<T>>,  \
                                                      const AccT<T>*, AccT<T>*, T*, cudaStream_t); \
  template cudaError_t lstm_variant_backward_output<T>(int, int, int64_t, const int64_t*,          \
                                                       const T*, bool, ZoneoutStep<AccT<T>>,       \
                                                       AccT<T>*, const AccT<T>*, AccT<T>*,         \
                                                       cudaStream_t);                              \
  template cudaError_t lstm_variant_backward_cell<T>(                                              \
      int, int, int, int64_t, const int64_t*, const AccT<T>*, const AccT<T>*, int64_t,             \
      const AccT<T>*, const VariantOptions<T>&, ZoneoutStep<AccT<T>>, ZoneoutStep<AccT<T>>,        \
      const AccT<T>*, const T*, AccT<T>*, const AccT<T>*, AccT<T>*, AccT<T>*, AccT<T>*, AccT<T>*,  \
      AccT<T>*, AccT<T>*, cudaStream_t);                                                           \
  template cudaError_t lstm_variant_column_sums<T>(int64_t, int, const AccT<T>*, int64_t,          \
                                                   const AccT<T>*, int64_t, AccT<T>*, T*,          \
                                                   cudaStream_t);                                  \
  template cudaError_t lstm_variant_add<T>(int64_t, const AccT<T>*, const AccT<T>*, T*,            \
                                           cudaStream_t);                                          \
  template cudaError_t lstm_variant_input<T>(int64_t, int, int, const T*, const int64_t*,          \
                                             AccT<T>*, cudaStream_t);                              \
  template cudaError_t lstm_variant_recurrent_inputs<T>(int64_t, int, int, const T*, const T*,     \
                                                        const int64_t*, bool, AccT<T>*,            \
                                                        cudaStream_t);
FASTLSTM_INSTANTIATE_VARIANT(double)
FASTLSTM_INSTANTIATE_VARIANT(float)
FASTLSTM_INSTANTIATE_VARIANT(__half)
FASTLSTM_INSTANTIATE_VARIANT(__nv_bfloat16)
#undef FASTLSTM_INSTANTIATE_VARIANT

}  // namespace cuda
}  // namespace fastlstm
