// hybridexit packed binary engine: bit-packed XNOR-popcount 3x3 convolutions for the binary edge half.
//
// Activations are packed along channels, 64 per word, in a zero-bordered (h + 2, w + 2, cw) buffer per image.
// For each output row, every input column's three taps (rows oy*s-1 .. oy*s+1) are packed tight into colw =
// ceil(3 cin / 64) words; three consecutive columns are then an output pixel's receptive field, read in place.
// Each output channel's sign(W) is a bit vector of the same layout (kx-major, then ky, then channel), stored
// transposed ([word][output channel]) so that one broadcast input word is xor-ed with 8 output channels at once.
// sum = n_valid - 2 * popcount(mismatches over valid taps) is the exact integer product of the +-1 values,
// with the zero padding of training (padded taps contribute 0). Epilogues: the per-channel scale, the folded
// BatchNorm + sign + pack of the next conv's input (conv 1 of a block), or scale + float residual add
// (+ the next block's BatchNorm + sign + pack) for conv 2. ISA chosen at run time (see bconv_isa.inc).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if __has_include("kbit.h")
#include "kbit.h"  // k-bit (2/4/8-bit) integer blocks: run_kblocks, kconv_int
#define HX_HAVE_KBIT 1
#else
#define HX_HAVE_KBIT 0
#endif

struct ConvJob {
  const uint64_t* in;  // (h + 2, w + 2, cwi) packed input with a zero border
  int h, w, cin, cwi, stride, ho, wo, cout;
  const uint64_t* wt;  // (kw, opad) transposed weight bit vectors
  int kw, opad;
  const int32_t* wpop;  // (9, cout) popcount of each tap's weight bits
  const float* alpha;   // (cout) per-output-channel scale
  const float* res;     // residual input (res_h, res_w, res_c) or null
  int res_w, res_c, res_pad, res_stride;
  const float* next_a;  // folded BatchNorm of the next conv (sign + pack) when out_packed
  const float* next_b;
  const float* next_t;  // RSign threshold of the next conv (sign(bn(y) - t)), or null (0)
  const float* rp_g;    // RPReLU after this conv (prelu_beta(y - gamma) + zeta), or null
  const float* rp_b;
  const float* rp_z;
  int32_t* out_int;     // exact integer sums (ho, wo, cout), or null
  float* out_float;     // float output (ho, wo, cout), or null
  uint64_t* out_packed; // (ho + 2, wo + 2, cwo) or null
  uint64_t* rf;         // scratch: (w + 2) * kw / 3 words (one row of 3-tap columns)
  int32_t* pops;        // scratch: opad
  float* y;             // scratch: cout floats
};

struct ExitHeadSpec {   // an exit head's float parameters (exits.ExitHead), BatchNorms folded
  const float* bn_a;   // (c) BatchNorm before the pool
  const float* bn_b;
  int pool;            // kernel = stride of the average pool, 0 = global
  int hidden;          // width of the hidden layer, 0 = none
  const float* w1;     // (hidden, d) hidden linear, no bias
  const float* h_a;    // (hidden) folded BatchNorm1d after it
  const float* h_b;
  const float* w2;     // (classes, d or hidden) final linear
  const float* b2;     // (classes)
  int classes;
};

namespace hx_isa3 {
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vpopcntdq,popcnt")
#define HX_ISA 3
#include "bconv_isa.inc"
#undef HX_ISA
#pragma GCC pop_options
}  // namespace hx_isa3

namespace hx_isa2 {
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,popcnt")
#define HX_ISA 2
#include "bconv_isa.inc"
#undef HX_ISA
#pragma GCC pop_options
}  // namespace hx_isa2

namespace hx_isa1 {
#pragma GCC push_options
#pragma GCC target("avx2,fma,popcnt")
#define HX_ISA 1
#include "bconv_isa.inc"
#undef HX_ISA
#pragma GCC pop_options
}  // namespace hx_isa1

namespace hx_isa0 {
#define HX_ISA 0
#include "bconv_isa.inc"
#undef HX_ISA
}  // namespace hx_isa0

