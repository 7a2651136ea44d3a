// The whole edge decision (Algorithm 1) in one call, torch-free (C ABI in hx_edge.h): normalization, float stem,
// the quantized blocks (bconv.cpp binary, kbit.cpp k-bit), each exit head, the softmax entropy and the exit rule;
// the samples that exit leave the batch, the others go on, and the features of those left are returned.
#include "hx_internal.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using hx::out_size;

void run_range(const hx_block* blocks, int nb, const float* x, int n, int h, int w, int c, int isa, int kisa,
               hx_parallel_fn par, float* out) {
  if (blocks[0].bits == 1) {
    hx::run_binary(blocks, nb, x, n, h, w, c, isa, par, out);
  } else {
    hx::run_kbit(blocks, nb, x, n, h, w, c, kisa, par, out);
  }
}

void check_head(const hx_head& hd, int c, int h, int w) {
  HX_CHECK(hd.bn_a && hd.bn_b && hd.w2 && hd.b2 && hd.classes >= 1, "exit head: BatchNorm terms and a final linear");
  HX_CHECK(hd.pool == 0 || (hd.pool <= h && hd.pool <= w), "exit head: pool kernel larger than the features");
  HX_CHECK(hd.pool == 0 || h == w, "exit head: square features expected");
  HX_CHECK(hd.hidden == 0 || (hd.w1 && hd.h_a && hd.h_b), "exit head: hidden linear and its BatchNorm terms");
  (void)c;
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

// The decision's float feature buffers, kept per thread from call to call (grow only): a batch's buffers are
// megabytes, and allocating them anew each call costs page faults that depend on the host process's allocator.
struct Workspace {
  std::vector<float> h, next;
};

Workspace& workspace() {
  static thread_local Workspace w;
  return w;
}

void check_edge(const hx_edge* e) {
  HX_CHECK(e && e->c >= 1 && e->h >= 1 && e->w >= 1 && e->c0 >= 1, "decide: an edge with (C, H, W) inputs and a stem");
  HX_CHECK(e->mean && e->std && e->stem, "decide: prologue = mean, std, stem weights");
  HX_CHECK(e->n_blocks >= 1 && e->blocks, "decide: an edge with quantized blocks");
  HX_CHECK(e->n_exits >= 0 && (e->n_exits == 0 || (e->exit_end && e->heads)), "decide: exits without heads");
  const bool binary = e->blocks[0].bits == 1;
  for (int b = 0; b < e->n_blocks; ++b)
    HX_CHECK((e->blocks[b].bits == 1) == binary, "decide: binary and k-bit blocks mixed in one edge");
  for (int k = 0; k < e->n_exits; ++k)
    HX_CHECK(e->exit_end[k] >= 0 && e->exit_end[k] <= e->n_blocks && (k == 0 || e->exit_end[k] >= e->exit_end[k - 1]),
             "decide: exit ", k, " after block ", e->exit_end[k], " does not fit the edge's ", e->n_blocks, " blocks");
}

}  // namespace

namespace hx {

void blocks_shape(const hx_block* blocks, int nb, int h, int w, int c, int* ho, int* wo, int* co) {
  for (int b = 0; b < nb; ++b) {
    HX_CHECK(blocks[b].cin == c, "blocks: block ", b, " expects ", blocks[b].cin, " channels, gets ", c);
    HX_CHECK(blocks[b].stride == 1 || blocks[b].stride == 2, "blocks: stride 1 or 2");
    h = out_size(h, blocks[b].stride);
    w = out_size(w, blocks[b].stride);
    c = blocks[b].cout;
  }
  *ho = h; *wo = w; *co = c;
}

}  // namespace hx

