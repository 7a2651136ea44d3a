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
  int32_t* out_int;     // exact integer sums (ho, wo, cout), or null
  float* out_float;     // float output (ho, wo, cout), or null
  uint64_t* out_packed; // (ho + 2, wo + 2, cwo) or null
  uint64_t* rf;         // scratch: (w + 2) * kw / 3 words (one row of 3-tap columns)
  int32_t* pops;        // scratch: opad
  float* y;             // scratch: cout floats
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
using PackFn = void (*)(const float*, int, int, int, const float*, const float*, uint64_t*);

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

ConvFn conv_fn(int isa) {
  static const ConvFn fns[] = {hx_isa0::conv_image, hx_isa1::conv_image, hx_isa2::conv_image, hx_isa3::conv_image};
  return fns[isa];
}

PackFn pack_fn(int isa) {
  static const PackFn fns[] = {hx_isa0::sign_pack_image, hx_isa1::sign_pack_image, hx_isa2::sign_pack_image,
                               hx_isa3::sign_pack_image};
  return fns[isa];
}

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

torch::Tensor sign_pack(torch::Tensor x, torch::Tensor a, torch::Tensor b, int64_t isa) {
  // (N, H, W, C) float -> (N, H + 2, W + 2, cw) int64 packed bits of (x * a + b >= 0), zero border.
  check_nhwc(x, "sign_pack input");
  const int n = x.size(0), h = x.size(1), w = x.size(2), c = x.size(3), cw = words(c);
  TORCH_CHECK(a.numel() == c && b.numel() == c && a.is_contiguous() && b.is_contiguous(), "BatchNorm terms: (C) each");
  auto out = torch::zeros({n, h + 2, w + 2, cw}, torch::kInt64);
  const PackFn fn = pack_fn(resolve_isa(isa));
  for (int i = 0; i < n; ++i)
    fn(x.data_ptr<float>() + (size_t)i * h * w * c, h, w, c, a.data_ptr<float>(), b.data_ptr<float>(),
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

// A run of binary residual blocks: per block 10 tensors
//   bn1_a, bn1_b, w1t, w1pop, alpha1, bn2_a, bn2_b, w2t, w2pop, alpha2
// and per block 3 integers (cin, cout, stride). Input and output: float (N, H, W, C), channels last.
torch::Tensor run_blocks(torch::Tensor x, std::vector<torch::Tensor> p, std::vector<int64_t> meta, int64_t isa_req) {
  check_nhwc(x, "run_blocks input");
  const int nb = (int)meta.size() / 3;
  TORCH_CHECK(nb >= 1 && (int)meta.size() == 3 * nb && (int)p.size() == 10 * nb, "run_blocks: 10 tensors and 3 ints per block");
  const int isa = resolve_isa(isa_req);
  std::vector<Layer> l1, l2;
  int h = x.size(1), w = x.size(2), maxf = 0, maxp = 0, maxkw = 0, maxo = 0;
  std::vector<int> hs{h}, ws{w};
  for (int b = 0; b < nb; ++b) {
    const int cin = meta[3 * b], cout = meta[3 * b + 1], s = meta[3 * b + 2];
    TORCH_CHECK(b > 0 || cin == x.size(3), "run_blocks: input has ", x.size(3), " channels, block 0 expects ", cin);
    TORCH_CHECK(cout >= cin, "run_blocks: option-A shortcut needs cout >= cin");
    l1.push_back(layer_from(p[10 * b + 2], p[10 * b + 3], p[10 * b + 4], cin));
    l2.push_back(layer_from(p[10 * b + 7], p[10 * b + 8], p[10 * b + 9], cout));
    TORCH_CHECK(l1.back().cout == cout && l2.back().cout == cout, "run_blocks: block ", b, " weights do not match cout");
    maxp = std::max({maxp, (h + 2) * (w + 2) * words(cin)});
    maxf = std::max(maxf, h * w * cin);
    h = out_size(h, s); w = out_size(w, s);
    hs.push_back(h); ws.push_back(w);
    maxp = std::max(maxp, (h + 2) * (w + 2) * words(cout));
    maxf = std::max(maxf, h * w * cout);
    maxkw = std::max({maxkw, (ws[b] + 2) * l1.back().kw / 3, (w + 2) * l2.back().kw / 3});
    maxo = std::max({maxo, l1.back().opad, l2.back().opad});
  }
  const int n = x.size(0), cl = meta[3 * nb - 2];
  auto out = torch::empty({n, h, w, cl}, torch::kFloat32);
  const ConvFn conv = conv_fn(isa);
  const PackFn pack = pack_fn(isa);
  const float* xin = x.data_ptr<float>();
  float* xout = out.data_ptr<float>();
  const size_t in_img = (size_t)x.size(1) * x.size(2) * x.size(3), out_img = (size_t)h * w * cl;
  at::parallel_for(0, n, 1, [&](int64_t lo, int64_t hi) {
    std::vector<uint64_t> pa(maxp), pb(maxp), rf(maxkw);
    std::vector<float> fa(maxf), fb(maxf), y(maxo);
    std::vector<int32_t> pops(maxo);
    for (int64_t i = lo; i < hi; ++i) {
      const float* cur = xin + i * in_img;
      std::fill(pa.begin(), pa.end(), 0);
      pack(cur, hs[0], ws[0], meta[0], p[0].data_ptr<float>(), p[1].data_ptr<float>(), pa.data());
      for (int b = 0; b < nb; ++b) {
        const int cin = meta[3 * b], cout = meta[3 * b + 1], s = meta[3 * b + 2];
        // conv 1: input bits in pa; epilogue = scale, BatchNorm 2, sign, pack into pb
        std::fill(pb.begin(), pb.end(), 0);
        ConvJob j1 = job_for(l1[b], pa.data(), hs[b], ws[b], s, rf.data(), pops.data(), y.data());
        j1.out_packed = pb.data();
        j1.next_a = p[10 * b + 5].data_ptr<float>();
        j1.next_b = p[10 * b + 6].data_ptr<float>();
        conv(j1);
        // conv 2: input bits in pb; epilogue = scale + residual (float), next block's BatchNorm 1, sign, pack into pa
        float* dst = b + 1 == nb ? xout + i * out_img : (cur == fa.data() ? fb.data() : fa.data());
        ConvJob j2 = job_for(l2[b], pb.data(), hs[b + 1], ws[b + 1], 1, rf.data(), pops.data(), y.data());
        j2.res = cur; j2.res_w = ws[b]; j2.res_c = cin; j2.res_pad = (cout - cin) / 2; j2.res_stride = s;
        j2.out_float = dst;
        if (b + 1 < nb) {
          std::fill(pa.begin(), pa.end(), 0);
          j2.out_packed = pa.data();
          j2.next_a = p[10 * (b + 1)].data_ptr<float>();
          j2.next_b = p[10 * (b + 1) + 1].data_ptr<float>();
        }
        conv(j2);
        cur = dst;
      }
    }
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hybridexit bit-packed binary convolution kernels";
  m.def("sign_pack", &sign_pack, "pack sign(x * a + b) along channels, zero border");
  m.def("conv_int", &conv_int, "exact integer sums of a packed binary 3x3 conv (padding 1)");
  m.def("run_blocks", &run_blocks, "a run of binary residual blocks, fused epilogues");
  m.def("best_isa", &best_isa, "best ISA level on this CPU: 0 portable, 1 avx2, 2 avx512bw, 3 avx512vpopcntdq");
  m.def("isa_name", [](int64_t i) { return std::string(kIsaNames[i]); });
}