namespace {

using ConvFn = void (*)(const ConvJob&);
using PackFn = void (*)(const float*, int, int, int, const float*, const float*, const float*, uint64_t*);
using NormFn = void (*)(const void*, bool, int, int, int, const float*, const float*, float*);
using StemFn = void (*)(const float*, int, int, int, const float*, int, float*);
using HeadFn = void (*)(const float*, int, int, int, const ExitHeadSpec&, float*, float*);

const char* kIsaNames[] = {"portable", "avx2", "avx512bw", "avx512vpopcntdq"};

int best_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq")) {
    return __builtin_cpu_supports("avx512vpopcntdq") ? 3 : 2;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("popcnt")) return 1;
  return 0;
}

int resolve_isa(int64_t requested) {
  const int best = best_isa();
  if (requested < 0) return best;
  TORCH_CHECK(requested <= best, "ISA level ", requested, " (", kIsaNames[requested < 4 ? requested : 3],
              ") is not supported by this CPU (best: ", kIsaNames[best], ")");
  return (int)requested;
}

#define HX_PER_ISA(fn) {hx_isa0::fn, hx_isa1::fn, hx_isa2::fn, hx_isa3::fn}
ConvFn conv_fn(int isa) { static const ConvFn f[] = HX_PER_ISA(conv_image); return f[isa]; }
PackFn pack_fn(int isa) { static const PackFn f[] = HX_PER_ISA(sign_pack_image); return f[isa]; }
NormFn norm_fn(int isa) { static const NormFn f[] = HX_PER_ISA(normalize_image); return f[isa]; }
StemFn stem_fn(int isa) { static const StemFn f[] = HX_PER_ISA(stem_image); return f[isa]; }
HeadFn head_fn(int isa) { static const HeadFn f[] = HX_PER_ISA(exit_head_image); return f[isa]; }

int words(int c) { return (c + 63) / 64; }
int out_size(int h, int stride) { return (h - 1) / stride + 1; }

// One binary conv layer's packed weights (built in Python by engines/packed.py, checked here).
struct Layer {
  torch::Tensor wt, wpop, alpha;
  int cin, cout, kw, opad;
};

Layer layer_from(const torch::Tensor& wt, const torch::Tensor& wpop, const torch::Tensor& alpha, int64_t cin) {
  TORCH_CHECK(wt.dtype() == torch::kInt64 && wt.dim() == 2 && wt.is_contiguous(), "weights: contiguous int64 (kw, opad)");
  TORCH_CHECK(wpop.dtype() == torch::kInt32 && wpop.dim() == 2 && wpop.size(0) == 9 && wpop.is_contiguous(),
              "weight popcounts: contiguous int32 (9, cout)");
  TORCH_CHECK(alpha.dtype() == torch::kFloat32 && alpha.is_contiguous() && alpha.numel() == wpop.size(1),
              "alpha: contiguous float32 (cout)");
  Layer l{wt, wpop, alpha, (int)cin, (int)wpop.size(1), (int)wt.size(0), (int)wt.size(1)};
  TORCH_CHECK(l.kw == 3 * words(3 * l.cin) && l.opad % 8 == 0 && l.opad >= l.cout, "weight words do not fit cin/cout");
  return l;
}

ConvJob job_for(const Layer& l, const uint64_t* in, int h, int w, int stride, uint64_t* rf, int32_t* pops, float* y) {
  ConvJob j{};
  j.in = in;
  j.h = h; j.w = w; j.cin = l.cin; j.cwi = words(l.cin); j.stride = stride;
  j.ho = out_size(h, stride); j.wo = out_size(w, stride); j.cout = l.cout;
  j.wt = reinterpret_cast<const uint64_t*>(l.wt.data_ptr<int64_t>());
  j.kw = l.kw; j.opad = l.opad;
  j.wpop = l.wpop.data_ptr<int32_t>();
  j.alpha = l.alpha.data_ptr<float>();
  j.rf = rf; j.pops = pops; j.y = y;
  return j;
}

void check_nhwc(const torch::Tensor& x, const char* what) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 4 && x.is_contiguous(), what,
              ": contiguous float32 (N, H, W, C) expected");
}

// A per-channel float vector of n values, or null when the tensor is empty (an option the network does not use).
const float* vec_or_null(const torch::Tensor& t, int64_t n, const char* what) {
  if (t.numel() == 0) return nullptr;
  TORCH_CHECK(t.dtype() == torch::kFloat32 && t.is_contiguous() && t.numel() == n, what, ": contiguous float32 (",
              n, ") or empty");
  return t.data_ptr<float>();
}

