// hybridexit k-bit (2- and 4-bit) integer engine (torch-free core, C ABI in hx_edge.h): 3x3 convolutions on
// integer levels with int8 dot products (AVX-512 VNNI vpdpbusd, AVX-512BW / AVX2 maddubs, NEON widening products
// or sdot on aarch64, portable), and fused runs of k-bit residual blocks.
//
// Levels. A k-bit activation q in {0 .. Z} (Z = 2^k - 1) is the value (2q - Z) / Z; it is stored as the unsigned
// byte u = 2q (0 .. 2Z), so that a = u - Z = 2q - Z is the odd integer numerator, and the zero padding of a conv
// (value 0, which is not a level) is the byte u = Z (a = 0 exactly). A k-bit weight r in {0 .. Z} is stored as the
// signed byte w = 2r - Z. Then sum a*w = sum u*w - Z * sum_all_taps w: the second term is a per-output-channel
// constant (``wbias`` below, -Z * sum of the channel's weights), so the padded border needs no special case and
// every sum is exact in int32. The float conv output is mult_c * sum a*w with mult_c = s_c / Z^2.
//
// Weight layout ``wk``: int8 (9, G, opad, 4), G = ceil(cin / 4), opad = cout rounded up to 16: tap t = 3 ky + kx,
// input channels 4g .. 4g + 3 of output channel o at [t][g][o][0..3]; zero where c >= cin or o >= cout.
// ``wbias``: int32 (opad), -Z * sum over taps and channels of w[o] (0 for o >= cout).
//
// maddubs adds two u8 * s8 products into int16 with saturation: |u w| <= 2Z * Z = 450 for k = 4, so a pair is at
// most 900 and up to 32 pairs are summed in int16 (<= 28,800 < 32,767) before widening: no saturation, every path
// gives the same exact integers. NEON: u <= 30 fits a signed byte, so products are s8 x s8 (vmull_s8 / sdot).
//
// Each image runs through a run of blocks in per-thread buffers: activation bytes in a (h + 2, w + 2, cp) buffer
// whose border holds u = Z (a = 0), float residual streams ping-ponging between two buffers. A conv computes the
// int32 sums of a register tile of output pixels x output channels (kbit_isa.inc) and runs the epilogue on the
// registers: the float output and the next conv's bytes are the only stores.
#include "hx_internal.h"

#if HX_X86
#include <immintrin.h>
#elif HX_ARM64
#include <arm_neon.h>
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
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

#if HX_X86
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

#endif

namespace kx_isa0 {
#define KX_ISA 0
#include "kbit_isa.inc"
#undef KX_ISA
}  // namespace kx_isa0

#if HX_ARM64
namespace kx_neon {
#define KX_ISA 0
#define KX_NEON 1
#include "kbit_isa.inc"
#undef KX_NEON
#undef KX_ISA
}  // namespace kx_neon

namespace kx_dot {
#pragma GCC push_options
#pragma GCC target("arch=armv8.2-a+dotprod")
#define KX_ISA 0
#define KX_NEON 2
#include "kbit_isa.inc"
#undef KX_NEON
#undef KX_ISA
#pragma GCC pop_options
}  // namespace kx_dot
#endif

namespace {

#if HX_X86
const char* kKbitIsaNames[] = {"portable", "avx2", "avx512bw", "avx512vnni"};
#define KX_PER_ISA(fn) {kx_isa0::fn, kx_isa1::fn, kx_isa2::fn, kx_isa3::fn}
#define KX_PER_BS(fn) {kx_isa0::fn, kx_isa1::fn, kx_isa2::fn, kx_bs3::fn}
#elif HX_ARM64
const char* kKbitIsaNames[] = {"portable", "neon", "dotprod"};
#define KX_PER_ISA(fn) {kx_isa0::fn, kx_neon::fn, kx_dot::fn}
#define KX_PER_BS(fn) {kx_isa0::fn, kx_isa0::fn, kx_isa0::fn}
#else
const char* kKbitIsaNames[] = {"portable"};
#define KX_PER_ISA(fn) {kx_isa0::fn}
#define KX_PER_BS(fn) {kx_isa0::fn}
#endif

#if HX_X86
bool has_avx512bw() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma");
}
#endif

int best_level(bool bitserial) {
#if HX_X86
  __builtin_cpu_init();
  if (has_avx512bw())
    return (bitserial ? __builtin_cpu_supports("avx512vpopcntdq") : __builtin_cpu_supports("avx512vnni")) ? 3 : 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("popcnt")) return 1;
  return 0;
#elif HX_ARM64
  const unsigned long caps = getauxval(AT_HWCAP);
  if (!(caps & HWCAP_ASIMD)) return 0;
  return (caps & HWCAP_ASIMDDP) ? 2 : 1;
