// hybridexit packed binary engine: bit-packed XNOR-popcount 3x3 convolutions for the binary edge half (torch-free
// core; the C ABI is hx_edge.h, the torch extension's binding torch_binding.cpp).
//
// Activations are packed along channels, 64 per word, in a zero-bordered (h + 2, w + 2, cw) buffer per image.
// For each output row, every input column's three taps (rows oy*s-1 .. oy*s+1) are packed tight into colw =
// ceil(3 cin / 64) words; three consecutive columns are then an output pixel's receptive field, read in place.
// Each output channel's sign(W) is a bit vector of the same layout (kx-major, then ky, then channel), stored
// transposed ([word][output channel]) so that one broadcast input word is xor-ed with 8 output channels at once.
// sum = n_valid - 2 * popcount(mismatches over valid taps) is the exact integer product of the +-1 values,
// with the zero padding of training (padded taps contribute 0). Epilogues: the per-channel scale, the folded
// BatchNorm + sign + pack of the next conv's input (conv 1 of a block), or scale + float residual add
// (+ the next block's BatchNorm + sign + pack) for conv 2. ISA chosen at run time (see bconv_isa.inc): x86-64
// AVX-512 VPOPCNTDQ / AVX-512BW / AVX2 / portable, aarch64 NEON (vcnt) / portable.
#include "hx_internal.h"

#if HX_X86
#include <immintrin.h>
#elif HX_ARM64
#include <arm_neon.h>
#include <sys/auxv.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

using ExitHeadSpec = hx_head;

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

#if HX_X86
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


#endif

namespace hx_isa0 {
#define HX_ISA 0
#include "bconv_isa.inc"
#undef HX_ISA
}  // namespace hx_isa0

#if HX_ARM64
namespace hx_neon {
#define HX_ISA 0
#define HX_NEON 1
#include "bconv_isa.inc"
#undef HX_NEON
#undef HX_ISA
}  // namespace hx_neon
#endif

namespace {

using ConvFn = void (*)(const ConvJob&);
using PackFn = void (*)(const float*, int, int, int, const float*, const float*, const float*, uint64_t*);

#if HX_X86
const char* kIsaNames[] = {"portable", "avx2", "avx512bw", "avx512vpopcntdq"};
#define HX_PER_ISA(fn) {hx_isa0::fn, hx_isa1::fn, hx_isa2::fn, hx_isa3::fn}
#elif HX_ARM64
const char* kIsaNames[] = {"portable", "neon"};
#define HX_PER_ISA(fn) {hx_isa0::fn, hx_neon::fn}
#else
const char* kIsaNames[] = {"portable"};
#define HX_PER_ISA(fn) {hx_isa0::fn}
#endif

int best_level() {
#if HX_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq")) {
    return __builtin_cpu_supports("avx512vpopcntdq") ? 3 : 2;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("popcnt")) return 1;
  return 0;
#elif HX_ARM64
  return (getauxval(AT_HWCAP) & HWCAP_ASIMD) ? 1 : 0;  // Advanced SIMD: vcnt popcounts, fused multiply-adds
#else
  return 0;
#endif
}

ConvFn conv_fn(int isa) { static const ConvFn f[] = HX_PER_ISA(conv_image); return f[isa]; }
PackFn pack_fn(int isa) { static const PackFn f[] = HX_PER_ISA(sign_pack_image); return f[isa]; }

using hx::words;
using hx::out_size;

void check_conv(const hx_conv& c, int cin, int cout, const char* what) {
  HX_CHECK(c.w && c.wi && c.scale && c.bn_a && c.bn_b, what, ": weights, popcounts, scale and BatchNorm are required");
  HX_CHECK(c.kw == 3 * words(3 * cin) && c.opad % 8 == 0 && c.opad >= cout, "weight words do not fit cin/cout");
  HX_CHECK((c.rp_g == nullptr) == (c.rp_b == nullptr) && (c.rp_g == nullptr) == (c.rp_z == nullptr),
           "RPReLU: gamma, beta, zeta all given or all empty");
}

ConvJob job_for(const hx_conv& l, int cin, int cout, const uint64_t* in, int h, int w, int stride, uint64_t* rf,
                int32_t* pops, float* y) {
  ConvJob j{};
  j.in = in;
  j.h = h; j.w = w; j.cin = cin; j.cwi = words(cin); j.stride = stride;
  j.ho = out_size(h, stride); j.wo = out_size(w, stride); j.cout = cout;
  j.wt = static_cast<const uint64_t*>(l.w);
  j.kw = l.kw; j.opad = l.opad;
  j.wpop = l.wi;
  j.alpha = l.scale;
  j.rf = rf; j.pops = pops; j.y = y;
  return j;
}