torch::Tensor sign_pack(torch::Tensor x, torch::Tensor a, torch::Tensor b, torch::Tensor t, int64_t isa) {
  // (N, H, W, C) float -> (N, H + 2, W + 2, cw) int64 packed bits of (x * a + b >= t), zero border (t empty: 0).
  check_nhwc(x, "sign_pack input");
  const int n = x.size(0), h = x.size(1), w = x.size(2), c = x.size(3), cw = words(c);
  TORCH_CHECK(a.numel() == c && b.numel() == c && a.is_contiguous() && b.is_contiguous(), "BatchNorm terms: (C) each");
  const float* tp = vec_or_null(t, c, "threshold");
  auto out = torch::zeros({n, h + 2, w + 2, cw}, torch::kInt64);
  const PackFn fn = pack_fn(resolve_isa(isa));
  for (int i = 0; i < n; ++i)
    fn(x.data_ptr<float>() + (size_t)i * h * w * c, h, w, c, a.data_ptr<float>(), b.data_ptr<float>(), tp,
       reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>()) + (size_t)i * (h + 2) * (w + 2) * cw);
  return out;
}

torch::Tensor conv_int(torch::Tensor packed, torch::Tensor wt, torch::Tensor wpop, int64_t cin, int64_t stride, int64_t isa) {
  // The exact integer sums of one binary conv: (N, Ho, Wo, cout) int32 (for tests and inspection).
  TORCH_CHECK(packed.dtype() == torch::kInt64 && packed.dim() == 4 && packed.is_contiguous() && packed.size(3) == words(cin),
              "packed input: contiguous int64 (N, H + 2, W + 2, cw)");
  Layer l = layer_from(wt, wpop, torch::ones({wpop.size(1)}, torch::kFloat32), cin);
  const int n = packed.size(0), h = packed.size(1) - 2, w = packed.size(2) - 2;
  const int ho = out_size(h, stride), wo = out_size(w, stride);
  auto out = torch::empty({n, ho, wo, l.cout}, torch::kInt32);
  const ConvFn fn = conv_fn(resolve_isa(isa));
  std::vector<uint64_t> rf((size_t)(w + 2) * l.kw / 3);
  std::vector<int32_t> pops(l.opad);
  std::vector<float> y(l.cout);
  for (int i = 0; i < n; ++i) {
    ConvJob j = job_for(l, reinterpret_cast<const uint64_t*>(packed.data_ptr<int64_t>()) + (size_t)i * (h + 2) * (w + 2) * words(cin),
                        h, w, (int)stride, rf.data(), pops.data(), y.data());
    j.out_int = out.data_ptr<int32_t>() + (size_t)i * ho * wo * l.cout;
    fn(j);
  }
  return out;
}

// A run of binary residual blocks. Per conv (CONV_TENSORS tensors, conv 1 then conv 2 of each block):
//   bn_a, bn_b (the folded BatchNorm before it), thr (RSign threshold, or empty), wt, wpop, alpha,
//   rp_g, rp_b, rp_z (RPReLU after it, or three empty tensors)
// and per block 3 integers (cin, cout, stride). Images are processed one at a time (run_image), channels last.
constexpr int CONV_TENSORS = 9;

struct ConvParams {
  Layer l;
  const float *bn_a, *bn_b, *thr, *rp_g, *rp_b, *rp_z;
};

struct Scratch {
  std::vector<uint64_t> pa, pb, rf;
  std::vector<float> fa, fb, y;
  std::vector<int32_t> pops;
};

struct BinaryRun {
  std::vector<ConvParams> c1, c2;
  std::vector<int> cin, cout, stride, hs, ws;
  int nb = 0, maxp = 0, maxf = 0, maxkw = 0, maxo = 0;
  ConvFn conv;
  PackFn pack;

