// hybridexit k-bit integer engine (see kbit.h for the levels, layouts and ISA levels).
//
// Each image runs through a run of blocks in per-thread buffers: activation bytes in a (h + 2, w + 2, cp) buffer
// whose border holds u = Z (a = 0), float residual streams ping-ponging between two buffers. A conv computes the
// int32 sums of a register tile of output pixels x output channels (kbit_isa.inc) and runs the epilogue on the
// registers: the float output and the next conv's bytes are the only stores.
#include "kbit.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

struct KJob {
  const uint8_t* in;  // (h + 2, w + 2, cp) activation bytes, border u = Z
  int h, w, cp, stride, ho, wo;
  const int8_t* wk;       // (9, cp / 4, opad, 4)
  const int32_t* wbias;   // (opad)
  int cout, opad;
  int32_t* acc;           // scratch (opad): one pixel's sums (portable path)
  int32_t* out_int;       // (ho, wo, cout) exact sums, or null (then the epilogue runs)
  const float* mult;      // (cout) s_c / Z^2
  const float *rp_g, *rp_b, *rp_z;  // RPReLU (cout each) or null
  const float* res;       // residual input (res_h, res_w, res_c) or null
  int res_w, res_c, res_pad, res_stride;
  float* out_float;       // (ho, wo, cout) or null
  const float *na, *nb, *nsh;  // next conv's folded BatchNorm and shift (or null) when out_u8
  float nhz;                   // next conv's Z / 2
  uint8_t* out_u8;        // (ho + 2, wo + 2, cpo) or null
  int cpo;
};

struct BsJob {
  const uint64_t* planes;  // (bits, h + 2, w + 2, cw) activation bit planes, zero border
  int h, w, cin, cw, colw, stride, ho, wo, bits;
  const uint64_t* wt;      // (bits, 3 colw, opad) weight plane words
  const int64_t* wpopw;    // (9, cout) sum_ij 2^(i+j) popcount of tap t's weight plane j bits
  int cout, opad;
  uint64_t* cols;          // scratch (bits, w + 2, colw)
  int32_t* out;            // (ho, wo, cout)
};

// Level 3 is two regions: the int8 path with VNNI, the bit-serial path with VPOPCNTDQ (a CPU may have one only).
namespace kx_isa3 {
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,popcnt,fma")
#define KX_ISA 3
#include "kbit_isa.inc"
#undef KX_ISA
#pragma GCC pop_options
}  // namespace kx_isa3

namespace kx_bs3 {
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vpopcntdq,popcnt,fma")
#define KX_ISA 2
#define KX_VPOPCNT 1
#include "kbit_isa.inc"
#undef KX_VPOPCNT
#undef KX_ISA
#pragma GCC pop_options
}  // namespace kx_bs3

namespace kx_isa2 {
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,popcnt,fma")
#define KX_ISA 2
#include "kbit_isa.inc"
#undef KX_ISA
#pragma GCC pop_options
}  // namespace kx_isa2

namespace kx_isa1 {
#pragma GCC push_options
#pragma GCC target("avx2,fma,popcnt")
#define KX_ISA 1
#include "kbit_isa.inc"
#undef KX_ISA
#pragma GCC pop_options
}  // namespace kx_isa1

namespace kx_isa0 {
#define KX_ISA 0
#include "kbit_isa.inc"
#undef KX_ISA
}  // namespace kx_isa0

namespace {

const char* kKbitIsaNames[] = {"portable", "avx2", "avx512bw", "avx512vnni"};

bool has_avx512bw() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma");
}

int best_level(bool bitserial) {
  __builtin_cpu_init();
  if (has_avx512bw())
    return (bitserial ? __builtin_cpu_supports("avx512vpopcntdq") : __builtin_cpu_supports("avx512vnni")) ? 3 : 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("popcnt")) return 1;
  return 0;
}

int resolve(int64_t requested, bool bitserial = false) {
  const int best = best_level(bitserial);
  if (requested < 0) return best;
  TORCH_CHECK(requested <= best, "k-bit ISA level ", requested, " is not supported by this CPU (best: ", best, " = ",
              bitserial && best == 3 ? "avx512vpopcntdq" : kKbitIsaNames[best], ")");
  return (int)requested;
}

