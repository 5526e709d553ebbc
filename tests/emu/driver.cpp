// Runs the CUDA layer code (csrc/kernels/lstm_host.h and the kernels it launches) under the emulator
// on tensors written by tests/test_emulator.py, and writes the results back.
//
//   driver forward IN OUT     IN holds sizes [T, B, I, H, P], flags [reverse, training, dtype,
//                             max_xg_elements], x, h0, c0, w_ih, w_hh, optional bias (b_ih + b_hh),
//                             w_hr, lengths, misalign; OUT gets output, h_n, c_n (rounded to the
//                             dtype), c_n_acc (the cell type), gates, cells, hidden and xg (all
//                             steps) when training, and buffers: the element counts forward_buffers
//                             asked for (xg, chunk, h_state, c_state, output, gates, cells, hidden)
//   driver backward IN OUT    IN adds grad_output, grad_h_n, grad_c_n, output, gates, cells, hidden;
//                             OUT gets grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh,
//                             grad_bias, grad_w_hr, and the workspaces dG and dh_all
//   driver variant_forward IN OUT   the variant layer (csrc/kernels/lstm_variant_host.h): IN as for
//                             forward (bias without b_ih's and b_hh's own: their sum) and variant
//                             (float64 [zoneout_c_p, zoneout_h_p, has_clip, cell_clip]), optional
//                             zoneout_c, zoneout_h (masks in the cell type), ln_ih, ln_hh,
//                             ln_c_weight, ln_c_bias; OUT gets output, h_n, c_n_acc, saved (every
//                             step when training, else the last step's scratch rows) and buffers
//   driver variant_backward IN OUT  IN adds grad_output, grad_h_n, grad_c_n, output, saved; OUT gets
//                             grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias,
//                             grad_w_hr, grad_ln_ih, grad_ln_hh, grad_ln_c_weight, grad_ln_c_bias
//                             and the workspaces dpre and dxg (the cell type)
//
// misalign (optional, int64 n): every input tensor of the dtype starts n elements past a 16-byte
// boundary, as a view into a larger tensor may (the kernels must then not use 16-byte loads on it).
//   driver selftest           checks the emulator itself (grid barrier, shuffles, launch limits)
//
// File format: records of name '\0', uint64 byte count, bytes. Every buffer the layer code uses is
// a separate allocation of exactly its size, filled with NaN bytes where the code must write it
// before reading, so that AddressSanitizer sees overruns and unwritten reads show up as NaN.
#include <cstdio>
#include <cstdlib>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/lstm_host.h"
#include "kernels/lstm_variant_host.h"