  BinaryRun(const std::vector<torch::Tensor>& p, const std::vector<int64_t>& meta, int h, int w, int c, int isa) {
    nb = (int)meta.size() / 3;
    TORCH_CHECK(nb >= 1 && (int)meta.size() == 3 * nb && (int)p.size() == 2 * CONV_TENSORS * nb,
                "binary blocks: ", 2 * CONV_TENSORS, " tensors and 3 ints per block");
    conv = conv_fn(isa);
    pack = pack_fn(isa);
    hs.push_back(h); ws.push_back(w);
    for (int b = 0; b < nb; ++b) {
      const int ci = meta[3 * b], co = meta[3 * b + 1], s = meta[3 * b + 2];
      TORCH_CHECK(b > 0 || ci == c, "binary blocks: input has ", c, " channels, block 0 expects ", ci);
      TORCH_CHECK(co >= ci, "binary blocks: option-A shortcut needs cout >= cin");
      cin.push_back(ci); cout.push_back(co); stride.push_back(s);
      c1.push_back(conv_params(p, 2 * b, ci, co));
      c2.push_back(conv_params(p, 2 * b + 1, co, co));
      maxp = std::max({maxp, (h + 2) * (w + 2) * words(ci)});
      maxf = std::max(maxf, h * w * ci);
      const int h0 = h, w0 = w;
      h = out_size(h, s); w = out_size(w, s);
      hs.push_back(h); ws.push_back(w);
      maxp = std::max(maxp, (h + 2) * (w + 2) * words(co));
      maxf = std::max(maxf, h * w * co);
      maxkw = std::max({maxkw, (w0 + 2) * c1.back().l.kw / 3, (w + 2) * c2.back().l.kw / 3});
      maxo = std::max({maxo, c1.back().l.opad, c2.back().l.opad});
      (void)h0;
    }
  }

  static ConvParams conv_params(const std::vector<torch::Tensor>& p, int k, int ci, int co) {
    const torch::Tensor* t = &p[(size_t)k * CONV_TENSORS];
    Layer l = layer_from(t[3], t[4], t[5], ci);
    TORCH_CHECK(l.cout == co, "binary blocks: conv ", k, " weights do not match cout ", co);
    TORCH_CHECK(t[0].numel() == ci && t[1].numel() == ci && t[0].is_contiguous() && t[1].is_contiguous() &&
                t[0].dtype() == torch::kFloat32 && t[1].dtype() == torch::kFloat32, "conv ", k, ": BatchNorm terms (cin)");
    const float* g = vec_or_null(t[6], co, "RPReLU gamma");
    TORCH_CHECK((g == nullptr) == (t[7].numel() == 0) && (g == nullptr) == (t[8].numel() == 0),
                "RPReLU: gamma, beta, zeta all given or all empty");
    return {l, t[0].data_ptr<float>(), t[1].data_ptr<float>(), vec_or_null(t[2], ci, "RSign threshold"), g,
            vec_or_null(t[7], co, "RPReLU beta"), vec_or_null(t[8], co, "RPReLU zeta")};
  }

  int out_h() const { return hs.back(); }
  int out_w() const { return ws.back(); }
  int out_c() const { return cout.back(); }

  void scratch(Scratch& s) const {
    s.pa.assign(maxp, 0); s.pb.assign(maxp, 0); s.rf.assign(maxkw, 0);
    s.fa.assign(maxf, 0.f); s.fb.assign(maxf, 0.f); s.y.assign(maxo, 0.f); s.pops.assign(maxo, 0);
  }

  // One image: in (hs[0], ws[0], cin[0]) float -> out (out_h, out_w, out_c) float; in and out may not alias.
  void run_image(const float* in, float* out, Scratch& s) const {
    const float* cur = in;
    std::fill(s.pa.begin(), s.pa.end(), 0);
    pack(cur, hs[0], ws[0], cin[0], c1[0].bn_a, c1[0].bn_b, c1[0].thr, s.pa.data());
    for (int b = 0; b < nb; ++b) {
      // conv 1: input bits in pa; epilogue = scale, [RPReLU], BatchNorm 2, [RSign threshold], sign, pack into pb
      std::fill(s.pb.begin(), s.pb.end(), 0);
      ConvJob j1 = job_for(c1[b].l, s.pa.data(), hs[b], ws[b], stride[b], s.rf.data(), s.pops.data(), s.y.data());
      j1.out_packed = s.pb.data();
      j1.rp_g = c1[b].rp_g; j1.rp_b = c1[b].rp_b; j1.rp_z = c1[b].rp_z;
      j1.next_a = c2[b].bn_a; j1.next_b = c2[b].bn_b; j1.next_t = c2[b].thr;
      conv(j1);
      // conv 2: input bits in pb; epilogue = scale, [RPReLU], residual (float), next block's BatchNorm 1, sign, pack
      float* dst = b + 1 == nb ? out : (cur == s.fa.data() ? s.fb.data() : s.fa.data());
      ConvJob j2 = job_for(c2[b].l, s.pb.data(), hs[b + 1], ws[b + 1], 1, s.rf.data(), s.pops.data(), s.y.data());
      j2.rp_g = c2[b].rp_g; j2.rp_b = c2[b].rp_b; j2.rp_z = c2[b].rp_z;
      j2.res = cur; j2.res_w = ws[b]; j2.res_c = cin[b]; j2.res_pad = (cout[b] - cin[b]) / 2; j2.res_stride = stride[b];
      j2.out_float = dst;
      if (b + 1 < nb) {
        std::fill(s.pa.begin(), s.pa.end(), 0);
        j2.out_packed = s.pa.data();
        j2.next_a = c1[b + 1].bn_a; j2.next_b = c1[b + 1].bn_b; j2.next_t = c1[b + 1].thr;
      }
      conv(j2);
      cur = dst;
    }
  }
};