using KConvFn = void (*)(const KJob&);
using QuantFn = void (*)(const float*, int, int, int, const float*, const float*, const float*, float, uint8_t*, int);
using BsFn = void (*)(const BsJob&);

KConvFn kconv_fn(int isa) {
  static const KConvFn f[] = {kx_isa0::kconv_image, kx_isa1::kconv_image, kx_isa2::kconv_image, kx_isa3::kconv_image};
  return f[isa];
}
QuantFn quant_fn(int isa) {
  static const QuantFn f[] = {kx_isa0::quantize_image, kx_isa1::quantize_image, kx_isa2::quantize_image,
                              kx_isa3::quantize_image};
  return f[isa];
}
using BsPackFn = void (*)(const uint8_t*, int, int, int, int, uint64_t*);
BsPackFn bs_pack_fn(int isa) {
  static const BsPackFn f[] = {kx_isa0::bs_pack_image, kx_isa1::bs_pack_image, kx_isa2::bs_pack_image,
                               kx_bs3::bs_pack_image};
  return f[isa];
}
BsFn bs_fn(int isa) {
  static const BsFn f[] = {kx_isa0::bitserial_image, kx_isa1::bitserial_image, kx_isa2::bitserial_image,
                           kx_bs3::bitserial_image};
  return f[isa];
}

int cpad(int c) { return (c + 3) / 4 * 4; }
int opad_of(int c) { return (c + 15) / 16 * 16; }
int osize(int h, int s) { return (h - 1) / s + 1; }
int zlev(int64_t bits) {
  TORCH_CHECK(bits == 2 || bits == 4, "k-bit engine: bits must be 2 or 4, got ", bits);
  return (1 << bits) - 1;
}

struct KLayer {
  const float *bn_a, *bn_b, *shift;
  const int8_t* wk;
  const int32_t* wbias;
  const float *mult, *rp_g, *rp_b, *rp_z;
  int cin, cout, opad;
};

const float* opt_vec(const torch::Tensor& t, int n, const char* what) {
  if (t.numel() == 0) return nullptr;
  TORCH_CHECK(t.dtype() == torch::kFloat32 && t.is_contiguous() && t.numel() == n, what, ": contiguous float32 (", n,
              ") or empty");
  return t.data_ptr<float>();
}

const float* req_vec(const torch::Tensor& t, int n, const char* what) {
  TORCH_CHECK(t.dtype() == torch::kFloat32 && t.is_contiguous() && t.numel() == n, what, ": contiguous float32 (", n, ")");
  return t.data_ptr<float>();
}

void check_weights(const torch::Tensor& wk, const torch::Tensor& wbias, int cin, int cout) {
  const int opad = opad_of(cout);
  TORCH_CHECK(wk.dtype() == torch::kInt8 && wk.is_contiguous() && wk.dim() == 4 && wk.size(0) == 9 &&
                  wk.size(1) == cpad(cin) / 4 && wk.size(2) == opad && wk.size(3) == 4,
              "k-bit weights: contiguous int8 (9, ", cpad(cin) / 4, ", ", opad, ", 4) expected");
  TORCH_CHECK(wbias.dtype() == torch::kInt32 && wbias.is_contiguous() && wbias.numel() == opad,
              "k-bit weight bias: contiguous int32 (", opad, ") expected");
}

KLayer klayer(const std::vector<torch::Tensor>& p, int base, int cin, int cout) {
  KLayer l{};
  l.cin = cin; l.cout = cout; l.opad = opad_of(cout);
  l.bn_a = req_vec(p[base], cin, "bn_a");
  l.bn_b = req_vec(p[base + 1], cin, "bn_b");
  l.shift = opt_vec(p[base + 2], cin, "shift");
  check_weights(p[base + 3], p[base + 4], cin, cout);
  l.wk = p[base + 3].data_ptr<int8_t>();
  l.wbias = p[base + 4].data_ptr<int32_t>();
  l.mult = req_vec(p[base + 5], cout, "mult");
  l.rp_g = opt_vec(p[base + 6], cout, "rp_gamma");
  l.rp_b = opt_vec(p[base + 7], cout, "rp_beta");
  l.rp_z = opt_vec(p[base + 8], cout, "rp_zeta");
  TORCH_CHECK((l.rp_g == nullptr) == (l.rp_b == nullptr) && (l.rp_g == nullptr) == (l.rp_z == nullptr),
              "RPReLU: all three of rp_gamma, rp_beta, rp_zeta, or none");
  return l;
}