namespace {

using fastlstm::cuda::AccT;

[[noreturn]] void die(const std::string& msg) {
  std::fprintf(stderr, "driver: %s\n", msg.c_str());
  std::exit(2);
}

// An exact-size heap buffer.
// With `offset`, the n bytes start that many bytes into the allocation (which ends with them).
struct Buf {
  void* p = nullptr;
  std::size_t n = 0;
  std::size_t offset = 0;
  Buf() = default;
  explicit Buf(std::size_t bytes, int fill = 0xff, std::size_t offset_ = 0) : n(bytes), offset(offset_) {
    p = bytes ? std::malloc(bytes + offset) : nullptr;
    if (bytes && !p) die("out of memory");
    if (bytes) std::memset(p, fill, bytes + offset);
  }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  Buf(Buf&& o) noexcept : p(o.p), n(o.n), offset(o.offset) { o.p = nullptr, o.n = 0, o.offset = 0; }
  Buf& operator=(Buf&& o) noexcept {
    std::swap(p, o.p);
    std::swap(n, o.n);
    std::swap(offset, o.offset);
    return *this;
  }
  ~Buf() { std::free(p); }
  template <typename T>
  T* as() const {
    return p ? reinterpret_cast<T*>(static_cast<char*>(p) + offset) : nullptr;
  }
};

std::map<std::string, Buf> read_file(const char* path) {
  std::FILE* f = std::fopen(path, "rb");
  if (!f) die(std::string("cannot open ") + path);
  std::map<std::string, Buf> out;
  for (;;) {
    std::string name;
    int c;
    while ((c = std::fgetc(f)) > 0) name.push_back(static_cast<char>(c));
    if (c == EOF) break;
    uint64_t n;
    if (std::fread(&n, 8, 1, f) != 1) die("truncated input");
    Buf b(n);
    if (n && std::fread(b.p, 1, n, f) != n) die("truncated input");
    out[name] = std::move(b);
  }
  std::fclose(f);
  return out;
}

struct Writer {
  std::FILE* f;
  explicit Writer(const char* path) : f(std::fopen(path, "wb")) {
    if (!f) die(std::string("cannot write ") + path);
  }
  ~Writer() { std::fclose(f); }
  void put(const char* name, const void* p, std::size_t n) {
    std::fwrite(name, 1, std::strlen(name) + 1, f);
    const uint64_t n64 = n;
    std::fwrite(&n64, 8, 1, f);
    if (n) std::fwrite(p, 1, n, f);
  }
};

template <typename T>
double to_double(T x) {
  return static_cast<double>(x);
}
template <>
double to_double(__half x) {
  return __half2float(x);
}
template <>
double to_double(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <typename T>
T from_double(double x) {
  return static_cast<T>(x);
}
template <>
__half from_double(double x) {
  return __float2half_rn(static_cast<float>(x));
}
template <>
__nv_bfloat16 from_double(double x) {
  return __float2bfloat16_rn(static_cast<float>(x));
}

// The GEMMs on the CPU, summed in double.
template <typename T>
class CpuMath final : public fastlstm::cuda::DeviceMath<T> {
 public:
  void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const T* a, const T* b,
            const T* bias, T* c) override {
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t n = 0; n < N; ++n) {
        double s = bias ? to_double(bias[n]) : 0.0;
        for (int64_t k = 0; k < K; ++k) {
          const double av = to_double(trans_a ? a[k * M + m] : a[m * K + k]);
          const double bv = to_double(trans_b ? b[n * K + k] : b[k * N + n]);
          s += av * bv;
        }
        c[m * N + n] = from_double<T>(s);
      }
    }
  }
  void column_sums(int64_t M, int64_t N, const T* a, T* out) override {
    for (int64_t n = 0; n < N; ++n) {
      double s = 0;
      for (int64_t m = 0; m < M; ++m) s += to_double(a[m * N + n]);
      out[n] = from_double<T>(s);
    }
  }
};

struct Input {
  std::map<std::string, Buf> m;
  const Buf& need(const std::string& name) const {
    auto it = m.find(name);
    if (it == m.end()) die("missing input " + name);
    return it->second;
  }
  template <typename T>
  const T* ptr(const std::string& name) const {
    auto it = m.find(name);
    return it == m.end() ? nullptr : it->second.as<T>();
  }
};

// A copy of a T buffer in the cell type (exact size).
template <typename T>
Buf to_acc(const Buf& src) {
  const std::size_t n = src.n / sizeof(T);
  Buf out(n * sizeof(AccT<T>));
  for (std::size_t i = 0; i < n; ++i) {
    out.as<AccT<T>>()[i] = static_cast<AccT<T>>(to_double(src.as<T>()[i]));
  }
  return out;
}
template <typename T>
std::vector<T> from_acc(const AccT<T>* p, std::size_t n) {
  std::vector<T> out(n);
  for (std::size_t i = 0; i < n; ++i) out[i] = from_double<T>(p[i]);
  return out;
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) die(std::string(what) + ": " + cudaGetErrorString(err));
}

