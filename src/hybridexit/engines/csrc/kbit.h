// hybridexit k-bit (2- and 4-bit) integer engine: 3x3 convolutions on integer levels with int8 dot products
// (AVX-512 VNNI vpdpbusd, AVX-512BW / AVX2 maddubs, portable), and fused runs of k-bit residual blocks.
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
// ISA levels (argument ``isa``; -1 = the best this CPU has, see kbit_best_isa):
//   3 = AVX-512 VNNI (vpdpbusd), 2 = AVX-512BW (vpmaddubsw + vpmaddwd), 1 = AVX2 (vpmaddubsw + vpmaddwd),
//   0 = portable C++. maddubs adds two u8 * s8 products into int16 with saturation: |u w| <= 2Z * Z = 450 for
//   k = 4, so a pair is at most 900 and up to 32 pairs are summed in int16 (<= 28,800 < 32,767) before widening:
//   no saturation, every path gives the same exact integers.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <vector>

// A run of k-bit residual blocks (pre-activation, option-A shortcut, float residual stream), as resnet.BasicBlock
// with QuanConv(bits = k). x: float32 (N, H, W, C) contiguous, channels last; returns float32 (N, Ho, Wo, Cout).
// meta: 4 ints per block: cin, cout, stride, bits (2 or 4). p: 18 tensors per block, 9 per conv j = 1, 2:
//   bn_a, bn_b    float32 (cin_j): the conv's input BatchNorm folded as fma(x, bn_a, bn_b) (packed.fold_bn)
//   shift         float32 (cin_j) RSign threshold (x - shift before quantizing), or an empty tensor when absent
//   wk            int8 (9, G, opad, 4), wbias int32 (opad): the weights as above
//   mult          float32 (cout): s_c / Z^2
//   rp_gamma, rp_beta, rp_zeta  float32 (cout) RPReLU (prelu(y - gamma, beta) + zeta), or three empty tensors
// (cin_1 = cin, cin_2 = cout). Epilogues are fused: conv 1's output goes through RPReLU, BatchNorm 2, shift and
// quantization straight into conv 2's input bytes; conv 2's through RPReLU, the residual add, and (if another
// block follows) its BatchNorm 1, shift and quantization.
torch::Tensor run_kblocks(torch::Tensor x, std::vector<torch::Tensor> p, std::vector<int64_t> meta, int64_t isa);

// Exact integer sums of one k-bit 3x3 conv (padding 1) for tests: u uint8 (N, H, W, cin) activation bytes 2q,
// wk/wbias as above; returns int32 (N, Ho, Wo, cout) = sum (u - Z) * w with zero padding.
torch::Tensor kconv_int(torch::Tensor u, torch::Tensor wk, torch::Tensor wbias, int64_t cout, int64_t bits,
                        int64_t stride, int64_t isa);

// The bit-serial alternative, for measurement: the same sums as kconv_int from k_a x k_w binary products over bit
// planes (a = sum_i 2^i (2 q_i - 1), w likewise), XNOR-popcount as the binary engine. w: int8 (cout, 3, 3, cin)
// weights 2r - Z. isa: 3 = AVX-512 VPOPCNTDQ, 2 = AVX-512BW, 1 = AVX2 (nibble-lookup popcount), 0 = portable.
torch::Tensor kconv_bitserial_int(torch::Tensor u, torch::Tensor w, int64_t bits, int64_t stride, int64_t isa);

// Best ISA level of the int8 path on this CPU (3 VNNI, 2 AVX-512BW, 1 AVX2, 0 portable).
int64_t kbit_best_isa();