KJob kjob(const KLayer& l, const uint8_t* in, int h, int w, int stride, int32_t* acc) {
  KJob j{};
  j.in = in; j.h = h; j.w = w; j.cp = cpad(l.cin); j.stride = stride;
  j.ho = osize(h, stride); j.wo = osize(w, stride);
  j.wk = l.wk; j.wbias = l.wbias; j.cout = l.cout; j.opad = l.opad;
  j.acc = acc; j.mult = l.mult; j.rp_g = l.rp_g; j.rp_b = l.rp_b; j.rp_z = l.rp_z;
  return j;
}

void fill_border(uint8_t* buf, int h, int w, int cp, int z) {
  // the zero padding of a (h + 2, w + 2, cp) activation buffer: u = Z (a = 0). Spare channels (c >= cin) may hold
  // anything: their weights are 0.
  const size_t row = (size_t)(w + 2) * cp;
  memset(buf, z, row);
  memset(buf + (size_t)(h + 1) * row, z, row);
  for (int y = 1; y <= h; ++y) {
    memset(buf + (size_t)y * row, z, cp);
    memset(buf + (size_t)y * row + (size_t)(w + 1) * cp, z, cp);
  }
}

}  // namespace

int64_t kbit_best_isa() { return best_level(false); }

torch::Tensor kconv_int(torch::Tensor u, torch::Tensor wk, torch::Tensor wbias, int64_t cout, int64_t bits,
                        int64_t stride, int64_t isa_req) {
  TORCH_CHECK(u.dtype() == torch::kUInt8 && u.dim() == 4 && u.is_contiguous(), "kconv_int: contiguous uint8 (N, H, W, C)");
  TORCH_CHECK(stride == 1 || stride == 2, "kconv_int: stride 1 or 2");
  const int z = zlev(bits), isa = resolve(isa_req);
  const int n = u.size(0), h = u.size(1), w = u.size(2), cin = u.size(3), cp = cpad(cin);
  check_weights(wk, wbias, cin, (int)cout);
  const int ho = osize(h, stride), wo = osize(w, stride), opad = opad_of(cout);
  auto out = torch::empty({n, ho, wo, cout}, torch::kInt32);
  std::vector<uint8_t> buf((size_t)(h + 2) * (w + 2) * cp);
  std::vector<int32_t> acc((size_t)wo * opad);
  KLayer l{};
  l.cin = cin; l.cout = (int)cout; l.opad = opad; l.wk = wk.data_ptr<int8_t>(); l.wbias = wbias.data_ptr<int32_t>();
  for (int i = 0; i < n; ++i) {
    fill_border(buf.data(), h, w, cp, z);
    const uint8_t* src = u.data_ptr<uint8_t>() + (size_t)i * h * w * cin;
    for (int y = 0; y < h; ++y)
      for (int x = 0; x < w; ++x)
        memcpy(&buf[((size_t)(y + 1) * (w + 2) + x + 1) * cp], src + ((size_t)y * w + x) * cin, cin);
    KJob j = kjob(l, buf.data(), h, w, (int)stride, acc.data());
    j.out_int = out.data_ptr<int32_t>() + (size_t)i * ho * wo * cout;
    kconv_fn(isa)(j);
  }
  return out;
}

