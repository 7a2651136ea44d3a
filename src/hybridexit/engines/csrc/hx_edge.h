/* hybridexit edge kernels: the C ABI of the torch-independent core (plain pointers and shapes).
 *
 * One kernel source serves two hosts: the torch extension of the main package (torch_binding.cpp, built by
 * engines/native.py) and the hybridexit-edge package (edge/, a shared library loaded with ctypes). Everything is
 * channels last; the layouts of the weight arrays are those of engines/packed.py (binary) and engines/kbit.py (k-bit).
 *
 * ISA levels are chosen at run time. x86-64, binary blocks and float parts: 0 portable, 1 avx2, 2 avx512bw,
 * 3 avx512vpopcntdq; k-bit blocks: 0 portable, 1 avx2, 2 avx512bw, 3 avx512vnni. aarch64: 0 portable, 1 neon
 * (binary: vcnt popcount; k-bit: widening int8 products), k-bit 2 dotprod (sdot, where the CPU has it).
 * A level of -1 asks for the best this CPU has; a level above it is an error.
 *
 * Every function returning int returns 0 on success, or 1 with a one-line message in err (errlen bytes).
 */
#ifndef HX_EDGE_H
#define HX_EDGE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif
#if defined(__GNUC__)
#pragma GCC visibility push(default) /* the ABI stays visible in a library built with -fvisibility=hidden */
#endif

#define HX_EDGE_ABI_VERSION 2

/* One quantized 3x3 conv (padding 1) with what precedes and follows it in a residual block. */
typedef struct hx_conv {
  const float* bn_a;  /* (cin) folded BatchNorm before it: fma(x, bn_a, bn_b) */
  const float* bn_b;
  const float* thr;   /* (cin) RSign threshold / k-bit shift, or NULL */
  const void* w;      /* binary: uint64 (kw, opad) weight bit vectors; k-bit: int8 (9, ceil(cin/4), opad, 4) */
  const int32_t* wi;  /* binary: (9, cout) per-tap weight popcounts; k-bit: (opad) weight bias */
  const float* scale; /* (cout) binary: alpha; k-bit: s_c / Z^2 */
  const float* rp_g;  /* (cout) RPReLU after it, or NULL (all three) */
  const float* rp_b;
  const float* rp_z;
  int kw, opad;       /* binary only: words per output channel (3 ceil(3 cin / 64)), cout rounded up to 8 */
} hx_conv;

/* A pre-activation residual block with an option-A shortcut: bits 1 (binary), 2 or 4 (k-bit). */
typedef struct hx_block {
  int cin, cout, stride, bits;
  hx_conv c1, c2;
} hx_block;

/* An exit head (exits.ExitHead), BatchNorms folded. */
typedef struct hx_head {
  const float* bn_a; /* (c) */
  const float* bn_b;
  int pool;          /* average pool kernel = stride, 0 = global */
  int hidden;        /* hidden width, 0 = none */
  const float* w1;   /* (hidden, d) */
  const float* h_a;  /* (hidden) */
  const float* h_b;
  const float* w2;   /* (classes, d or hidden) */
  const float* b2;   /* (classes) */
  int classes;
} hx_head;

/* The whole edge half: normalization, float stem, quantized blocks, exit heads. */
typedef struct hx_edge {
  int c, h, w;            /* input images (c, h, w) */
  const float* mean;      /* (c) */
  const float* std;       /* (c) */
  const float* stem;      /* (3, 3, c, c0) float stem weights, no bias */
  int c0;
  int n_blocks;
  const hx_block* blocks; /* all of one kind: binary, or k-bit */
  int n_exits;
  const int* exit_end;    /* exit k reads the features after blocks [0, exit_end[k]), non-decreasing */
  const hx_head* heads;   /* n_exits */
} hx_edge;

/* Parallel loops: par(n, body, ctx) must call body(ctx, lo, hi) over disjoint ranges covering [0, n). NULL: one
 * thread. */
typedef void (*hx_body_fn)(void* ctx, int64_t lo, int64_t hi);
typedef void (*hx_parallel_fn)(int64_t n, hx_body_fn body, void* ctx);

int hx_abi_version(void);
const char* hx_arch(void);               /* "x86_64", "aarch64" or "other" */
int hx_best_isa(void);                   /* binary blocks and float parts */
int hx_kbit_best_isa(void);              /* k-bit blocks */
const char* hx_isa_name(int level);      /* NULL for a level this architecture does not have */
const char* hx_kbit_isa_name(int level);

