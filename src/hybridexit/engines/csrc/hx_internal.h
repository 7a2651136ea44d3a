// Internal C++ declarations shared by the core sources (bconv.cpp, kbit.cpp, decide.cpp); no torch here.
#pragma once

#include "hx_edge.h"

#include <cstdint>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <string>

#if defined(__x86_64__) || defined(__i386__)
#define HX_X86 1
#else
#define HX_X86 0
#endif
#if defined(__aarch64__)
#define HX_ARM64 1
#else
#define HX_ARM64 0
#endif

namespace hx {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

template <class... A>
[[noreturn]] void fail(const A&... a) {
  std::ostringstream s;
  (s << ... << a);
  throw Error(s.str());
}

#define HX_CHECK(cond, ...)            \
  do {                                 \
    if (!(cond)) ::hx::fail(__VA_ARGS__); \
  } while (0)

inline int words(int c) { return (c + 63) / 64; }
inline int out_size(int h, int stride) { return (h - 1) / stride + 1; }

// Runs f(lo, hi) over [0, n): through the host's parallel loop when given, else on this thread. f must not throw.
template <class F>
void parallel(hx_parallel_fn par, int64_t n, F& f) {
  if (n <= 0) return;
  if (par == nullptr || n == 1) {
    f((int64_t)0, n);
    return;
  }
  par(n, [](void* c, int64_t lo, int64_t hi) { (*static_cast<F*>(c))(lo, hi); }, &f);
}

// A C ABI call: 0, or 1 with the exception's message in err.
template <class F>
int guard(char* err, size_t errlen, F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    if (err && errlen) {
      std::strncpy(err, e.what(), errlen - 1);
      err[errlen - 1] = 0;
    }
    return 1;
  }
}

// bconv.cpp: binary blocks and the float parts of the decision
int resolve_isa(int requested);
void run_binary(const hx_block* blocks, int nb, const float* x, int n, int h, int w, int c, int isa,
                hx_parallel_fn par, float* out);
using NormFn = void (*)(const void*, bool, int, int, int, const float*, const float*, float*);
using StemFn = void (*)(const float*, int, int, int, const float*, int, float*);
using HeadFn = void (*)(const float*, int, int, int, const hx_head&, float*, float*);
NormFn norm_fn(int isa);
StemFn stem_fn(int isa);
HeadFn head_fn(int isa);

// kbit.cpp: k-bit blocks
int resolve_kisa(int requested);
void run_kbit(const hx_block* blocks, int nb, const float* x, int n, int h, int w, int c, int kisa,
              hx_parallel_fn par, float* out);

// decide.cpp: shapes of a run of blocks (checks that they chain)
void blocks_shape(const hx_block* blocks, int nb, int h, int w, int c, int* ho, int* wo, int* co);

}  // namespace hx