torch::Tensor kconv_bitserial_int(torch::Tensor u, torch::Tensor w, int64_t bits, int64_t stride, int64_t isa_req) {
  TORCH_CHECK(u.dtype() == torch::kUInt8 && u.dim() == 4 && u.is_contiguous(), "bit-serial: contiguous uint8 (N, H, W, C)");
  TORCH_CHECK(w.dtype() == torch::kInt8 && w.dim() == 4 && w.is_contiguous() && w.size(1) == 3 && w.size(2) == 3 &&
                  w.size(3) == u.size(3), "bit-serial: weights contiguous int8 (cout, 3, 3, cin)");
  TORCH_CHECK(stride == 1 || stride == 2, "bit-serial: stride 1 or 2");
  const int z = zlev(bits), kb = (int)bits, isa = resolve(isa_req, true);
  const int n = u.size(0), h = u.size(1), wd = u.size(2), cin = u.size(3), cout = w.size(0);
  const int cw = (cin + 63) / 64, colw = (3 * cin + 63) / 64, kw = 3 * colw, opad = (cout + 7) / 8 * 8;
  const int ho = osize(h, stride), wo = osize(wd, stride);
  // weight planes: bit j of r = (w + Z) / 2, packed per column (kx) as 3 taps (ky) x cin channels
  std::vector<uint64_t> wt((size_t)kb * kw * opad, 0);
  std::vector<int64_t> wpopw((size_t)9 * cout, 0);
  const int8_t* wp = w.data_ptr<int8_t>();
  for (int o = 0; o < cout; ++o)
    for (int ky = 0; ky < 3; ++ky)
      for (int kx = 0; kx < 3; ++kx)
        for (int c = 0; c < cin; ++c) {
          const int r = (wp[(((size_t)o * 3 + ky) * 3 + kx) * cin + c] + z) / 2;
          const int bit = ky * cin + c;
          for (int jj = 0; jj < kb; ++jj)
            if ((r >> jj) & 1) {
              wt[((size_t)jj * kw + kx * colw + (bit >> 6)) * opad + o] |= 1ull << (bit & 63);
              wpopw[(size_t)(3 * ky + kx) * cout + o] += (int64_t)z << jj;  // sum_i 2^i = Z
            }
        }
  auto out = torch::empty({n, ho, wo, cout}, torch::kInt32);
  std::vector<uint64_t> planes((size_t)kb * (h + 2) * (wd + 2) * cw), cols((size_t)kb * (wd + 2) * colw);
  BsJob j{};
  j.h = h; j.w = wd; j.cin = cin; j.cw = cw; j.colw = colw; j.stride = (int)stride; j.ho = ho; j.wo = wo; j.bits = kb;
  j.wt = wt.data(); j.wpopw = wpopw.data(); j.cout = cout; j.opad = opad; j.cols = cols.data();
  for (int i = 0; i < n; ++i) {
    std::fill(planes.begin(), planes.end(), 0);
    bs_pack_fn(isa)(u.data_ptr<uint8_t>() + (size_t)i * h * wd * cin, h, wd, cin, kb, planes.data());
    j.planes = planes.data();
    j.out = out.data_ptr<int32_t>() + (size_t)i * ho * wo * cout;
    bs_fn(isa)(j);
  }
  return out;
}