/* (n, h, w, c) float -> (n, h + 2, w + 2, ceil(c / 64)) words of bits (x a + b >= t) (t NULL: 0), zero border. */
int hx_sign_pack(const float* x, int n, int h, int w, int c, const float* a, const float* b, const float* t, int isa,
                 uint64_t* out, char* err, size_t errlen);
/* Exact integer sums of one binary conv on packed input (n, h + 2, w + 2, ceil(cin / 64)): (n, ho, wo, cout). */
int hx_conv_int(const uint64_t* packed, int n, int h, int w, int cin, const uint64_t* wt, int kw, int opad,
                const int32_t* wpop, int cout, int stride, int isa, int32_t* out, char* err, size_t errlen);
/* Output shape of a run of blocks on (h, w) features. */
int hx_blocks_out_shape(const hx_block* blocks, int nb, int h, int w, int* ho, int* wo, int* co, char* err,
                        size_t errlen);
/* A run of blocks (all binary or all k-bit) on (n, h, w, c) float features -> (n, ho, wo, co). isa: binary level,
 * kisa: k-bit level. */
int hx_run_blocks(const hx_block* blocks, int nb, const float* x, int n, int h, int w, int c, int isa, int kisa,
                  hx_parallel_fn par, float* out, char* err, size_t errlen);
/* Exact sums of one k-bit conv: u (n, h, w, cin) activation bytes 2q; (n, ho, wo, cout) = sum (u - Z) w. */
int hx_kconv_int(const uint8_t* u, int n, int h, int w, int cin, const int8_t* wk, const int32_t* wbias, int cout,
                 int bits, int stride, int isa, int32_t* out, char* err, size_t errlen);
/* The same sums by bit-serial popcount (x86 measurement path; portable elsewhere). w: int8 (cout, 3, 3, cin). */
int hx_kconv_bitserial_int(const uint8_t* u, int n, int h, int w, int cin, const int8_t* wt, int cout, int bits,
                           int stride, int isa, int32_t* out, char* err, size_t errlen);
/* Shape (h, w, c) of the features the edge sends to the cloud (after all its blocks). */
int hx_edge_feature_shape(const hx_edge* e, int* h, int* w, int* c, char* err, size_t errlen);
/* Algorithm 1 at the edge on n images x (n, c, h, w), uint8 (x_u8 != 0, raw) or float in [0, 1]:
 * preds (n) (-1: no exit reached), decided (n) (exit k or -1 = cloud), ents (n, n_exits) (NaN: not reached),
 * the features of the samples that did not exit in feats (capacity n * feature size, channels last) and their
 * indices in remaining; *n_remaining of them. Exit rule: entropy of softmax(logits / T) < threshold. */
int hx_decide(const hx_edge* e, const void* x, int x_u8, int n, const float* thresholds, const float* temperatures,
              int isa, int kisa, hx_parallel_fn par, int64_t* preds, int64_t* decided, float* ents, float* feats,
              int64_t* remaining, int* n_remaining, char* err, size_t errlen);

/* layout.cpp: what a host without numpy needs around the kernels (the main package's arithmetic, exactly). */
/* Binary conv weights from sign bits (O, C, 3, 3), 1 = +1, little bit order: wt (3 ceil(3C/64), ceil(O/8) 8)
 * words and wpop (9, O) per-tap counts of +1 weights (engines/packed.py kernel_weights). */
int hx_binary_layout(const uint8_t* bits, int o, int c, uint64_t* wt, int32_t* wpop, char* err, size_t errlen);
/* k-bit conv weights from levels r packed `bits` each, little bit order, (O, C, 3, 3): wk int8 (9, ceil(C/4),
 * ceil(O/16) 16, 4) of w = 2r - Z and wbias (opad) (engines/kbit.py kernel_kweights). */
int hx_kbit_layout(const uint8_t* levels, int o, int c, int bits, int8_t* wk, int32_t* wbias, char* err,
                   size_t errlen);
/* Eval BatchNorm as fma(x, a, b): a = rsqrt(var + eps) weight (float32), b = bias - mean a (float64). */
void hx_fold_bn(const float* weight, const float* bias, const float* mean, const float* var, float eps, int n,
                float* a, float* b);
/* Payload of a (r, c, h, w) feature frame from channels-last features: codec 1 fp32, 2 fp16, 3 int8 with
 * per-(sample, channel) scales (runtime/wire.py); hx_payload_bytes gives its size. */
size_t hx_payload_bytes(int r, int h, int w, int c, int codec);
int hx_encode_features(const float* x, int r, int h, int w, int c, int codec, uint8_t* out, char* err,
                       size_t errlen);

#if defined(__GNUC__)
#pragma GCC visibility pop
#endif
#ifdef __cplusplus
}
#endif

#endif /* HX_EDGE_H */