extern "C" {

int hx_abi_version(void) { return HX_EDGE_ABI_VERSION; }

int hx_blocks_out_shape(const hx_block* blocks, int nb, int h, int w, int* ho, int* wo, int* co, char* err,
                        size_t errlen) {
  return hx::guard(err, errlen, [&] {
    HX_CHECK(nb >= 1, "blocks: at least one block");
    hx::blocks_shape(blocks, nb, h, w, blocks[0].cin, ho, wo, co);
  });
}

int hx_run_blocks(const hx_block* blocks, int nb, const float* x, int n, int h, int w, int c, int isa, int kisa,
                  hx_parallel_fn par, float* out, char* err, size_t errlen) {
  return hx::guard(err, errlen, [&] {
    HX_CHECK(nb >= 1 && blocks, "blocks: at least one block");
    run_range(blocks, nb, x, n, h, w, c, isa, kisa, par, out);
  });
}

int hx_edge_feature_shape(const hx_edge* e, int* h, int* w, int* c, char* err, size_t errlen) {
  return hx::guard(err, errlen, [&] {
    check_edge(e);
    hx::blocks_shape(e->blocks, e->n_blocks, e->h, e->w, e->c0, h, w, c);
  });
}

int hx_decide(const hx_edge* e, const void* x, int x_u8, int n, const float* thresholds, const float* temperatures,
              int isa_req, int kisa, hx_parallel_fn par, int64_t* preds, int64_t* decided, float* ents, float* feats,
              int64_t* remaining, int* n_remaining, char* err, size_t errlen) {
  return hx::guard(err, errlen, [&] {
    check_edge(e);
    const int isa = hx::resolve_isa(isa_req);
    if (e->blocks[0].bits != 1) hx::resolve_kisa(kisa);
    const int K = e->n_exits, c = e->c, H = e->h, W = e->w, c0 = e->c0;
    int fh, fw, fc;
    hx::blocks_shape(e->blocks, e->n_blocks, H, W, c0, &fh, &fw, &fc);
    Workspace& ws = workspace();
    std::vector<float>& h = ws.h;
    std::vector<float>& next = ws.next;
    h.resize((size_t)n * H * W * c0);
    {
      const hx::NormFn norm = hx::norm_fn(isa);
      const hx::StemFn stem = hx::stem_fn(isa);
      const size_t in_img = (size_t)c * H * W, elt = x_u8 ? 1 : 4;
      const char* src = static_cast<const char*>(x);
      float* dst = h.data();
      auto body = [&](int64_t lo, int64_t hi) {
        std::vector<float> buf(in_img);
        for (int64_t i = lo; i < hi; ++i) {
          norm(src + i * in_img * elt, x_u8 != 0, c, H, W, e->mean, e->std, buf.data());
          stem(buf.data(), H, W, c, e->stem, c0, dst + i * (size_t)H * W * c0);
        }
      };
      hx::parallel(par, n, body);
    }
    for (int i = 0; i < n; ++i) {
      preds[i] = -1;
      decided[i] = -1;
    }
    for (size_t i = 0; i < (size_t)n * K; ++i) ents[i] = NAN;
    std::vector<int64_t> idx(n);
    for (int i = 0; i < n; ++i) idx[i] = i;
    const hx::HeadFn headf = hx::head_fn(isa);
    int hh = H, ww = W, cc = c0, b0 = 0;
    for (int k = 0; k < K && !idx.empty(); ++k) {
      const int r = (int)idx.size(), b1 = e->exit_end[k];
      if (b1 > b0) {
        int ho, wo, co;
        hx::blocks_shape(e->blocks + b0, b1 - b0, hh, ww, cc, &ho, &wo, &co);
        next.resize((size_t)r * ho * wo * co);
        run_range(e->blocks + b0, b1 - b0, h.data(), r, hh, ww, cc, isa, kisa, par, next.data());
        h.swap(next);
        hh = ho; ww = wo; cc = co; b0 = b1;
      }
      const hx_head& hd = e->heads[k];
      check_head(hd, cc, hh, ww);
      const size_t img = (size_t)hh * ww * cc;
      std::vector<uint8_t> stop(r);
      const float thr = thresholds[k], temp = temperatures ? temperatures[k] : 1.0f;
      auto body = [&](int64_t lo, int64_t hi) {
        std::vector<float> scratch((size_t)cc * hh * ww + hd.hidden + 1), logits(hd.classes), buf(hd.classes);
        for (int64_t i = lo; i < hi; ++i) {
          headf(h.data() + i * img, hh, ww, cc, hd, scratch.data(), logits.data());
          const float en = entropy_of(logits.data(), hd.classes, temp, buf.data());
          const int64_t g = idx[i];
          ents[g * K + k] = en;
          preds[g] = std::max_element(logits.begin(), logits.end()) - logits.begin();
          stop[i] = en < thr;  // the exit rule (exits.exit_rule): strictly below the threshold
          if (stop[i]) decided[g] = k;
        }
      };
      hx::parallel(par, r, body);
      int kept = 0;
      for (int i = 0; i < r; ++i) kept += !stop[i];
      if (kept == r) continue;
      std::vector<int64_t> nidx;
      nidx.reserve(kept);
      for (int i = 0; i < r; ++i)
        if (!stop[i]) {
          if ((size_t)i != nidx.size())
            std::memmove(h.data() + nidx.size() * img, h.data() + i * img, img * sizeof(float));
          nidx.push_back(idx[i]);
        }
      h.resize((size_t)kept * img);
      idx.swap(nidx);
    }
    if (!idx.empty() && b0 < e->n_blocks) {
      int ho, wo, co;
      hx::blocks_shape(e->blocks + b0, e->n_blocks - b0, hh, ww, cc, &ho, &wo, &co);
      next.resize(idx.size() * ho * wo * co);
      run_range(e->blocks + b0, e->n_blocks - b0, h.data(), (int)idx.size(), hh, ww, cc, isa, kisa, par, next.data());
      h.swap(next);
    }
    *n_remaining = (int)idx.size();
    std::copy(idx.begin(), idx.end(), remaining);
    if (!idx.empty()) std::memcpy(feats, h.data(), idx.size() * (size_t)fh * fw * fc * sizeof(float));
  });
}

}  // extern "C"