torch::Tensor run_blocks(torch::Tensor x, std::vector<torch::Tensor> p, std::vector<int64_t> meta, int64_t isa_req) {
  // Input and output: float (N, H, W, C), channels last.
  check_nhwc(x, "run_blocks input");
  const BinaryRun run(p, meta, x.size(1), x.size(2), x.size(3), resolve_isa(isa_req));
  const int n = x.size(0);
  auto out = torch::empty({n, run.out_h(), run.out_w(), run.out_c()}, torch::kFloat32);
  const float* xin = x.data_ptr<float>();
  float* xout = out.data_ptr<float>();
  const size_t in_img = (size_t)x.size(1) * x.size(2) * x.size(3), out_img = (size_t)run.out_h() * run.out_w() * run.out_c();
  at::parallel_for(0, n, 1, [&](int64_t lo, int64_t hi) {
    Scratch s;
    run.scratch(s);
    for (int64_t i = lo; i < hi; ++i) run.run_image(xin + i * in_img, xout + i * out_img, s);
  });
  return out;
}

// ---- The whole edge decision (Algorithm 1) in one call ----

torch::Tensor run_segment(int64_t kind, const torch::Tensor& h, const std::vector<torch::Tensor>& p,
                          const std::vector<int64_t>& meta, int isa, int64_t kisa) {
  if (kind == 0) return run_blocks(h, p, meta, isa);
#if HX_HAVE_KBIT
  if (kind == 1) return run_kblocks(h, p, meta, kisa);
#endif
  TORCH_CHECK(false, "edge blocks of kind ", kind, " are not built into these kernels");
}

ExitHeadSpec head_spec(const std::vector<torch::Tensor>& t, const std::vector<int64_t>& m, int c, int h, int w) {
  // t: bn_a, bn_b, w1, h_a, h_b, w2, b2 (w1, h_a, h_b empty without a hidden layer); m: pool kernel (0 = global), hidden
  TORCH_CHECK(t.size() == 7 && m.size() == 2, "exit head: 7 tensors and 2 ints");
  for (const auto& x : t) TORCH_CHECK(x.numel() == 0 || (x.dtype() == torch::kFloat32 && x.is_contiguous()),
                                      "exit head tensors: contiguous float32");
  ExitHeadSpec hd{};
  hd.pool = (int)m[0]; hd.hidden = (int)m[1];
  TORCH_CHECK(hd.pool == 0 || (hd.pool <= h && hd.pool <= w), "exit head: pool kernel larger than the features");
  const int p = hd.pool ? (h - hd.pool) / hd.pool + 1 : 1;
  TORCH_CHECK(hd.pool == 0 || h == w, "exit head: square features expected");
  const int64_t d = (int64_t)c * p * p;
  TORCH_CHECK(t[0].numel() == c && t[1].numel() == c, "exit head: BatchNorm terms (", c, ")");
  hd.bn_a = t[0].data_ptr<float>(); hd.bn_b = t[1].data_ptr<float>();
  int64_t din = d;
  if (hd.hidden) {
    TORCH_CHECK(t[2].numel() == hd.hidden * d && t[3].numel() == hd.hidden && t[4].numel() == hd.hidden,
                "exit head: hidden linear (", hd.hidden, ", ", d, ") and its BatchNorm terms");
    hd.w1 = t[2].data_ptr<float>(); hd.h_a = t[3].data_ptr<float>(); hd.h_b = t[4].data_ptr<float>();
    din = hd.hidden;
  }
  TORCH_CHECK(t[6].numel() >= 1 && t[5].numel() == t[6].numel() * din, "exit head: final linear (classes, ", din, ")");
  hd.w2 = t[5].data_ptr<float>(); hd.b2 = t[6].data_ptr<float>(); hd.classes = (int)t[6].numel();
  return hd;
}

