// The torch extension of the main package: tensors in, tensors out, every kernel in the torch-free core (bconv.cpp,
// kbit.cpp, decide.cpp through hx_edge.h), so that hybridexit-edge (edge/) runs the very same kernel source.
// Shapes and dtypes of the tensors are checked here; the core checks how the blocks chain.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <string>
#include <vector>

#include "hx_edge.h"

namespace {

constexpr int CONV_TENSORS = 9;  // per conv: bn_a, bn_b, thr/shift, weights, popcounts/bias, scale, rp_g, rp_b, rp_z

void torch_parallel(int64_t n, hx_body_fn body, void* ctx) {
  at::parallel_for(0, n, 1, [&](int64_t lo, int64_t hi) { body(ctx, lo, hi); });
}

struct Err {
  char msg[512] = {0};
  void check(int rc) const { TORCH_CHECK(rc == 0, msg); }
};

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

const float* req_vec(const torch::Tensor& t, int64_t n, const char* what) {
  TORCH_CHECK(t.dtype() == torch::kFloat32 && t.is_contiguous() && t.numel() == n, what, ": contiguous float32 (", n, ")");
  return t.data_ptr<float>();
}

int words(int c) { return (c + 63) / 64; }

hx_conv binary_conv(const torch::Tensor* t, int cin, int cout, int k) {
  const torch::Tensor &wt = t[3], &wpop = t[4], &alpha = t[5];
  TORCH_CHECK(wt.dtype() == torch::kInt64 && wt.dim() == 2 && wt.is_contiguous(), "weights: contiguous int64 (kw, opad)");
  TORCH_CHECK(wpop.dtype() == torch::kInt32 && wpop.dim() == 2 && wpop.size(0) == 9 && wpop.is_contiguous(),
              "weight popcounts: contiguous int32 (9, cout)");
  TORCH_CHECK(wpop.size(1) == cout, "binary blocks: conv ", k, " weights do not match cout ", cout);
  TORCH_CHECK(wt.size(0) == 3 * words(3 * cin) && wt.size(1) % 8 == 0 && wt.size(1) >= cout,
              "weight words do not fit cin/cout");
  TORCH_CHECK(t[0].numel() == cin && t[1].numel() == cin && t[0].is_contiguous() && t[1].is_contiguous() &&
              t[0].dtype() == torch::kFloat32 && t[1].dtype() == torch::kFloat32, "conv ", k, ": BatchNorm terms (cin)");
  hx_conv c{};
  c.bn_a = t[0].data_ptr<float>(); c.bn_b = t[1].data_ptr<float>(); c.thr = vec_or_null(t[2], cin, "RSign threshold");
  c.w = wt.data_ptr<int64_t>(); c.wi = wpop.data_ptr<int32_t>(); c.scale = req_vec(alpha, cout, "alpha");
  c.rp_g = vec_or_null(t[6], cout, "RPReLU gamma"); c.rp_b = vec_or_null(t[7], cout, "RPReLU beta");
  c.rp_z = vec_or_null(t[8], cout, "RPReLU zeta");
  c.kw = (int)wt.size(0); c.opad = (int)wt.size(1);
  return c;
}

hx_conv kbit_conv(const torch::Tensor* t, int cin, int cout) {
  const int opad = (cout + 15) / 16 * 16, g = (cin + 3) / 4;
  const torch::Tensor &wk = t[3], &wbias = t[4];
  TORCH_CHECK(wk.dtype() == torch::kInt8 && wk.is_contiguous() && wk.dim() == 4 && wk.size(0) == 9 && wk.size(1) == g &&
                  wk.size(2) == opad && wk.size(3) == 4,
              "k-bit weights: contiguous int8 (9, ", g, ", ", opad, ", 4) expected");
  TORCH_CHECK(wbias.dtype() == torch::kInt32 && wbias.is_contiguous() && wbias.numel() == opad,
              "k-bit weight bias: contiguous int32 (", opad, ") expected");
  hx_conv c{};
  c.bn_a = req_vec(t[0], cin, "bn_a"); c.bn_b = req_vec(t[1], cin, "bn_b"); c.thr = vec_or_null(t[2], cin, "shift");
  c.w = wk.data_ptr<int8_t>(); c.wi = wbias.data_ptr<int32_t>(); c.scale = req_vec(t[5], cout, "mult");
  c.rp_g = vec_or_null(t[6], cout, "rp_gamma"); c.rp_b = vec_or_null(t[7], cout, "rp_beta");
  c.rp_z = vec_or_null(t[8], cout, "rp_zeta");
  return c;
}

// Blocks from the flat lists of engines/packed.py (kind 0: 18 tensors, 3 ints per block) or engines/kbit.py
// (kind 1: 18 tensors, 4 ints per block).
std::vector<hx_block> blocks_of(const std::vector<torch::Tensor>& p, const std::vector<int64_t>& meta, int kind) {
  const int per = kind == 0 ? 3 : 4;
  const int nb = (int)meta.size() / per;
  if (kind == 0) {
    TORCH_CHECK(nb >= 1 && (int)meta.size() == 3 * nb && (int)p.size() == 2 * CONV_TENSORS * nb,
                "binary blocks: ", 2 * CONV_TENSORS, " tensors and 3 ints per block");
  } else {
    TORCH_CHECK(nb >= 1 && (int)meta.size() == 4 * nb && (int)p.size() == 18 * nb,
                "run_kblocks: 18 tensors and 4 ints per block");
  }
  std::vector<hx_block> out(nb);
  for (int b = 0; b < nb; ++b) {
    hx_block& k = out[b];
    k.cin = (int)meta[per * b]; k.cout = (int)meta[per * b + 1]; k.stride = (int)meta[per * b + 2];
    k.bits = kind == 0 ? 1 : (int)meta[4 * b + 3];
    if (kind == 1) TORCH_CHECK(k.bits == 2 || k.bits == 4, "k-bit engine: bits must be 2 or 4, got ", k.bits);
    TORCH_CHECK(k.cout >= k.cin, "blocks: option-A shortcut needs cout >= cin");
    const torch::Tensor* t = &p[(size_t)2 * b * CONV_TENSORS];
    k.c1 = kind == 0 ? binary_conv(t, k.cin, k.cout, 2 * b) : kbit_conv(t, k.cin, k.cout);
    k.c2 = kind == 0 ? binary_conv(t + CONV_TENSORS, k.cout, k.cout, 2 * b + 1) : kbit_conv(t + CONV_TENSORS, k.cout, k.cout);
  }
  return out;
}

torch::Tensor run(const torch::Tensor& x, const std::vector<hx_block>& blocks, int64_t isa, int64_t kisa) {
  Err e;
  int ho, wo, co;
  e.check(hx_blocks_out_shape(blocks.data(), (int)blocks.size(), x.size(1), x.size(2), &ho, &wo, &co, e.msg, sizeof e.msg));
  TORCH_CHECK(blocks[0].cin == x.size(3), "blocks: input has ", x.size(3), " channels, block 0 expects ", blocks[0].cin);
  auto out = torch::empty({x.size(0), ho, wo, co}, torch::kFloat32);
  e.check(hx_run_blocks(blocks.data(), (int)blocks.size(), x.data_ptr<float>(), x.size(0), x.size(1), x.size(2),
                        x.size(3), (int)isa, (int)kisa, torch_parallel, out.data_ptr<float>(), e.msg, sizeof e.msg));
  return out;
}

torch::Tensor run_blocks(torch::Tensor x, std::vector<torch::Tensor> p, std::vector<int64_t> meta, int64_t isa) {
  check_nhwc(x, "run_blocks input");
  return run(x, blocks_of(p, meta, 0), isa, -1);
}

torch::Tensor run_kblocks(torch::Tensor x, std::vector<torch::Tensor> p, std::vector<int64_t> meta, int64_t kisa) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 4 && x.is_contiguous(),
              "run_kblocks input: contiguous float32 (N, H, W, C) expected");
  return run(x, blocks_of(p, meta, 1), 0, kisa);
}

