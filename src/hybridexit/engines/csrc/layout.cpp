// Artifact -> kernel layouts, BatchNorm folding and the wire payloads of feature batches, on plain pointers (C ABI
// in hx_edge.h): what a host without numpy (hybridexit-edge) needs around the kernels. Every function is the exact
// arithmetic of its numpy / torch counterpart in the main package (engines/packed.py kernel_weights,
// engines/kbit.py kernel_kweights, engines/folding.py fold_bn, runtime/wire.py encode), so the bytes agree.
#include "hx_internal.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

inline int bit_at(const uint8_t* p, size_t k) { return (p[k >> 3] >> (k & 7)) & 1; }  // little bit order

uint16_t to_half(float f) {
  // float32 -> IEEE binary16, round to nearest even (as numpy's astype(float16) and torch's half())
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t mant = x & 0x7fffffu;
  const int32_t exp = (int32_t)((x >> 23) & 0xffu);
  if (exp == 0xff) return (uint16_t)(sign | 0x7c00u | (mant ? 0x200u | (mant >> 13) : 0u));
  const int32_t e = exp - 127 + 15;
  if (e >= 0x1f) return (uint16_t)(sign | 0x7c00u);
  if (e <= 0) {
    if (e < -10) return (uint16_t)sign;
    mant |= 0x800000u;
    const int shift = 14 - e;
    uint32_t h = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (h & 1u))) ++h;
    return (uint16_t)(sign | h);
  }
  uint32_t h = ((uint32_t)e << 10) | (mant >> 13);
  const uint32_t rem = mant & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return (uint16_t)(sign | h);
}

}  // namespace

extern "C" {

int hx_binary_layout(const uint8_t* bits, int o, int c, uint64_t* wt, int32_t* wpop, char* err, size_t errlen) {
  return hx::guard(err, errlen, [&] {
    HX_CHECK(o >= 1 && c >= 1, "binary layout: at least one channel in and out");
    const int colw = (3 * c + 63) / 64, kw = 3 * colw, opad = (o + 7) / 8 * 8;
    std::memset(wt, 0, (size_t)kw * opad * sizeof(uint64_t));
    std::memset(wpop, 0, (size_t)9 * o * sizeof(int32_t));
    for (int oc = 0; oc < o; ++oc)
      for (int ci = 0; ci < c; ++ci)
        for (int ky = 0; ky < 3; ++ky)
          for (int kx = 0; kx < 3; ++kx)
            if (bit_at(bits, (((size_t)oc * c + ci) * 3 + ky) * 3 + kx)) {
              const int b = ky * c + ci;  // column kx holds tap ky, channel ci at bit ky C + ci
              wt[(size_t)(kx * colw + b / 64) * opad + oc] |= 1ull << (b % 64);
              wpop[(3 * ky + kx) * o + oc] += 1;
            }
  });
}

int hx_kbit_layout(const uint8_t* levels, int o, int c, int bits, int8_t* wk, int32_t* wbias, char* err,
                   size_t errlen) {
  return hx::guard(err, errlen, [&] {
    HX_CHECK(bits == 2 || bits == 4, "k-bit engine: bits must be 2 or 4, got ", bits);
    HX_CHECK(o >= 1 && c >= 1, "k-bit layout: at least one channel in and out");
    const int z = (1 << bits) - 1, g = (c + 3) / 4, opad = (o + 15) / 16 * 16;
    std::memset(wk, 0, (size_t)9 * g * opad * 4);
    std::memset(wbias, 0, (size_t)opad * sizeof(int32_t));
    for (int oc = 0; oc < o; ++oc)
      for (int ci = 0; ci < c; ++ci)
        for (int t = 0; t < 9; ++t) {
          const size_t k = ((size_t)oc * c + ci) * 9 + t;
          int r = 0;
          for (int b = 0; b < bits; ++b) r |= bit_at(levels, k * bits + b) << b;
          const int w = 2 * r - z;
          wk[(((size_t)t * g + ci / 4) * opad + oc) * 4 + ci % 4] = (int8_t)w;
          wbias[oc] -= z * w;
        }
  });
}

void hx_fold_bn(const float* weight, const float* bias, const float* mean, const float* var, float eps, int n,
                float* a, float* b) {
  // a = rsqrt(var + eps) * weight in float32, b = bias - mean * a in float64 (engines/folding.py)
  for (int i = 0; i < n; ++i) {
    a[i] = (1.0f / std::sqrt(var[i] + eps)) * weight[i];
    b[i] = (float)((double)bias[i] - (double)mean[i] * (double)a[i]);
  }
}

size_t hx_payload_bytes(int r, int h, int w, int c, int codec) {
  const size_t n = (size_t)r * h * w * c;
  return codec == 1 ? 4 * n : codec == 2 ? 2 * n : codec == 3 ? n + 4 * (size_t)r * c : 0;
}

int hx_encode_features(const float* x, int r, int h, int w, int c, int codec, uint8_t* out, char* err,
                       size_t errlen) {
  // x: (r, h, w, c) channels last -> the payload of a (r, c, h, w) frame (runtime/wire.py): fp32 (codec 1) or fp16
  // (2) elements in C order, or int8 (3): one float32 scale per (sample, channel) = max |x| / 127, then
  // q = clip(round_half_even(x / scale), -127, 127) (scale 0: q = 0).
  return hx::guard(err, errlen, [&] {
    HX_CHECK(codec >= 1 && codec <= 3, "codec ", codec, ": 1 fp32, 2 fp16, 3 int8");
    const size_t hw = (size_t)h * w;
    if (codec == 3) {
      float* scales = reinterpret_cast<float*>(out);
      int8_t* q = reinterpret_cast<int8_t*>(out + 4 * (size_t)r * c);
      for (int s = 0; s < r; ++s)
        for (int ch = 0; ch < c; ++ch) {
          const float* p = x + (size_t)s * hw * c + ch;
          float mx = 0.0f;
          for (size_t i = 0; i < hw; ++i) mx = std::max(mx, std::fabs(p[i * c]));
          const float scale = mx / 127.0f, safe = scale > 0.0f ? scale : 1.0f;
          std::memcpy(out + 4 * ((size_t)s * c + ch), &scale, 4);
          int8_t* d = q + ((size_t)s * c + ch) * hw;
          for (size_t i = 0; i < hw; ++i) {
            const float v = std::nearbyint(p[i * c] / safe);
            d[i] = (int8_t)(v < -127.0f ? -127.0f : v > 127.0f ? 127.0f : v);
          }
        }
      (void)scales;
      return;
    }
    for (int s = 0; s < r; ++s)
      for (int ch = 0; ch < c; ++ch)
        for (size_t i = 0; i < hw; ++i) {
          const float v = x[((size_t)s * hw + i) * c + ch];
          const size_t k = ((size_t)s * c + ch) * hw + i;
          if (codec == 1) {
            std::memcpy(out + 4 * k, &v, 4);
          } else {
            const uint16_t hv = to_half(v);
            std::memcpy(out + 2 * k, &hv, 2);
          }
        }
  });
}

}  // extern "C"