template <typename T>
void forward(const Input& in, const int64_t* sz, const int64_t* flags, Writer& out) {
  using Acc = AccT<T>;
  const fastlstm::cuda::LayerShape s{sz[0], sz[1], sz[2], sz[3], sz[4], in.m.count("w_hr") > 0};
  const bool training = flags[1] != 0;
  const fastlstm::cuda::ForwardBuffers nb =
      flags[3] > 0 ? fastlstm::cuda::forward_buffers(s, training, flags[3])
                   : fastlstm::cuda::forward_buffers(s, training);
  Buf xg(nb.xg * sizeof(T)), h_state(nb.h_state * sizeof(T)), output(nb.output * sizeof(T));
  Buf gates(nb.gates * sizeof(T)), cells(nb.cells * sizeof(Acc)), hidden(nb.hidden * sizeof(T));
  std::memcpy(h_state.p, in.need("h0").as<char>(), s.B * s.P * sizeof(T));
  Buf c_state = to_acc<T>(in.need("c0"));
  if (c_state.n != static_cast<std::size_t>(nb.c_state) * sizeof(Acc)) die("c0 has the wrong size");
  fastlstm::cuda::ForwardArgs<T> a{};
  a.x = in.ptr<T>("x");
  a.w_ih = in.ptr<T>("w_ih");
  a.bias = in.ptr<T>("bias");
  a.w_hh = in.ptr<T>("w_hh");
  a.w_hr = in.ptr<T>("w_hr");
  a.lengths = in.ptr<int64_t>("lengths");
  a.reverse = flags[0] != 0;
  a.xg = xg.as<T>();
  a.h_state = h_state.as<T>();
  a.c_state = c_state.as<Acc>();
  a.output = output.as<T>();
  a.gates = gates.as<T>();
  a.cells = cells.as<Acc>();
  a.hidden = hidden.as<T>();
  CpuMath<T> math;
  T* h_n = nullptr;
  check(fastlstm::cuda::lstm_layer_forward<T>(s, nb, a, math, nullptr, &h_n), "forward");
  const int64_t sizes[] = {nb.xg,     nb.chunk, nb.h_state, nb.c_state,
                           nb.output, nb.gates, nb.cells,   nb.hidden};
  out.put("buffers", sizes, sizeof sizes);
  out.put("output", output.p, output.n);
  out.put("h_n", h_n, s.B * s.P * sizeof(T));
  const std::vector<T> c_n = from_acc<T>(c_state.as<Acc>(), s.B * s.H);
  out.put("c_n", c_n.data(), c_n.size() * sizeof(T));
  out.put("c_n_acc", c_state.p, c_state.n);
  if (training) {
    out.put("gates", gates.p, gates.n);
    out.put("cells", cells.p, cells.n);
    if (s.has_proj) out.put("hidden", hidden.p, hidden.n);
    out.put("xg", xg.p, xg.n);  // training projects all steps at once: the kernels' xg input
  }
}

template <typename T>
void backward(const Input& in, const int64_t* sz, const int64_t* flags, Writer& out) {
  using Acc = AccT<T>;
  const fastlstm::cuda::LayerShape s{sz[0], sz[1], sz[2], sz[3], sz[4], in.m.count("w_hr") > 0};
  const fastlstm::cuda::BackwardBuffers nb = fastlstm::cuda::backward_buffers(s);
  Buf dG(nb.dG * sizeof(T)), dh_all(nb.dh_all * sizeof(T)), h_prev(nb.h_prev * sizeof(T));
  Buf dh_state = to_acc<T>(in.need("grad_h_n")), dc_state = to_acc<T>(in.need("grad_c_n"));
  const Buf c0 = to_acc<T>(in.need("c0"));
  const int64_t T_ = s.T, B = s.B, I = s.I, H = s.H, P = s.P;
  Buf grad_input(T_ * B * I * sizeof(T)), grad_h0(B * P * sizeof(T)), grad_w_ih(4 * H * I * sizeof(T));
  Buf grad_w_hh(4 * H * P * sizeof(T)), grad_bias(4 * H * sizeof(T));
  Buf grad_w_hr(s.has_proj ? P * H * sizeof(T) : 0);
  fastlstm::cuda::BackwardArgs<T> a{};
  a.grad_output = in.ptr<T>("grad_output");
  a.x = in.ptr<T>("x");
  a.h0 = in.ptr<T>("h0");
  a.c0 = c0.as<Acc>();
  a.w_ih = in.ptr<T>("w_ih");
  a.w_hh = in.ptr<T>("w_hh");
  a.w_hr = in.ptr<T>("w_hr");
  a.lengths = in.ptr<int64_t>("lengths");
  a.reverse = flags[0] != 0;
  a.output = in.ptr<T>("output");
  a.gates = in.ptr<T>("gates");
  a.cells = in.ptr<Acc>("cells");
  a.hidden = in.ptr<T>("hidden");
  a.dh_state = dh_state.as<Acc>();
  a.dc_state = dc_state.as<Acc>();
  a.dG = dG.as<T>();
  a.dh_all = dh_all.as<T>();
  a.h_prev = h_prev.as<T>();
  a.grad_input = grad_input.as<T>();
  a.grad_h0 = grad_h0.as<T>();
  a.grad_w_ih = grad_w_ih.as<T>();
  a.grad_w_hh = grad_w_hh.as<T>();
  a.grad_bias = grad_bias.as<T>();
  a.grad_w_hr = grad_w_hr.as<T>();
  CpuMath<T> math;
  check(fastlstm::cuda::lstm_layer_backward<T>(s, a, math, nullptr), "backward");
  out.put("grad_input", grad_input.p, grad_input.n);
  out.put("grad_h0", grad_h0.p, grad_h0.n);
  const std::vector<T> grad_c0 = from_acc<T>(dc_state.as<Acc>(), B * H);
  out.put("grad_c0", grad_c0.data(), grad_c0.size() * sizeof(T));
  out.put("grad_w_ih", grad_w_ih.p, grad_w_ih.n);
  out.put("grad_w_hh", grad_w_hh.p, grad_w_hh.n);
  out.put("grad_bias", grad_bias.p, grad_bias.n);
  if (s.has_proj) out.put("grad_w_hr", grad_w_hr.p, grad_w_hr.n);
  out.put("dG", dG.p, dG.n);
  out.put("dh_all", dh_all.p, dh_all.n);
}