torch::Tensor run_kblocks(torch::Tensor x, std::vector<torch::Tensor> p, std::vector<int64_t> meta, int64_t isa_req) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 4 && x.is_contiguous(),
              "run_kblocks input: contiguous float32 (N, H, W, C) expected");
  const int nb = (int)meta.size() / 4;
  TORCH_CHECK(nb >= 1 && (int)meta.size() == 4 * nb && (int)p.size() == 18 * nb,
              "run_kblocks: 18 tensors and 4 ints per block");
  const int isa = resolve(isa_req);
  std::vector<KLayer> l1, l2;
  std::vector<int> hs{(int)x.size(1)}, ws{(int)x.size(2)}, zs;
  size_t maxu = 0, maxf = 0, maxacc = 0;
  for (int b = 0; b < nb; ++b) {
    const int cin = meta[4 * b], cout = meta[4 * b + 1], s = meta[4 * b + 2];
    zs.push_back(zlev(meta[4 * b + 3]));
    TORCH_CHECK(b > 0 || cin == x.size(3), "run_kblocks: input has ", x.size(3), " channels, block 0 expects ", cin);
    TORCH_CHECK(b == 0 || cin == meta[4 * (b - 1) + 1], "run_kblocks: block ", b, " input channels do not chain");
    TORCH_CHECK(cout >= cin && (s == 1 || s == 2), "run_kblocks: option-A shortcut needs cout >= cin, stride 1 or 2");
    l1.push_back(klayer(p, 18 * b, cin, cout));
    l2.push_back(klayer(p, 18 * b + 9, cout, cout));
    const int h = hs.back(), w = ws.back(), ho = osize(h, s), wo = osize(w, s);
    maxu = std::max({maxu, (size_t)(h + 2) * (w + 2) * cpad(cin), (size_t)(ho + 2) * (wo + 2) * cpad(cout)});
    maxf = std::max({maxf, (size_t)h * w * cin, (size_t)ho * wo * cout});
    maxacc = std::max(maxacc, (size_t)std::max(wo, w) * opad_of(cout));
    hs.push_back(ho); ws.push_back(wo);
  }
  const int n = x.size(0), cl = meta[4 * nb - 3];
  auto out = torch::empty({n, hs.back(), ws.back(), cl}, torch::kFloat32);
  const KConvFn conv = kconv_fn(isa);
  const QuantFn quant = quant_fn(isa);
  const float* xin = x.data_ptr<float>();
  float* xout = out.data_ptr<float>();
  const size_t in_img = (size_t)x.size(1) * x.size(2) * x.size(3), out_img = (size_t)hs.back() * ws.back() * cl;
  at::parallel_for(0, n, 1, [&](int64_t lo, int64_t hi) {
    std::vector<uint8_t> ua(maxu), ub(maxu);
    std::vector<float> fa(maxf), fb(maxf);
    std::vector<int32_t> acc(maxacc);
    for (int64_t i = lo; i < hi; ++i) {
      const float* cur = xin + i * in_img;
      fill_border(ua.data(), hs[0], ws[0], cpad(l1[0].cin), zs[0]);
      quant(cur, hs[0], ws[0], l1[0].cin, l1[0].bn_a, l1[0].bn_b, l1[0].shift, 0.5f * zs[0], ua.data(), cpad(l1[0].cin));
      for (int b = 0; b < nb; ++b) {
        const int cin = l1[b].cin, cout = l1[b].cout, s = meta[4 * b + 2];
        // conv 1: bytes in ua -> RPReLU, BatchNorm 2, shift, quantize -> bytes in ub
        fill_border(ub.data(), hs[b + 1], ws[b + 1], cpad(cout), zs[b]);
        KJob j1 = kjob(l1[b], ua.data(), hs[b], ws[b], s, acc.data());
        j1.out_u8 = ub.data(); j1.cpo = cpad(cout);
        j1.na = l2[b].bn_a; j1.nb = l2[b].bn_b; j1.nsh = l2[b].shift; j1.nhz = 0.5f * zs[b];
        conv(j1);
        // conv 2: bytes in ub -> RPReLU, + residual -> float; next block's BatchNorm 1, shift, quantize -> ua
        float* dst = b + 1 == nb ? xout + i * out_img : (cur == fa.data() ? fb.data() : fa.data());
        KJob j2 = kjob(l2[b], ub.data(), hs[b + 1], ws[b + 1], 1, acc.data());
        j2.res = cur; j2.res_w = ws[b]; j2.res_c = cin; j2.res_pad = (cout - cin) / 2; j2.res_stride = s;
        j2.out_float = dst;
        if (b + 1 < nb) {
          fill_border(ua.data(), hs[b + 1], ws[b + 1], cpad(cout), zs[b + 1]);
          j2.out_u8 = ua.data(); j2.cpo = cpad(cout);
          j2.na = l1[b + 1].bn_a; j2.nb = l1[b + 1].bn_b; j2.nsh = l1[b + 1].shift; j2.nhz = 0.5f * zs[b + 1];
        }
        conv(j2);
        cur = dst;
      }
    }
  });
  return out;
}