#else
  (void)bitserial;
  return 0;
#endif
}

int resolve(int requested, bool bitserial = false) {
  const int best = best_level(bitserial);
  if (requested < 0) return best;
  HX_CHECK(requested <= best, "k-bit ISA level ", requested, " is not supported by this CPU (best: ", best, " = ",
           HX_X86 && bitserial && best == 3 ? "avx512vpopcntdq" : kKbitIsaNames[best], ")");
  return requested;
}

using KConvFn = void (*)(const KJob&);
using QuantFn = void (*)(const float*, int, int, int, const float*, const float*, const float*, float, uint8_t*, int);
using BsFn = void (*)(const BsJob&);
using BsPackFn = void (*)(const uint8_t*, int, int, int, int, uint64_t*);

KConvFn kconv_fn(int isa) { static const KConvFn f[] = KX_PER_ISA(kconv_image); return f[isa]; }
QuantFn quant_fn(int isa) { static const QuantFn f[] = KX_PER_ISA(quantize_image); return f[isa]; }
BsPackFn bs_pack_fn(int isa) { static const BsPackFn f[] = KX_PER_BS(bs_pack_image); return f[isa]; }
BsFn bs_fn(int isa) { static const BsFn f[] = KX_PER_BS(bitserial_image); return f[isa]; }

int cpad(int c) { return (c + 3) / 4 * 4; }
int opad_of(int c) { return (c + 15) / 16 * 16; }
int osize(int h, int s) { return (h - 1) / s + 1; }
int zlev(int bits) {
  HX_CHECK(bits == 2 || bits == 4, "k-bit engine: bits must be 2 or 4, got ", bits);
  return (1 << bits) - 1;
}

struct KLayer {
  const float *bn_a, *bn_b, *shift;
  const int8_t* wk;
  const int32_t* wbias;
  const float *mult, *rp_g, *rp_b, *rp_z;
  int cin, cout, opad;
};