// The variant layer's options from IN (tensors of T and Acc as the driver received them).
template <typename T>
fastlstm::cuda::VariantOptions<T> variant_options(const Input& in) {
  const Buf& v = in.need("variant");
  if (v.n != 4 * 8) die("variant must be 4 float64");
  const double* d = v.as<double>();
  fastlstm::cuda::VariantOptions<T> o;
  o.zoneout_c = in.ptr<AccT<T>>("zoneout_c");
  o.zoneout_h = in.ptr<AccT<T>>("zoneout_h");
  o.zoneout_c_p = d[0];
  o.zoneout_h_p = d[1];
  o.has_clip = d[2] != 0;
  o.cell_clip = d[3];
  o.ln_ih = in.ptr<T>("ln_ih");
  o.ln_hh = in.ptr<T>("ln_hh");
  o.ln_c_weight = in.ptr<T>("ln_c_weight");
  o.ln_c_bias = in.ptr<T>("ln_c_bias");
  return o;
}

template <typename T>
void variant_forward(const Input& in, const int64_t* sz, const int64_t* flags, Writer& out) {
  using Acc = AccT<T>;
  const fastlstm::cuda::VariantOptions<T> opt = variant_options<T>(in);
  const fastlstm::cuda::VariantShape s{sz[0], sz[1], sz[2], sz[3], sz[4], in.m.count("w_hr") > 0,
                                       opt.layer_norm()};
  const bool training = flags[1] != 0;
  const fastlstm::cuda::VariantForwardBuffers nb =
      flags[3] > 0 ? fastlstm::cuda::variant_forward_buffers(s, training, flags[3])
                   : fastlstm::cuda::variant_forward_buffers(s, training);
  Buf x_acc(nb.x * sizeof(Acc)), xg(nb.xg * sizeof(Acc)), output(nb.output * sizeof(T));
  Buf rec(nb.rec * sizeof(Acc));
  Buf h_state(nb.h_state * sizeof(Acc)), m(nb.m * sizeof(Acc)), h_cand(nb.h_cand * sizeof(Acc));
  Buf saved(nb.saved * sizeof(Acc));
  const Buf h0 = to_acc<T>(in.need("h0"));
  std::memcpy(h_state.p, h0.p, h0.n);
  Buf c_state = to_acc<T>(in.need("c0"));
  if (c_state.n != static_cast<std::size_t>(nb.c_state) * sizeof(Acc)) die("c0 has the wrong size");
  const Buf w_ih = to_acc<T>(in.need("w_ih"));
  const Buf w_hh = to_acc<T>(in.need("w_hh"));
  const Buf w_hr = s.has_proj ? to_acc<T>(in.need("w_hr")) : Buf();
  fastlstm::cuda::VariantForwardArgs<T> a{};
  a.x = in.ptr<T>("x");
  a.w_ih = w_ih.as<Acc>();
  a.bias = in.ptr<T>("bias");
  a.w_hh = w_hh.as<Acc>();
  a.w_hr = w_hr.as<Acc>();
  a.lengths = in.ptr<int64_t>("lengths");
  a.reverse = flags[0] != 0;
  a.training = training;
  a.opt = opt;
  a.x_acc = x_acc.as<Acc>();
  a.xg = xg.as<Acc>();
  a.h_state = h_state.as<Acc>();
  a.c_state = c_state.as<Acc>();
  a.rec = rec.as<Acc>();
  a.m = m.as<Acc>();
  a.h_cand = h_cand.as<Acc>();
  a.output = output.as<T>();
  a.saved = saved.as<Acc>();
  CpuMath<Acc> math;
  Acc* h_n = nullptr;
  check(fastlstm::cuda::lstm_variant_layer_forward<T>(s, nb, a, math, nullptr, &h_n),
        "variant forward");
  const int64_t sizes[] = {nb.x, nb.xg, nb.chunk, nb.h_state, nb.c_state, nb.rec,
                           nb.m, nb.h_cand, nb.output, nb.saved};
  out.put("buffers", sizes, sizeof sizes);
  out.put("output", output.p, output.n);
  const std::vector<T> h_n_t = from_acc<T>(h_n, s.B * s.P);
  out.put("h_n", h_n_t.data(), h_n_t.size() * sizeof(T));
  out.put("c_n_acc", c_state.p, c_state.n);
  out.put("saved", saved.p, saved.n);
}