torch::Tensor sign_pack(torch::Tensor x, torch::Tensor a, torch::Tensor b, torch::Tensor t, int64_t isa) {
  check_nhwc(x, "sign_pack input");
  const int n = x.size(0), h = x.size(1), w = x.size(2), c = x.size(3);
  TORCH_CHECK(a.numel() == c && b.numel() == c && a.is_contiguous() && b.is_contiguous(), "BatchNorm terms: (C) each");
  auto out = torch::empty({n, h + 2, w + 2, words(c)}, torch::kInt64);
  Err e;
  e.check(hx_sign_pack(x.data_ptr<float>(), n, h, w, c, a.data_ptr<float>(), b.data_ptr<float>(),
                       vec_or_null(t, c, "threshold"), (int)isa, reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>()),
                       e.msg, sizeof e.msg));
  return out;
}

torch::Tensor conv_int(torch::Tensor packed, torch::Tensor wt, torch::Tensor wpop, int64_t cin, int64_t stride, int64_t isa) {
  TORCH_CHECK(packed.dtype() == torch::kInt64 && packed.dim() == 4 && packed.is_contiguous() && packed.size(3) == words(cin),
              "packed input: contiguous int64 (N, H + 2, W + 2, cw)");
  TORCH_CHECK(wt.dtype() == torch::kInt64 && wt.dim() == 2 && wt.is_contiguous(), "weights: contiguous int64 (kw, opad)");
  TORCH_CHECK(wpop.dtype() == torch::kInt32 && wpop.dim() == 2 && wpop.size(0) == 9 && wpop.is_contiguous(),
              "weight popcounts: contiguous int32 (9, cout)");
  const int n = packed.size(0), h = packed.size(1) - 2, w = packed.size(2) - 2, cout = wpop.size(1);
  auto out = torch::empty({n, (h - 1) / stride + 1, (w - 1) / stride + 1, cout}, torch::kInt32);
  Err e;
  e.check(hx_conv_int(reinterpret_cast<const uint64_t*>(packed.data_ptr<int64_t>()), n, h, w, (int)cin,
                      reinterpret_cast<const uint64_t*>(wt.data_ptr<int64_t>()), wt.size(0), wt.size(1),
                      wpop.data_ptr<int32_t>(), cout, (int)stride, (int)isa, out.data_ptr<int32_t>(), e.msg, sizeof e.msg));
  return out;
}