KLayer klayer(const hx_conv& c, int cin, int cout) {
  HX_CHECK(c.w && c.wi && c.scale && c.bn_a && c.bn_b, "k-bit conv: weights, bias, mult and BatchNorm are required");
  HX_CHECK((c.rp_g == nullptr) == (c.rp_b == nullptr) && (c.rp_g == nullptr) == (c.rp_z == nullptr),
           "RPReLU: all three of rp_gamma, rp_beta, rp_zeta, or none");
  KLayer l{};
  l.cin = cin; l.cout = cout; l.opad = opad_of(cout);
  l.bn_a = c.bn_a; l.bn_b = c.bn_b; l.shift = c.thr;
  l.wk = static_cast<const int8_t*>(c.w); l.wbias = c.wi; l.mult = c.scale;
  l.rp_g = c.rp_g; l.rp_b = c.rp_b; l.rp_z = c.rp_z;
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

namespace hx {

int resolve_kisa(int requested) { return resolve(requested); }

void run_kbit(const hx_block* blocks, int nb, const float* x, int n, int h0, int w0, int c0, int kisa,
              hx_parallel_fn par, float* xout) {
  HX_CHECK(nb >= 1, "run_kblocks: 18 tensors and 4 ints per block");
  const int isa = resolve(kisa);
  std::vector<KLayer> l1, l2;
  std::vector<int> hs{h0}, ws{w0}, zs;
  size_t maxu = 0, maxf = 0, maxacc = 0;
  for (int b = 0; b < nb; ++b) {
    const int cin = blocks[b].cin, cout = blocks[b].cout, s = blocks[b].stride;
    zs.push_back(zlev(blocks[b].bits));
    HX_CHECK(b > 0 || cin == c0, "run_kblocks: input has ", c0, " channels, block 0 expects ", cin);
    HX_CHECK(b == 0 || cin == blocks[b - 1].cout, "run_kblocks: block ", b, " input channels do not chain");
    HX_CHECK(cout >= cin && (s == 1 || s == 2), "run_kblocks: option-A shortcut needs cout >= cin, stride 1 or 2");
    l1.push_back(klayer(blocks[b].c1, cin, cout));
    l2.push_back(klayer(blocks[b].c2, cout, cout));
    const int h = hs.back(), w = ws.back(), ho = osize(h, s), wo = osize(w, s);
    maxu = std::max({maxu, (size_t)(h + 2) * (w + 2) * cpad(cin), (size_t)(ho + 2) * (wo + 2) * cpad(cout)});
    maxf = std::max({maxf, (size_t)h * w * cin, (size_t)ho * wo * cout});
    maxacc = std::max(maxacc, (size_t)std::max(wo, w) * opad_of(cout));
    hs.push_back(ho); ws.push_back(wo);
  }
  const int cl = blocks[nb - 1].cout;
  const KConvFn conv = kconv_fn(isa);
  const QuantFn quant = quant_fn(isa);
  const size_t in_img = (size_t)h0 * w0 * c0, out_img = (size_t)hs.back() * ws.back() * cl;
  auto body = [&](int64_t lo, int64_t hi) {
    std::vector<uint8_t> ua(maxu), ub(maxu);
    std::vector<float> fa(maxf), fb(maxf);
    std::vector<int32_t> acc(maxacc);
    for (int64_t i = lo; i < hi; ++i) {
      const float* cur = x + i * in_img;
      fill_border(ua.data(), hs[0], ws[0], cpad(l1[0].cin), zs[0]);
      quant(cur, hs[0], ws[0], l1[0].cin, l1[0].bn_a, l1[0].bn_b, l1[0].shift, 0.5f * zs[0], ua.data(), cpad(l1[0].cin));
      for (int b = 0; b < nb; ++b) {
        const int cin = l1[b].cin, cout = l1[b].cout, s = blocks[b].stride;
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
  };
  parallel(par, n, body);
}

}  // namespace hx

extern "C" {

int hx_kbit_best_isa(void) { return best_level(false); }

const char* hx_kbit_isa_name(int level) {
  return level >= 0 && level < (int)(sizeof(kKbitIsaNames) / sizeof(kKbitIsaNames[0])) ? kKbitIsaNames[level] : nullptr;
}

int hx_kconv_int(const uint8_t* u, int n, int h, int w, int cin, const int8_t* wk, const int32_t* wbias, int cout,
                 int bits, int stride, int isa_req, int32_t* out, char* err, size_t errlen) {
  return hx::guard(err, errlen, [&] {
    HX_CHECK(stride == 1 || stride == 2, "kconv_int: stride 1 or 2");
    const int z = zlev(bits), isa = resolve(isa_req), cp = cpad(cin);
    const int ho = osize(h, stride), wo = osize(w, stride), opad = opad_of(cout);
    std::vector<uint8_t> buf((size_t)(h + 2) * (w + 2) * cp);
    std::vector<int32_t> acc((size_t)wo * opad);
    KLayer l{};
    l.cin = cin; l.cout = cout; l.opad = opad; l.wk = wk; l.wbias = wbias;
    for (int i = 0; i < n; ++i) {
      fill_border(buf.data(), h, w, cp, z);
      const uint8_t* src = u + (size_t)i * h * w * cin;
      for (int y = 0; y < h; ++y)
        for (int x = 0; x < w; ++x)
          memcpy(&buf[((size_t)(y + 1) * (w + 2) + x + 1) * cp], src + ((size_t)y * w + x) * cin, cin);
      KJob j = kjob(l, buf.data(), h, w, stride, acc.data());
      j.out_int = out + (size_t)i * ho * wo * cout;
      kconv_fn(isa)(j);
    }
  });
}

int hx_kconv_bitserial_int(const uint8_t* u, int n, int h, int wd, int cin, const int8_t* wp, int cout, int bits,
                           int stride, int isa_req, int32_t* out, char* err, size_t errlen) {
  return hx::guard(err, errlen, [&] {
    HX_CHECK(stride == 1 || stride == 2, "bit-serial: stride 1 or 2");
    const int z = zlev(bits), kb = bits, isa = resolve(isa_req, true);
    const int cw = (cin + 63) / 64, colw = (3 * cin + 63) / 64, kw = 3 * colw, opad = (cout + 7) / 8 * 8;
    const int ho = osize(h, stride), wo = osize(wd, stride);
    // weight planes: bit j of r = (w + Z) / 2, packed per column (kx) as 3 taps (ky) x cin channels
    std::vector<uint64_t> wt((size_t)kb * kw * opad, 0);
    std::vector<int64_t> wpopw((size_t)9 * cout, 0);
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
    std::vector<uint64_t> planes((size_t)kb * (h + 2) * (wd + 2) * cw), cols((size_t)kb * (wd + 2) * colw);
    BsJob j{};
    j.h = h; j.w = wd; j.cin = cin; j.cw = cw; j.colw = colw; j.stride = stride; j.ho = ho; j.wo = wo; j.bits = kb;
    j.wt = wt.data(); j.wpopw = wpopw.data(); j.cout = cout; j.opad = opad; j.cols = cols.data();
    for (int i = 0; i < n; ++i) {
      std::fill(planes.begin(), planes.end(), 0);
      bs_pack_fn(isa)(u + (size_t)i * h * wd * cin, h, wd, cin, kb, planes.data());
      j.planes = planes.data();
      j.out = out + (size_t)i * ho * wo * cout;
      bs_fn(isa)(j);
    }
  });
}

}  // extern "C"