struct Scratch {
  std::vector<uint64_t> pa, pb, rf;
  std::vector<float> fa, fb, y;
  std::vector<int32_t> pops;
};

// A run of binary residual blocks; images are processed one at a time (run_image), channels last.
struct BinaryRun {
  const hx_block* blk;
  std::vector<int> hs, ws;
  int nb = 0, maxp = 0, maxf = 0, maxkw = 0, maxo = 0;
  ConvFn conv;
  PackFn pack;

  BinaryRun(const hx_block* blocks, int n_blocks, int h, int w, int c, int isa) : blk(blocks), nb(n_blocks) {
    HX_CHECK(nb >= 1, "binary blocks: at least one block");
    conv = conv_fn(isa);
    pack = pack_fn(isa);
    hs.push_back(h); ws.push_back(w);
    for (int b = 0; b < nb; ++b) {
      const hx_block& k = blk[b];
      const int ci = k.cin, co = k.cout, s = k.stride;
      HX_CHECK(k.bits == 1, "binary blocks: block ", b, " has ", k.bits, "-bit convs");
      HX_CHECK(b > 0 || ci == c, "binary blocks: input has ", c, " channels, block 0 expects ", ci);
      HX_CHECK(b == 0 || ci == blk[b - 1].cout, "binary blocks: block ", b, " input channels do not chain");
      HX_CHECK(co >= ci, "binary blocks: option-A shortcut needs cout >= cin");
      HX_CHECK(s == 1 || s == 2, "binary blocks: stride 1 or 2");
      check_conv(k.c1, ci, co, "conv 1");
      check_conv(k.c2, co, co, "conv 2");
      maxp = std::max({maxp, (h + 2) * (w + 2) * words(ci)});
      maxf = std::max(maxf, h * w * ci);
      const int w0 = w;
      h = out_size(h, s); w = out_size(w, s);
      hs.push_back(h); ws.push_back(w);
      maxp = std::max(maxp, (h + 2) * (w + 2) * words(co));
      maxf = std::max(maxf, h * w * co);
      maxkw = std::max({maxkw, (w0 + 2) * k.c1.kw / 3, (w + 2) * k.c2.kw / 3});
      maxo = std::max({maxo, k.c1.opad, k.c2.opad});
    }
  }

  int out_h() const { return hs.back(); }
  int out_w() const { return ws.back(); }
  int out_c() const { return blk[nb - 1].cout; }

  void scratch(Scratch& s) const {
    s.pa.assign(maxp, 0); s.pb.assign(maxp, 0); s.rf.assign(maxkw, 0);
    s.fa.assign(maxf, 0.f); s.fb.assign(maxf, 0.f); s.y.assign(maxo, 0.f); s.pops.assign(maxo, 0);
  }

  // One image: in (hs[0], ws[0], cin[0]) float -> out (out_h, out_w, out_c) float; in and out may not alias.
  void run_image(const float* in, float* out, Scratch& s) const {
    const float* cur = in;
    std::fill(s.pa.begin(), s.pa.end(), 0);
    pack(cur, hs[0], ws[0], blk[0].cin, blk[0].c1.bn_a, blk[0].c1.bn_b, blk[0].c1.thr, s.pa.data());
    for (int b = 0; b < nb; ++b) {
      const hx_block& k = blk[b];
      // conv 1: input bits in pa; epilogue = scale, [RPReLU], BatchNorm 2, [RSign threshold], sign, pack into pb
      std::fill(s.pb.begin(), s.pb.end(), 0);
      ConvJob j1 = job_for(k.c1, k.cin, k.cout, s.pa.data(), hs[b], ws[b], k.stride, s.rf.data(), s.pops.data(),
                           s.y.data());
      j1.out_packed = s.pb.data();
      j1.rp_g = k.c1.rp_g; j1.rp_b = k.c1.rp_b; j1.rp_z = k.c1.rp_z;
      j1.next_a = k.c2.bn_a; j1.next_b = k.c2.bn_b; j1.next_t = k.c2.thr;
      conv(j1);
      // conv 2: input bits in pb; epilogue = scale, [RPReLU], residual (float), next block's BatchNorm 1, sign, pack
      float* dst = b + 1 == nb ? out : (cur == s.fa.data() ? s.fb.data() : s.fa.data());
      ConvJob j2 = job_for(k.c2, k.cout, k.cout, s.pb.data(), hs[b + 1], ws[b + 1], 1, s.rf.data(), s.pops.data(),
                           s.y.data());
      j2.rp_g = k.c2.rp_g; j2.rp_b = k.c2.rp_b; j2.rp_z = k.c2.rp_z;
      j2.res = cur; j2.res_w = ws[b]; j2.res_c = k.cin; j2.res_pad = (k.cout - k.cin) / 2; j2.res_stride = k.stride;
      j2.out_float = dst;
      if (b + 1 < nb) {
        std::fill(s.pa.begin(), s.pa.end(), 0);
        j2.out_packed = s.pa.data();
        j2.next_a = blk[b + 1].c1.bn_a; j2.next_b = blk[b + 1].c1.bn_b; j2.next_t = blk[b + 1].c1.thr;
      }
      conv(j2);
      cur = dst;
    }
  }
};

}  // namespace