template <typename T>
void variant_backward(const Input& in, const int64_t* sz, const int64_t* flags, Writer& out) {
  using Acc = AccT<T>;
  const fastlstm::cuda::VariantOptions<T> opt = variant_options<T>(in);
  const fastlstm::cuda::VariantShape s{sz[0], sz[1], sz[2], sz[3], sz[4], in.m.count("w_hr") > 0,
                                       opt.layer_norm()};
  const fastlstm::cuda::VariantBackwardBuffers nb = fastlstm::cuda::variant_backward_buffers(s);
  const int64_t T_ = s.T, B = s.B, I = s.I, H = s.H, P = s.P;
  Buf dpre(nb.dpre * sizeof(Acc)), dxg(nb.dxg * sizeof(Acc)), dr(nb.dr * sizeof(Acc));
  Buf dz(nb.dz * sizeof(Acc)), dh_cand(nb.dh_cand * sizeof(Acc)), dm(nb.dm * sizeof(Acc));
  Buf m(nb.m * sizeof(Acc)), dh_rec(nb.dh_rec * sizeof(Acc)), x_acc(nb.x * sizeof(Acc));
  Buf h_prev(nb.h_prev * sizeof(Acc)), partial(nb.partial * sizeof(Acc));
  Buf result(nb.result * sizeof(Acc));
  Buf dh_keep = to_acc<T>(in.need("grad_h_n")), dc_state = to_acc<T>(in.need("grad_c_n"));
  if (dh_keep.n != static_cast<std::size_t>(nb.dh_keep) * sizeof(Acc)) die("grad_h_n has the wrong size");
  const Buf c0 = to_acc<T>(in.need("c0"));
  const Buf w_ih = to_acc<T>(in.need("w_ih"));
  const Buf w_hh = to_acc<T>(in.need("w_hh"));
  const Buf w_hr = s.has_proj ? to_acc<T>(in.need("w_hr")) : Buf();
  Buf grad_input(T_ * B * I * sizeof(T)), grad_h0(B * P * sizeof(T)), grad_w_ih(4 * H * I * sizeof(T));
  Buf grad_w_hh(4 * H * P * sizeof(T)), grad_bias(4 * H * sizeof(T));
  Buf grad_w_hr(s.has_proj ? P * H * sizeof(T) : 0);
  const bool ln = s.layer_norm;
  Buf grad_ln_ih(ln ? 4 * H * sizeof(T) : 0), grad_ln_hh(ln ? 4 * H * sizeof(T) : 0);
  Buf grad_ln_c_weight(ln ? H * sizeof(T) : 0), grad_ln_c_bias(ln ? H * sizeof(T) : 0);
  fastlstm::cuda::VariantBackwardArgs<T> a{};
  a.grad_output = in.ptr<T>("grad_output");
  a.x = in.ptr<T>("x");
  a.h0 = in.ptr<T>("h0");
  a.c0 = c0.as<Acc>();
  a.w_ih = w_ih.as<Acc>();
  a.w_hh = w_hh.as<Acc>();
  a.w_hr = w_hr.as<Acc>();
  a.lengths = in.ptr<int64_t>("lengths");
  a.reverse = flags[0] != 0;
  a.opt = opt;
  a.output = in.ptr<T>("output");
  a.saved = in.ptr<Acc>("saved");
  a.dpre = dpre.as<Acc>();
  a.dxg = dxg.as<Acc>();
  a.dr = dr.as<Acc>();
  a.dz = dz.as<Acc>();
  a.dh_cand = dh_cand.as<Acc>();
  a.dm = dm.as<Acc>();
  a.m = m.as<Acc>();
  a.dh_keep = dh_keep.as<Acc>();
  a.dh_rec = dh_rec.as<Acc>();
  a.dc_state = dc_state.as<Acc>();
  a.x_acc = x_acc.as<Acc>();
  a.h_prev = h_prev.as<Acc>();
  a.partial = partial.as<Acc>();
  a.result = result.as<Acc>();
  a.grad_input = grad_input.as<T>();
  a.grad_h0 = grad_h0.as<T>();
  a.grad_w_ih = grad_w_ih.as<T>();
  a.grad_w_hh = grad_w_hh.as<T>();
  a.grad_bias = grad_bias.as<T>();
  a.grad_w_hr = grad_w_hr.as<T>();
  a.grad_ln_ih = grad_ln_ih.as<T>();
  a.grad_ln_hh = grad_ln_hh.as<T>();
  a.grad_ln_c_weight = grad_ln_c_weight.as<T>();
  a.grad_ln_c_bias = grad_ln_c_bias.as<T>();
  CpuMath<Acc> math;
  check(fastlstm::cuda::lstm_variant_layer_backward<T>(s, a, math, nullptr), "variant backward");
  out.put("grad_input", grad_input.p, grad_input.n);
  out.put("grad_h0", grad_h0.p, grad_h0.n);
  out.put("grad_c0_acc", dc_state.p, dc_state.n);
  out.put("grad_w_ih", grad_w_ih.p, grad_w_ih.n);
  out.put("grad_w_hh", grad_w_hh.p, grad_w_hh.n);
  out.put("grad_bias", grad_bias.p, grad_bias.n);
  if (s.has_proj) out.put("grad_w_hr", grad_w_hr.p, grad_w_hr.n);
  if (ln) {
    out.put("grad_ln_ih", grad_ln_ih.p, grad_ln_ih.n);
    out.put("grad_ln_hh", grad_ln_hh.p, grad_ln_hh.n);
    out.put("grad_ln_c_weight", grad_ln_c_weight.p, grad_ln_c_weight.n);
    out.put("grad_ln_c_bias", grad_ln_c_bias.p, grad_ln_c_bias.n);
  }
  out.put("dpre", dpre.p, dpre.n);
  out.put("dxg", (ln ? dxg : dpre).p, (ln ? dxg : dpre).n);
}