torch::Tensor kconv_int(torch::Tensor u, torch::Tensor wk, torch::Tensor wbias, int64_t cout, int64_t bits,
                        int64_t stride, int64_t isa) {
  TORCH_CHECK(u.dtype() == torch::kUInt8 && u.dim() == 4 && u.is_contiguous(), "kconv_int: contiguous uint8 (N, H, W, C)");
  TORCH_CHECK(stride == 1 || stride == 2, "kconv_int: stride 1 or 2");
  const int n = u.size(0), h = u.size(1), w = u.size(2), cin = u.size(3);
  std::vector<torch::Tensor> t(CONV_TENSORS, torch::empty(0));
  t[0] = t[1] = torch::zeros({cin}); t[3] = wk; t[4] = wbias; t[5] = torch::zeros({cout});
  kbit_conv(t.data(), cin, (int)cout);  // checks the weight layout
  auto out = torch::empty({n, (h - 1) / stride + 1, (w - 1) / stride + 1, cout}, torch::kInt32);
  Err e;
  e.check(hx_kconv_int(u.data_ptr<uint8_t>(), n, h, w, cin, wk.data_ptr<int8_t>(), wbias.data_ptr<int32_t>(), (int)cout,
                       (int)bits, (int)stride, (int)isa, out.data_ptr<int32_t>(), e.msg, sizeof e.msg));
  return out;
}

torch::Tensor kconv_bitserial_int(torch::Tensor u, torch::Tensor w, int64_t bits, int64_t stride, int64_t isa) {
  TORCH_CHECK(u.dtype() == torch::kUInt8 && u.dim() == 4 && u.is_contiguous(), "bit-serial: contiguous uint8 (N, H, W, C)");
  TORCH_CHECK(w.dtype() == torch::kInt8 && w.dim() == 4 && w.is_contiguous() && w.size(1) == 3 && w.size(2) == 3 &&
                  w.size(3) == u.size(3), "bit-serial: weights contiguous int8 (cout, 3, 3, cin)");
  TORCH_CHECK(stride == 1 || stride == 2, "bit-serial: stride 1 or 2");
  const int n = u.size(0), h = u.size(1), wd = u.size(2), cin = u.size(3), cout = w.size(0);
  auto out = torch::empty({n, (h - 1) / stride + 1, (wd - 1) / stride + 1, cout}, torch::kInt32);
  Err e;
  e.check(hx_kconv_bitserial_int(u.data_ptr<uint8_t>(), n, h, wd, cin, w.data_ptr<int8_t>(), cout, (int)bits,
                                 (int)stride, (int)isa, out.data_ptr<int32_t>(), e.msg, sizeof e.msg));
  return out;
}

