// Kernel equality test of the native edge library through its C ABI only (hx_edge.h), no Python: deterministic
// random inputs and weights in the kernels' layouts (as engines/packed.py and engines/kbit.py lay them out) through
// sign_pack, the binary and k-bit convs (exact integer sums), runs of binary and 4-bit blocks, and the whole edge
// decision, at every ISA level this CPU has.
//
//   hx_selftest --write REF   run at the best levels, write every output to REF (on x86-64: the reference)
//   hx_selftest --check REF   run at EVERY level here, compare with REF: integers exactly, floats within 1e-4
//                             (relative) and decisions exactly; exit 1 on any difference
//
// scripts/edge_arm_check.sh builds it for aarch64 and runs it under qemu-user against the x86-64 reference.
#include "hx_edge.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <string>
#include <vector>

namespace {

struct Rng {
  uint64_t s;
  uint64_t next() {
    s += 0x9e3779b97f4a7c15ull;
    uint64_t z = s;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  float uni(float lo, float hi) { return lo + (hi - lo) * (float)((next() >> 40) * (1.0 / 16777216.0)); }
  int below(int n) { return (int)(next() % (uint64_t)n); }
};

struct Out {
  char kind;  // 'i' exact integers, 'f' floats
  std::vector<int64_t> i;
  std::vector<float> f;
};
using Outs = std::map<std::string, Out>;

void put_i(Outs& o, const std::string& k, const int64_t* p, size_t n) { o[k] = Out{'i', std::vector<int64_t>(p, p + n), {}}; }
void put_f(Outs& o, const std::string& k, const float* p, size_t n) { o[k] = Out{'f', {}, std::vector<float>(p, p + n)}; }

char err[512];
#define OK(call)                                                   \
  do {                                                             \
    if ((call) != 0) {                                             \
      std::fprintf(stderr, "hx_selftest: %s: %s\n", #call, err); \
      std::exit(2);                                                \
    }                                                              \
  } while (0)

std::vector<float> rand_f(Rng& r, size_t n, float lo, float hi) {
  std::vector<float> v(n);
  for (auto& x : v) x = r.uni(lo, hi);
  return v;
}

// A binary conv's weights: wt (kw, opad) words and per-tap popcounts, from random signs (O, C, 3, 3).
struct BinW {
  std::vector<uint64_t> wt;
  std::vector<int32_t> wpop;
  int kw, opad;
};
BinW bin_weights(Rng& r, int o, int c) {
  const int colw = (3 * c + 63) / 64;
  BinW b{std::vector<uint64_t>(), std::vector<int32_t>(9 * o, 0), 3 * colw, (o + 7) / 8 * 8};
  b.wt.assign((size_t)b.kw * b.opad, 0);
  for (int oc = 0; oc < o; ++oc)
    for (int ci = 0; ci < c; ++ci)
      for (int ky = 0; ky < 3; ++ky)
        for (int kx = 0; kx < 3; ++kx)
          if (r.next() & 1) {
            const int bit = ky * c + ci;  // column kx, tap ky, channel ci
            b.wt[(size_t)(kx * colw + bit / 64) * b.opad + oc] |= 1ull << (bit % 64);
            b.wpop[(3 * ky + kx) * o + oc] += 1;
          }
  return b;
}

// A k-bit conv's weights: wk int8 (9, G, opad, 4), wbias (opad), from random levels r (w = 2r - Z).
struct KW {
  std::vector<int8_t> wk;
  std::vector<int32_t> wbias;
};
KW k_weights(Rng& r, int o, int c, int bits) {
  const int z = (1 << bits) - 1, g = (c + 3) / 4, opad = (o + 15) / 16 * 16;
  KW k{std::vector<int8_t>((size_t)9 * g * opad * 4, 0), std::vector<int32_t>(opad, 0)};
  for (int oc = 0; oc < o; ++oc)
    for (int ci = 0; ci < c; ++ci)
      for (int t = 0; t < 9; ++t) {
        const int w = 2 * r.below(z + 1) - z;
        k.wk[(((size_t)t * g + ci / 4) * opad + oc) * 4 + ci % 4] = (int8_t)w;
        k.wbias[oc] -= z * w;
      }
  return k;
}

// Everything a block needs, kept alive.
struct BlockData {
  std::vector<std::vector<float>> f;
  BinW b1, b2;
  KW k1, k2;
};

hx_conv conv_of(BlockData& d, Rng& r, int cin, int cout, int bits, bool second) {
  hx_conv c{};
  auto vec = [&](size_t n, float lo, float hi) {
    d.f.push_back(rand_f(r, n, lo, hi));
    return d.f.back().data();
  };
  c.bn_a = vec(cin, 0.5f, 1.5f);
  c.bn_b = vec(cin, -0.3f, 0.3f);
  c.thr = vec(cin, -0.2f, 0.2f);
  c.rp_g = vec(cout, -0.1f, 0.1f);
  c.rp_b = vec(cout, 0.1f, 0.5f);
  c.rp_z = vec(cout, -0.1f, 0.1f);
  if (bits == 1) {
    BinW& w = second ? d.b2 : d.b1;
    w = bin_weights(r, cout, cin);
    c.w = w.wt.data(); c.wi = w.wpop.data(); c.kw = w.kw; c.opad = w.opad;
    c.scale = vec(cout, 0.01f, 0.05f);
  } else {
    KW& w = second ? d.k2 : d.k1;
    w = k_weights(r, cout, cin, bits);
    c.w = w.wk.data(); c.wi = w.wbias.data();
    c.scale = vec(cout, 0.001f, 0.004f);
  }
  return c;
}

void blocks_of(std::vector<BlockData>& data, std::vector<hx_block>& blocks, Rng& r, int bits) {
  const int spec[3][3] = {{16, 16, 1}, {16, 32, 2}, {32, 32, 1}};
  data.resize(3);
  for (int b = 0; b < 3; ++b) {
    hx_block k{};
    k.cin = spec[b][0]; k.cout = spec[b][1]; k.stride = spec[b][2]; k.bits = bits;
    k.c1 = conv_of(data[b], r, k.cin, k.cout, bits, false);
    k.c2 = conv_of(data[b], r, k.cout, k.cout, bits, true);
    blocks.push_back(k);
  }
}

void run_all(int isa, int kisa, Outs& o) {
  Rng r{20261207};
  const std::string sfx = "";
  {  // sign_pack: (2, 7, 5, 70)
    const int n = 2, h = 7, w = 5, c = 70, cw = 2;
    auto x = rand_f(r, (size_t)n * h * w * c, -1, 1), a = rand_f(r, c, 0.5f, 1.5f), b = rand_f(r, c, -0.2f, 0.2f),
         t = rand_f(r, c, -0.1f, 0.1f);
    std::vector<uint64_t> out((size_t)n * (h + 2) * (w + 2) * cw);
    OK(hx_sign_pack(x.data(), n, h, w, c, a.data(), b.data(), t.data(), isa, out.data(), err, sizeof err));
    std::vector<int64_t> v(out.begin(), out.end());
    put_i(o, "sign_pack", v.data(), v.size());
  }
  const int convs[4][4] = {{40, 24, 9, 1}, {40, 24, 9, 2}, {64, 32, 8, 1}, {100, 72, 6, 2}};  // cin, cout, size, stride
  for (const auto& cv : convs) {  // binary conv: packed random signs -> exact sums
    const int cin = cv[0], cout = cv[1], hw = cv[2], s = cv[3], n = 2, cw = (cin + 63) / 64;
    auto x = rand_f(r, (size_t)n * hw * hw * cin, -1, 1), a = std::vector<float>(cin, 1.0f), b = std::vector<float>(cin, 0.0f);
    std::vector<uint64_t> packed((size_t)n * (hw + 2) * (hw + 2) * cw);
    OK(hx_sign_pack(x.data(), n, hw, hw, cin, a.data(), b.data(), nullptr, isa, packed.data(), err, sizeof err));
    BinW w = bin_weights(r, cout, cin);
    const int ho = (hw - 1) / s + 1;
    std::vector<int32_t> out((size_t)n * ho * ho * cout);
    OK(hx_conv_int(packed.data(), n, hw, hw, cin, w.wt.data(), w.kw, w.opad, w.wpop.data(), cout, s, isa, out.data(),
                   err, sizeof err));
    std::vector<int64_t> v(out.begin(), out.end());
    put_i(o, "conv_int/" + std::to_string(cin) + "x" + std::to_string(cout) + "s" + std::to_string(s), v.data(), v.size());
  }
  for (int bits : {2, 4})
    for (const auto& cv : convs) {  // k-bit conv: activation bytes 2q -> exact sums
      const int cin = cv[0], cout = cv[1], hw = cv[2], s = cv[3], n = 2, z = (1 << bits) - 1;
      std::vector<uint8_t> u((size_t)n * hw * hw * cin);
      for (auto& q : u) q = (uint8_t)(2 * r.below(z + 1));
      KW w = k_weights(r, cout, cin, bits);
      const int ho = (hw - 1) / s + 1;
      std::vector<int32_t> out((size_t)n * ho * ho * cout);
      OK(hx_kconv_int(u.data(), n, hw, hw, cin, w.wk.data(), w.wbias.data(), cout, bits, s, kisa, out.data(), err,
                      sizeof err));
      std::vector<int64_t> v(out.begin(), out.end());
      put_i(o, "kconv_int/" + std::to_string(bits) + "bit/" + std::to_string(cin) + "x" + std::to_string(cout) + "s" +
                   std::to_string(s), v.data(), v.size());
    }
  {  // layout.cpp: artifact -> kernel layouts, BatchNorm folding, wire payloads (exact bytes)
    const int oc = 24, ic = 40;
    std::vector<uint8_t> bits((oc * ic * 9 * 4 + 7) / 8);
    for (auto& b : bits) b = (uint8_t)r.below(256);
    const int colw = (3 * ic + 63) / 64, opad8 = (oc + 7) / 8 * 8, g = (ic + 3) / 4, opad16 = (oc + 15) / 16 * 16;
    std::vector<uint64_t> wt((size_t)3 * colw * opad8);
    std::vector<int32_t> wpop(9 * oc), wbias(opad16);
    std::vector<int8_t> wk((size_t)9 * g * opad16 * 4);
    OK(hx_binary_layout(bits.data(), oc, ic, wt.data(), wpop.data(), err, sizeof err));
    std::vector<int64_t> v(wt.begin(), wt.end());
    v.insert(v.end(), wpop.begin(), wpop.end());
    OK(hx_kbit_layout(bits.data(), oc, ic, 4, wk.data(), wbias.data(), err, sizeof err));
    v.insert(v.end(), wk.begin(), wk.end());
    v.insert(v.end(), wbias.begin(), wbias.end());
    auto w = rand_f(r, 64, 0.5f, 1.5f), b = rand_f(r, 64, -1, 1), mu = rand_f(r, 64, -1, 1), var = rand_f(r, 64, 0.1f, 3);
    std::vector<float> fa(64), fb(64);
    hx_fold_bn(w.data(), b.data(), mu.data(), var.data(), 1e-5f, 64, fa.data(), fb.data());
    for (int i = 0; i < 64; ++i) {  // folded terms bit for bit
      int32_t ia, ib;
      std::memcpy(&ia, &fa[i], 4);
      std::memcpy(&ib, &fb[i], 4);
      v.push_back(ia);
      v.push_back(ib);
    }
    auto feats = rand_f(r, 3 * 5 * 5 * 8, -4, 4);
    feats[7] = 0.0f;
    for (int codec = 1; codec <= 3; ++codec) {
      std::vector<uint8_t> pay(hx_payload_bytes(3, 5, 5, 8, codec));
      OK(hx_encode_features(feats.data(), 3, 5, 5, 8, codec, pay.data(), err, sizeof err));
      v.insert(v.end(), pay.begin(), pay.end());
    }
    put_i(o, "layout+fold+payloads", v.data(), v.size());
  }
  for (int bits : {1, 4}) {  // runs of blocks, then the whole decision with the same blocks
    std::vector<BlockData> data;
    std::vector<hx_block> blocks;
    blocks_of(data, blocks, r, bits);
    const std::string tag = bits == 1 ? "binary" : "4bit";
    const int n = 6, hw = 12;
    auto x = rand_f(r, (size_t)n * hw * hw * 16, -2, 2);
    std::vector<float> out((size_t)n * 6 * 6 * 32);
    OK(hx_run_blocks(blocks.data(), 3, x.data(), n, hw, hw, 16, isa, kisa, nullptr, out.data(), err, sizeof err));
    put_f(o, "run_blocks/" + tag, out.data(), out.size());

    auto mean = rand_f(r, 3, 0.4f, 0.6f), stdv = rand_f(r, 3, 0.2f, 0.3f), stem = rand_f(r, 9 * 3 * 16, -0.5f, 0.5f);
    std::vector<std::vector<float>> hv;
    auto vec = [&](size_t k, float lo, float hi) {
      hv.push_back(rand_f(r, k, lo, hi));
      return hv.back().data();
    };
    hx_head heads[2] = {};
    heads[0].bn_a = vec(16, 0.5f, 1.5f); heads[0].bn_b = vec(16, -0.2f, 0.2f); heads[0].pool = 3; heads[0].hidden = 0;
    heads[0].w2 = vec((size_t)10 * 16 * 16, -0.3f, 0.3f); heads[0].b2 = vec(10, -0.1f, 0.1f); heads[0].classes = 10;
    heads[1].bn_a = vec(32, 0.5f, 1.5f); heads[1].bn_b = vec(32, -0.2f, 0.2f); heads[1].pool = 0; heads[1].hidden = 8;
    heads[1].w1 = vec(8 * 32, -0.5f, 0.5f); heads[1].h_a = vec(8, 0.5f, 1.5f); heads[1].h_b = vec(8, -0.1f, 0.1f);
    heads[1].w2 = vec(10 * 8, -0.5f, 0.5f); heads[1].b2 = vec(10, -0.1f, 0.1f); heads[1].classes = 10;
    const int exit_end[2] = {1, 2};
    hx_edge e{3, hw, hw, mean.data(), stdv.data(), stem.data(), 16, 3, blocks.data(), 2, exit_end, heads};
    const int m = 64;
    std::vector<uint8_t> img((size_t)m * 3 * hw * hw);
    for (auto& p : img) p = (uint8_t)r.below(256);
    std::vector<int64_t> preds(m), dec(m), rem(m);
    std::vector<float> ents(m * 2), feats((size_t)m * 6 * 6 * 32);
    int nr = 0;
    const float none[2] = {0.0f, 0.0f}, temps[2] = {1.0f, 1.5f};
    OK(hx_decide(&e, img.data(), 1, m, none, temps, isa, kisa, nullptr, preds.data(), dec.data(), ents.data(),
                 feats.data(), rem.data(), &nr, err, sizeof err));
    // thresholds at the median entropies of the first pass, rounded to 1e-3 (a rule every machine applies alike)
    float thr[2];
    for (int k = 0; k < 2; ++k) {
      std::vector<float> v;
      for (int i = 0; i < m; ++i)
        if (k == 0 || ents[i * 2] >= thr[0]) v.push_back(ents[i * 2 + k]);
      std::sort(v.begin(), v.end());
      thr[k] = std::round(v[v.size() / 2] * 1000.0f) / 1000.0f;
    }
    OK(hx_decide(&e, img.data(), 1, m, thr, temps, isa, kisa, nullptr, preds.data(), dec.data(), ents.data(),
                 feats.data(), rem.data(), &nr, err, sizeof err));
    int routes[3] = {0, 0, 0};
    for (int i = 0; i < m; ++i) ++routes[dec[i] + 1];
    std::printf("decide/%s: thresholds %.3f %.3f: %d to the cloud, %d at exit 0, %d at exit 1\n", tag.c_str(), thr[0],
                thr[1], routes[0], routes[1], routes[2]);
    put_i(o, "decide/" + tag + "/predictions", preds.data(), m);
    put_i(o, "decide/" + tag + "/decided_at", dec.data(), m);
    put_i(o, "decide/" + tag + "/remaining", rem.data(), nr);
    put_f(o, "decide/" + tag + "/entropies", ents.data(), ents.size());
    put_f(o, "decide/" + tag + "/features", feats.data(), (size_t)nr * 6 * 6 * 32);
  }
}

bool write(const Outs& o, const char* path) {
  FILE* f = std::fopen(path, "wb");
  if (!f) return false;
  for (const auto& [k, v] : o) {
    const uint32_t kl = (uint32_t)k.size();
    const uint64_t n = v.kind == 'i' ? v.i.size() : v.f.size();
    std::fwrite(&kl, 4, 1, f);
    std::fwrite(k.data(), 1, kl, f);
    std::fwrite(&v.kind, 1, 1, f);
    std::fwrite(&n, 8, 1, f);
    if (v.kind == 'i') std::fwrite(v.i.data(), 8, n, f);
    else std::fwrite(v.f.data(), 4, n, f);
  }
  return std::fclose(f) == 0;
}

bool read(Outs& o, const char* path) {
  FILE* f = std::fopen(path, "rb");
  if (!f) return false;
  uint32_t kl;
  while (std::fread(&kl, 4, 1, f) == 1) {
    std::string k(kl, '\0');
    Out v{};
    uint64_t n = 0;
    if (std::fread(&k[0], 1, kl, f) != kl || std::fread(&v.kind, 1, 1, f) != 1 || std::fread(&n, 8, 1, f) != 1) break;
    if (v.kind == 'i') {
      v.i.resize(n);
      if (std::fread(v.i.data(), 8, n, f) != n) break;
    } else {
      v.f.resize(n);
      if (std::fread(v.f.data(), 4, n, f) != n) break;
    }
    o[k] = v;
  }
  std::fclose(f);
  return !o.empty();
}

int compare(const Outs& ref, const Outs& got, const char* level) {
  int bad = 0;
  for (const auto& [k, r] : ref) {
    auto it = got.find(k);
    if (it == got.end()) {
      std::printf("MISSING  %-34s %s\n", k.c_str(), level);
      ++bad;
      continue;
    }
    const Out& g = it->second;
    size_t diff = 0, n = r.kind == 'i' ? r.i.size() : r.f.size();
    double worst = 0;
    if ((r.kind == 'i' ? g.i.size() : g.f.size()) != n) {
      diff = n ? n : 1;
    } else if (r.kind == 'i') {
      for (size_t j = 0; j < n; ++j)
        if (r.i[j] != g.i[j] && ++diff <= 3)
          std::printf("  %s[%zu]: %lld here, %lld in the reference\n", k.c_str(), j, (long long)g.i[j], (long long)r.i[j]);
    } else {
      for (size_t j = 0; j < n; ++j) {
        const double d = std::fabs((double)r.f[j] - g.f[j]), tol = 1e-4 * (1.0 + std::fabs((double)r.f[j]));
        worst = std::max(worst, d);
        diff += !(d <= tol) && !(std::isnan(r.f[j]) && std::isnan(g.f[j]));
      }
    }
    std::printf("%s %-34s %s  %zu values%s", diff ? "DIFF" : "ok  ", k.c_str(), level, n, r.kind == 'i' ? " exact" : "");
    if (r.kind == 'f') std::printf(", max |diff| %.2g", worst);
    if (diff) std::printf(", %zu differ", diff);
    std::printf("\n");
    bad += diff != 0;
  }
  return bad;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3 || (std::strcmp(argv[1], "--write") && std::strcmp(argv[1], "--check"))) {
    std::fprintf(stderr, "usage: hx_selftest --write REF | --check REF\n");
    return 2;
  }
  std::printf("hx_selftest: %s, ABI %d, best levels: %s (binary, float parts), %s (k-bit)\n", hx_arch(),
              hx_abi_version(), hx_isa_name(hx_best_isa()), hx_kbit_isa_name(hx_kbit_best_isa()));
  if (!std::strcmp(argv[1], "--write")) {
    Outs o;
    run_all(-1, -1, o);
    if (!write(o, argv[2])) return 2;
    std::printf("wrote %zu outputs to %s\n", o.size(), argv[2]);
    return 0;
  }
  Outs ref;
  if (!read(ref, argv[2])) {
    std::fprintf(stderr, "hx_selftest: cannot read %s\n", argv[2]);
    return 2;
  }
  int bad = 0;
  const int top = hx_best_isa() > hx_kbit_best_isa() ? hx_best_isa() : hx_kbit_best_isa();
  for (int l = 0; l <= top; ++l) {  // every level: each kind of block at min(l, its best)
    const int isa = l < hx_best_isa() ? l : hx_best_isa(), kisa = l < hx_kbit_best_isa() ? l : hx_kbit_best_isa();
    Outs got;
    run_all(isa, kisa, got);
    char level[96];
    std::snprintf(level, sizeof level, "[%s / %s]", hx_isa_name(isa), hx_kbit_isa_name(kisa));
    bad += compare(ref, got, level);
  }
  std::printf("%s: %d difference(s) against %s\n", bad ? "FAILED" : "PASSED", bad, argv[2]);
  return bad ? 1 : 0;
}