float entropy_of(const float* logits, int k, float temperature, float* buf) {
  // Entropy of softmax(logits / T), natural log, as exits.entropy: log_softmax then -sum(p log p), in float.
  float mx = -INFINITY;
  for (int i = 0; i < k; ++i) {
    buf[i] = temperature == 1.0f ? logits[i] : logits[i] / temperature;
    mx = std::max(mx, buf[i]);
  }
  float s = 0.0f;
  for (int i = 0; i < k; ++i) s += std::exp(buf[i] - mx);
  const float ls = std::log(s);
  float e = 0.0f;
  for (int i = 0; i < k; ++i) {
    const float lp = buf[i] - mx - ls;
    e += std::exp(lp) * lp;
  }
  return -e;
}

std::vector<torch::Tensor> decide(torch::Tensor x, std::vector<torch::Tensor> prologue,
                                  std::vector<std::vector<torch::Tensor>> seg_params,
                                  std::vector<std::vector<int64_t>> seg_meta, std::vector<int64_t> seg_kind,
                                  std::vector<std::vector<torch::Tensor>> heads, std::vector<std::vector<int64_t>> head_meta,
                                  std::vector<double> thresholds, std::vector<double> temperatures, int64_t isa_req,
                                  int64_t kisa) {
  // x: (N, C, H, W) uint8 (raw) or float in [0, 1]; prologue: mean (C), std (C), stem weights (3, 3, C, C0).
  // Segment s < K: the run of blocks before exit s; segment K: the blocks after the last exit (meta may be empty).
  // Returns predictions (N) int64 (-1 where no exit was reached), decided_at (N) int64 (exit k or -1 = cloud),
  // entropies (N, K) float (NaN where not reached), features (R, H', W', C') float channels last of the R samples
  // that did not exit, and their indices (R) int64. isa_req: the binary blocks' and float parts' ISA level (best_isa
  // numbering), kisa: the k-bit blocks' (kbit_best_isa numbering); -1: the best here.
  const int isa = resolve_isa(isa_req);
  const int K = (int)heads.size();
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous() && (x.dtype() == torch::kUInt8 || x.dtype() == torch::kFloat32),
              "decide: contiguous (N, C, H, W) uint8 or float32 images");
  TORCH_CHECK((int)seg_params.size() == K + 1 && (int)seg_meta.size() == K + 1 && (int)seg_kind.size() == K + 1 &&
              (int)head_meta.size() == K && (int)thresholds.size() == K && (int)temperatures.size() == K,
              "decide: K heads, K + 1 segments, K thresholds and temperatures");
  TORCH_CHECK(prologue.size() == 3, "decide: prologue = mean, std, stem weights");
  const int n = x.size(0), c = x.size(1), H = x.size(2), W = x.size(3);
  const float* mean = vec_or_null(prologue[0], c, "mean");
  const float* stdv = vec_or_null(prologue[1], c, "std");
  const torch::Tensor& sw = prologue[2];
  TORCH_CHECK(mean && stdv && sw.dtype() == torch::kFloat32 && sw.is_contiguous() && sw.dim() == 4 && sw.size(0) == 3 &&
              sw.size(1) == 3 && sw.size(2) == c, "decide: stem weights (3, 3, C, C0) float32");
  const int c0 = sw.size(3);
  auto h = torch::empty({n, H, W, c0}, torch::kFloat32);
  {
    const NormFn norm = norm_fn(isa);
    const StemFn stem = stem_fn(isa);
    const bool u8 = x.dtype() == torch::kUInt8;
    const size_t in_img = (size_t)c * H * W, elt = u8 ? 1 : 4;
    const char* src = static_cast<const char*>(x.data_ptr());
    float* dst = h.data_ptr<float>();
    at::parallel_for(0, n, 1, [&](int64_t lo, int64_t hi) {
      std::vector<float> buf(in_img);
      for (int64_t i = lo; i < hi; ++i) {
        norm(src + i * in_img * elt, u8, c, H, W, mean, stdv, buf.data());
        stem(buf.data(), H, W, c, sw.data_ptr<float>(), c0, dst + i * (size_t)H * W * c0);
      }
    });
  }
  auto preds = torch::full({n}, -1, torch::kInt64);
  auto decided = torch::full({n}, -1, torch::kInt64);
  auto ents = torch::full({n, K}, NAN, torch::kFloat32);
  std::vector<int64_t> idx(n);
  for (int i = 0; i < n; ++i) idx[i] = i;
  const HeadFn headf = head_fn(isa);
  for (int k = 0; k < K && !idx.empty(); ++k) {
    h = run_segment(seg_kind[k], h, seg_params[k], seg_meta[k], isa, kisa);
    const int r = h.size(0), hh = h.size(1), ww = h.size(2), cc = h.size(3);
    const ExitHeadSpec hd = head_spec(heads[k], head_meta[k], cc, hh, ww);
    const size_t img = (size_t)hh * ww * cc;
    std::vector<uint8_t> stop(r);
    const float thr = (float)thresholds[k], temp = (float)temperatures[k];
    at::parallel_for(0, r, 1, [&](int64_t lo, int64_t hi) {
      std::vector<float> scratch((size_t)cc * hh * ww + hd.hidden + 1), logits(hd.classes), buf(hd.classes);
      for (int64_t i = lo; i < hi; ++i) {
        headf(h.data_ptr<float>() + i * img, hh, ww, cc, hd, scratch.data(), logits.data());
        const float e = entropy_of(logits.data(), hd.classes, temp, buf.data());
        const int64_t g = idx[i];
        ents.data_ptr<float>()[g * K + k] = e;
        preds.data_ptr<int64_t>()[g] = std::max_element(logits.begin(), logits.end()) - logits.begin();
        stop[i] = e < thr;  // the exit rule (exits.exit_rule): strictly below the threshold
        if (stop[i]) decided.data_ptr<int64_t>()[g] = k;
      }
    });
    int kept = 0;
    for (int i = 0; i < r; ++i) kept += !stop[i];
    if (kept == r) continue;
    auto nh = torch::empty({kept, hh, ww, cc}, torch::kFloat32);
    std::vector<int64_t> nidx;
    nidx.reserve(kept);
    for (int i = 0; i < r; ++i)
      if (!stop[i]) {
        std::memcpy(nh.data_ptr<float>() + nidx.size() * img, h.data_ptr<float>() + i * img, img * sizeof(float));
        nidx.push_back(idx[i]);
      }
    h = nh;
    idx.swap(nidx);
  }
  if (!idx.empty() && !seg_meta[K].empty()) h = run_segment(seg_kind[K], h, seg_params[K], seg_meta[K], isa, kisa);
  if (idx.empty()) h = h.narrow(0, 0, 0);
  auto rem = torch::empty({(int64_t)idx.size()}, torch::kInt64);
  std::copy(idx.begin(), idx.end(), rem.data_ptr<int64_t>());
  return {preds, decided, ents, h, rem};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hybridexit bit-packed binary convolution kernels and the native edge decision";
  m.def("sign_pack", &sign_pack, "pack sign(x * a + b - t) along channels, zero border");
  m.def("conv_int", &conv_int, "exact integer sums of a packed binary 3x3 conv (padding 1)");
  m.def("run_blocks", &run_blocks, "a run of binary residual blocks, fused epilogues");
  m.def("decide", &decide, "the whole edge decision: normalization, stem, blocks, exit heads, entropy, exit rule");
  m.def("best_isa", &best_isa, "best ISA level on this CPU: 0 portable, 1 avx2, 2 avx512bw, 3 avx512vpopcntdq");
  m.def("isa_name", [](int64_t i) { return std::string(kIsaNames[i]); });
#if HX_HAVE_KBIT
  m.def("run_kblocks", &run_kblocks, "a run of k-bit (2/4-bit) residual blocks, int8 dot products, fused epilogues");
  m.def("kconv_int", &kconv_int, "exact integer sums of a k-bit 3x3 conv (padding 1)");
  m.def("kconv_bitserial_int", &kconv_bitserial_int, "the same sums by bit-serial popcount (for measurement)");
  m.def("kbit_best_isa", &kbit_best_isa, "best k-bit ISA level: 0 portable, 1 avx2, 2 avx512bw, 3 avx512vnni");
#endif
}