// Moves every input of the dtype `elements` elements past the start of a fresh allocation.
void misalign(Input& in, int64_t elements, int64_t dtype_code) {
  const std::size_t elem = dtype_code == 0 ? 8 : dtype_code == 1 ? 4 : 2;
  for (const char* name : {"x", "h0", "w_ih", "w_hh", "bias", "w_hr", "grad_output", "output",
                           "gates", "hidden"}) {
    auto it = in.m.find(name);
    if (it == in.m.end()) continue;
    Buf moved(it->second.n, 0xff, elements * elem);
    std::memcpy(moved.as<char>(), it->second.as<char>(), it->second.n);
    it->second = std::move(moved);
  }
}

template <typename F>
void with_dtype(int64_t code, F&& f) {
  switch (code) {
    case 0: return f(double{});
    case 1: return f(float{});
    case 2: return f(__half{});
    case 3: return f(__nv_bfloat16{});
  }
  die("unknown dtype code " + std::to_string(code));
}

int selftest();

}  // namespace

int main(int argc, char** argv) {
  if (argc == 2 && std::string(argv[1]) == "selftest") return selftest();
  if (argc != 4) die("usage: driver forward|backward|variant_forward|variant_backward IN OUT | driver selftest");
  const std::string mode = argv[1];
  Input in{read_file(argv[2])};
  const Buf& sizes = in.need("sizes");
  const Buf& flags = in.need("flags");
  if (sizes.n != 5 * 8 || flags.n != 4 * 8) die("sizes must be 5 and flags 4 int64");
  if (const int64_t* mis = in.ptr<int64_t>("misalign")) misalign(in, *mis, flags.as<int64_t>()[2]);
  Writer out(argv[3]);
  with_dtype(flags.as<int64_t>()[2], [&](auto tag) {
    using T = decltype(tag);
    if (mode == "forward") {
      forward<T>(in, sizes.as<int64_t>(), flags.as<int64_t>(), out);
    } else if (mode == "backward") {
      backward<T>(in, sizes.as<int64_t>(), flags.as<int64_t>(), out);
    } else if (mode == "variant_forward") {
      variant_forward<T>(in, sizes.as<int64_t>(), flags.as<int64_t>(), out);
    } else if (mode == "variant_backward") {
      variant_backward<T>(in, sizes.as<int64_t>(), flags.as<int64_t>(), out);
    } else {
      die("unknown mode " + mode);
    }
  });
  return 0;
}