hx_head head_of(const std::vector<torch::Tensor>& t, const std::vector<int64_t>& m, int c, int h, int w) {
  // t: bn_a, bn_b, w1, h_a, h_b, w2, b2 (w1, h_a, h_b empty without a hidden layer); m: pool kernel (0 = global), hidden
  TORCH_CHECK(t.size() == 7 && m.size() == 2, "exit head: 7 tensors and 2 ints");
  for (const auto& x : t) TORCH_CHECK(x.numel() == 0 || (x.dtype() == torch::kFloat32 && x.is_contiguous()),
                                      "exit head tensors: contiguous float32");
  hx_head hd{};
  hd.pool = (int)m[0]; hd.hidden = (int)m[1];
  TORCH_CHECK(hd.pool == 0 || (hd.pool <= h && hd.pool <= w), "exit head: pool kernel larger than the features");
  TORCH_CHECK(hd.pool == 0 || h == w, "exit head: square features expected");
  const int p = hd.pool ? (h - hd.pool) / hd.pool + 1 : 1;
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

// An edge's native description, built once (the tensors' checks, the blocks, the exit heads' shapes) and kept with
// the tensors it points into; ``decide`` then runs a batch on it. Building it on every call cost ~17 us at batch 1
// (190 tensors converted and checked for the CIFAR-10 headline), 6 % of that decision.
struct PreparedEdge {
  std::vector<torch::Tensor> keep;  // every tensor the pointers below point into
  hx_edge e{};
  std::vector<hx_block> blocks;
  std::vector<int> exit_end;
  std::vector<hx_head> hds;
  int fh = 0, fw = 0, fc = 0;

  PreparedEdge(const PreparedEdge&) = delete;  // e points into the vectors above: never copied
  PreparedEdge& operator=(const PreparedEdge&) = delete;
  PreparedEdge(std::vector<torch::Tensor> prologue, std::vector<std::vector<torch::Tensor>> seg_params,
               std::vector<std::vector<int64_t>> seg_meta, std::vector<int64_t> seg_kind,
               std::vector<std::vector<torch::Tensor>> heads, std::vector<std::vector<int64_t>> head_meta, int64_t c,
               int64_t H, int64_t W) {
    // prologue: mean (C), std (C), stem weights (3, 3, C, C0). Segment s < K: the run of blocks before exit s;
    // segment K: the blocks after the last exit (meta may be empty). Images are (N, C, H, W).
    const int K = (int)heads.size();
    TORCH_CHECK((int)seg_params.size() == K + 1 && (int)seg_meta.size() == K + 1 && (int)seg_kind.size() == K + 1 &&
                (int)head_meta.size() == K, "decide: K heads and K + 1 segments");
    TORCH_CHECK(prologue.size() == 3, "decide: prologue = mean, std, stem weights");
    for (const auto& t : prologue) keep.push_back(t);
    for (const auto& v : seg_params) keep.insert(keep.end(), v.begin(), v.end());
    for (const auto& v : heads) keep.insert(keep.end(), v.begin(), v.end());
    e.c = (int)c; e.h = (int)H; e.w = (int)W;
    e.mean = vec_or_null(prologue[0], c, "mean");
    e.std = vec_or_null(prologue[1], c, "std");
    const torch::Tensor& sw = prologue[2];
    TORCH_CHECK(e.mean && e.std && sw.dtype() == torch::kFloat32 && sw.is_contiguous() && sw.dim() == 4 &&
                sw.size(0) == 3 && sw.size(1) == 3 && sw.size(2) == c, "decide: stem weights (3, 3, C, C0) float32");
    e.stem = sw.data_ptr<float>();
    e.c0 = sw.size(3);
    for (int s = 0; s <= K; ++s) {
      if (s == K && seg_meta[K].empty()) break;
      TORCH_CHECK(seg_kind[s] == 0 || seg_kind[s] == 1, "edge blocks of kind ", seg_kind[s], " are not built into these kernels");
      auto seg = blocks_of(seg_params[s], seg_meta[s], (int)seg_kind[s]);
      blocks.insert(blocks.end(), seg.begin(), seg.end());
      if (s < K) exit_end.push_back((int)blocks.size());
    }
    e.n_blocks = (int)blocks.size(); e.blocks = blocks.data();
    e.n_exits = K; e.exit_end = exit_end.data();
    Err err;
    int b0 = 0, hh = e.h, ww = e.w, cc = e.c0;  // head shapes: the features after each exit's blocks
    for (int k = 0; k < K; ++k) {
      if (exit_end[k] > b0)
        err.check(hx_blocks_out_shape(blocks.data() + b0, exit_end[k] - b0, hh, ww, &hh, &ww, &cc, err.msg, sizeof err.msg));
      b0 = exit_end[k];
      hds.push_back(head_of(heads[k], head_meta[k], cc, hh, ww));
    }
    e.heads = hds.data();
    err.check(hx_edge_feature_shape(&e, &fh, &fw, &fc, err.msg, sizeof err.msg));
  }

  std::vector<torch::Tensor> decide(torch::Tensor x, std::vector<double> thresholds, std::vector<double> temperatures,
                                    int64_t isa, int64_t kisa) const {
    // x: (N, C, H, W) uint8 (raw) or float in [0, 1]. Returns predictions (N) int64 (-1 where no exit was reached),
    // decided_at (N) int64 (exit k or -1 = cloud), entropies (N, K) float (NaN where not reached), features
    // (R, H', W', C') float channels last of the R samples that did not exit, and their indices (R) int64.
    const int K = e.n_exits;
    TORCH_CHECK(x.dim() == 4 && x.is_contiguous() && (x.dtype() == torch::kUInt8 || x.dtype() == torch::kFloat32),
                "decide: contiguous (N, C, H, W) uint8 or float32 images");
    TORCH_CHECK(x.size(1) == e.c && x.size(2) == e.h && x.size(3) == e.w, "decide: images of shape (N, ", e.c, ", ",
                e.h, ", ", e.w, ") expected");
    TORCH_CHECK((int)thresholds.size() == K && (int)temperatures.size() == K, "decide: K thresholds and temperatures");
    const int n = x.size(0);
    auto preds = torch::empty({n}, torch::kInt64);
    auto decided = torch::empty({n}, torch::kInt64);
    auto ents = torch::empty({n, K}, torch::kFloat32);
    auto feats = torch::empty({n, fh, fw, fc}, torch::kFloat32);
    auto rem = torch::empty({n}, torch::kInt64);
    std::vector<float> thr(thresholds.begin(), thresholds.end()), temp(temperatures.begin(), temperatures.end());
    int nrem = 0;
    Err err;
    err.check(hx_decide(&e, x.data_ptr(), x.dtype() == torch::kUInt8, n, thr.data(), temp.data(), (int)isa, (int)kisa,
                        torch_parallel, preds.data_ptr<int64_t>(), decided.data_ptr<int64_t>(), ents.data_ptr<float>(),
                        feats.data_ptr<float>(), rem.data_ptr<int64_t>(), &nrem, err.msg, sizeof err.msg));
    return {preds, decided, ents, feats.narrow(0, 0, nrem), rem.narrow(0, 0, nrem)};
  }
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hybridexit bit-packed binary and k-bit kernels and the native edge decision (core: hx_edge.h)";
  m.def("sign_pack", &sign_pack, "pack sign(x * a + b - t) along channels, zero border");
  m.def("conv_int", &conv_int, "exact integer sums of a packed binary 3x3 conv (padding 1)");
  m.def("run_blocks", &run_blocks, "a run of binary residual blocks, fused epilogues");
  py::class_<PreparedEdge>(m, "PreparedEdge", "an edge's native description, built once; decide() runs a batch")
      .def(py::init<std::vector<torch::Tensor>, std::vector<std::vector<torch::Tensor>>, std::vector<std::vector<int64_t>>,
                    std::vector<int64_t>, std::vector<std::vector<torch::Tensor>>, std::vector<std::vector<int64_t>>,
                    int64_t, int64_t, int64_t>())
      .def("decide", &PreparedEdge::decide,
           "the whole edge decision on a batch: normalization, stem, blocks, exit heads, entropy, exit rule");
  m.def("best_isa", [] { return (int64_t)hx_best_isa(); }, "best ISA level of the binary blocks and float parts");
  m.def("isa_name", [](int64_t i) {
    const char* s = hx_isa_name((int)i);
    TORCH_CHECK(s != nullptr, "ISA level ", i, " does not exist on this architecture");
    return std::string(s);
  });
  m.def("arch", [] { return std::string(hx_arch()); });
  m.def("run_kblocks", &run_kblocks, "a run of k-bit (2/4-bit) residual blocks, int8 dot products, fused epilogues");
  m.def("kconv_int", &kconv_int, "exact integer sums of a k-bit 3x3 conv (padding 1)");
  m.def("kconv_bitserial_int", &kconv_bitserial_int, "the same sums by bit-serial popcount (for measurement)");
  m.def("kbit_isa_name", [](int64_t i) {
    const char* s = hx_kbit_isa_name((int)i);
    TORCH_CHECK(s != nullptr, "k-bit ISA level ", i, " does not exist on this architecture");
    return std::string(s);
  });
  m.def("kbit_best_isa", [] { return (int64_t)hx_kbit_best_isa(); }, "best ISA level of the k-bit blocks");
}