namespace hx {

int resolve_isa(int requested) {
  const int best = best_level();
  if (requested < 0) return best;
  const int top = (int)(sizeof(kIsaNames) / sizeof(kIsaNames[0])) - 1;
  HX_CHECK(requested <= best, "ISA level ", requested, " (", kIsaNames[requested < top ? requested : top],
           ") is not supported by this CPU (best: ", kIsaNames[best], ")");
  return requested;
}

NormFn norm_fn(int isa) { static const NormFn f[] = HX_PER_ISA(normalize_image); return f[isa]; }
StemFn stem_fn(int isa) { static const StemFn f[] = HX_PER_ISA(stem_image); return f[isa]; }
HeadFn head_fn(int isa) { static const HeadFn f[] = HX_PER_ISA(exit_head_image); return f[isa]; }

void run_binary(const hx_block* blocks, int nb, const float* x, int n, int h, int w, int c, int isa,
                hx_parallel_fn par, float* out) {
  const BinaryRun run(blocks, nb, h, w, c, resolve_isa(isa));
  const size_t in_img = (size_t)h * w * c, out_img = (size_t)run.out_h() * run.out_w() * run.out_c();
  auto body = [&](int64_t lo, int64_t hi) {
    Scratch s;
    run.scratch(s);
    for (int64_t i = lo; i < hi; ++i) run.run_image(x + i * in_img, out + i * out_img, s);
  };
  parallel(par, n, body);
}

}  // namespace hx

extern "C" {

int hx_best_isa(void) { return best_level(); }

const char* hx_isa_name(int level) {
  return level >= 0 && level < (int)(sizeof(kIsaNames) / sizeof(kIsaNames[0])) ? kIsaNames[level] : nullptr;
}

const char* hx_arch(void) { return HX_X86 ? "x86_64" : HX_ARM64 ? "aarch64" : "other"; }

int hx_sign_pack(const float* x, int n, int h, int w, int c, const float* a, const float* b, const float* t, int isa,
                 uint64_t* out, char* err, size_t errlen) {
  return hx::guard(err, errlen, [&] {
    HX_CHECK(n >= 0 && h >= 1 && w >= 1 && c >= 1, "sign_pack: (N, H, W, C) with H, W, C >= 1");
    const PackFn fn = pack_fn(hx::resolve_isa(isa));
    const size_t img = (size_t)(h + 2) * (w + 2) * words(c);
    std::memset(out, 0, (size_t)n * img * sizeof(uint64_t));
    for (int i = 0; i < n; ++i) fn(x + (size_t)i * h * w * c, h, w, c, a, b, t, out + (size_t)i * img);
  });
}

int hx_conv_int(const uint64_t* packed, int n, int h, int w, int cin, const uint64_t* wt, int kw, int opad,
                const int32_t* wpop, int cout, int stride, int isa, int32_t* out, char* err, size_t errlen) {
  return hx::guard(err, errlen, [&] {
    HX_CHECK(kw == 3 * words(3 * cin) && opad % 8 == 0 && opad >= cout, "weight words do not fit cin/cout");
    HX_CHECK(stride == 1 || stride == 2, "conv_int: stride 1 or 2");
    const ConvFn fn = conv_fn(hx::resolve_isa(isa));
    std::vector<float> ones(cout, 1.0f), y(cout);
    hx_conv l{};
    l.w = wt; l.wi = wpop; l.scale = ones.data(); l.kw = kw; l.opad = opad;
    const int ho = out_size(h, stride), wo = out_size(w, stride);
    std::vector<uint64_t> rf((size_t)(w + 2) * kw / 3);
    std::vector<int32_t> pops(opad);
    for (int i = 0; i < n; ++i) {
      ConvJob j = job_for(l, cin, cout, packed + (size_t)i * (h + 2) * (w + 2) * words(cin), h, w, stride, rf.data(),
                          pops.data(), y.data());
      j.out_int = out + (size_t)i * ho * wo * cout;
      fn(j);
    }
  });
}

}  // extern "C"