// ---- The emulator's own checks: pieces the LSTM kernels do not use yet. ----
namespace {

__global__ void grid_sum_kernel(int n, const int* in, int* partial, int* total) {
  const int b = blockIdx.x;
  if (threadIdx.x == 0) {
    int s = 0;
    for (int i = b; i < n; i += gridDim.x) s += in[i];
    partial[b] = s;
  }
  fastlstm_emu::grid_sync();
  // Every block reads all partial sums: wrong unless every block passed the grid barrier.
  if (threadIdx.x == 0) {
    int s = 0;
    for (unsigned i = 0; i < gridDim.x; ++i) s += partial[i];
    total[b] = s;
  }
}

__global__ void rotate_kernel(int* out) {
  const int lane = threadIdx.x % 32;
  out[threadIdx.x] = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x), (lane + 1) % 32);
}

__global__ void noop_kernel() {}

int selftest() {
  int failures = 0;
  auto expect = [&](bool ok, const char* what) {
    std::printf("%s: %s\n", ok ? "ok" : "FAILED", what);
    failures += !ok;
  };
  {
    const int n = 1000, blocks = 8;
    std::vector<int> in(n), partial(blocks, -1), total(blocks, -1);
    int want = 0;
    for (int i = 0; i < n; ++i) want += in[i] = i % 7;
    expect(fastlstm_emu::launch_cooperative(grid_sum_kernel, dim3(blocks), dim3(64), nullptr, n,
                                            in.data(), partial.data(), total.data()) == cudaSuccess,
           "cooperative launch");
    bool ok = true;
    for (int b = 0; b < blocks; ++b) ok &= total[b] == want;
    expect(ok, "grid_sync: every block sees every block's partial sum");
    expect(fastlstm_emu::launch_cooperative(grid_sum_kernel, dim3(1000), dim3(64), nullptr, n,
                                            in.data(), partial.data(), total.data()) ==
               cudaErrorCooperativeLaunchTooLarge,
           "cooperative launch with more blocks than can be resident is refused");
  }
  {
    std::vector<int> out(64, -1);
    expect(fastlstm_emu::launch(rotate_kernel, dim3(1), dim3(64), nullptr, out.data()) == cudaSuccess,
           "shuffle launch");
    bool ok = true;
    for (int t = 0; t < 64; ++t) ok &= out[t] == (t / 32) * 32 + (t % 32 + 1) % 32;
    expect(ok, "__shfl_sync rotates within each warp");
  }
  expect(fastlstm_emu::launch(noop_kernel, dim3(1), dim3(1025), nullptr) ==
             cudaErrorInvalidConfiguration,
         "1025 threads per block are refused");
  expect(fastlstm_emu::launch(noop_kernel, dim3(1, 65536), dim3(32), nullptr) ==
             cudaErrorInvalidConfiguration,
         "gridDim.y above 65535 is refused");
  return failures == 0 ? 0 : 1;
}

}  // namespace
