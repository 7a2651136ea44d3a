"""Which ONNX Runtime op computes a quantized conv layer fastest, and which of them is exact -> results/onnx_conv_speed.json.

    python benchmarks/onnx_conv_speed.py [--rounds 7] [--bits 4]

One whole layer as ``onnx_export`` writes it (BatchNorm as Mul + Add, the activation quantizer, the conv, its scale)
on the three ResNet-32 stage shapes (16 channels at 32x32, 32 at 16x16, 64 at 8x8; 3x3, stride 1), batch 1 and
64, one thread, microseconds per image, each variant's fastest of ``--rounds`` interleaved rounds (the machine's
load average is recorded: on shared CPUs read the ratios within a row):

- ``float_conv``: float ``Conv`` on torch's float levels (what the torch engine computes; not exact),
- ``kbit_float_levels``: float ``Conv`` on the integer levels 2q - Z, 2r - Z (exact while 9 C Z^2 <= 2^24),
- ``kbit_convinteger``: ``ConvInteger`` uint8 x uint8 -> int32 (exact always),
- ``kbit_qlinearconv``: ``QLinearConv`` uint8 x int8 with its output requantized to 8 bits (NOT exact: the sum
  spans far more than 256 values; listed for its speed only),
- ``binary_qlinearconv``: the binary layer (``onnx_export.GraphBuilder.binary_conv``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hybridexit.engines.onnx_engine import session
from hybridexit.engines.onnx_export import GraphBuilder, float_conv_exact, weight_levels
from hybridexit.model.quant import QuanConv

SHAPES = ((16, 32), (32, 16), (64, 8))
VARIANTS = ("float_conv", "kbit_float_levels", "kbit_convinteger", "kbit_qlinearconv", "binary_qlinearconv")


def layer(variant: str, c: int, size: int, bits: int, gen) -> bytes:
    """The graph of one quantized conv layer (input "x", output "y")."""
    q = QuanConv(c, c, 1, 1 if variant.startswith("binary") else bits).eval()
    q.conv.weight.data = torch.randn(q.conv.weight.shape, generator=gen)
    g = GraphBuilder()
    z = g.bn("x", q.bn)
    if variant == "binary_qlinearconv":
        y = g.binary_conv(z, q.conv)
    elif variant == "float_conv":  # torch's arithmetic: float levels q (2 / Z) - 1 and quantize_weight's weights
        zz = 2**bits - 1
        a = g.op("Sub", [g.op("Mul", [g.level_index(z, bits), g.const(2.0 / zz)]), g.const(1.0)])
        r, s = weight_levels(q.conv.weight, bits)
        y = g.op("Conv", [a, g.const(((r * (2.0 / zz) - 1.0) * s.view(-1, 1, 1, 1)).numpy())], pads=[1, 1, 1, 1])
    elif variant == "kbit_qlinearconv":
        zz = 2**bits - 1
        u = g.op("Cast", [g.op("Mul", [g.level_index(z, bits), g.const(2.0)])], to=g.onnx.TensorProto.UINT8)
        r, s = weight_levels(q.conv.weight, bits)
        ys = float(9 * c * zz * zz) / 127  # an output scale that holds the largest sum: 8 bits over its range
        one = g.const(1.0)
        yq = g.op("QLinearConv", [u, one, g.const(zz, np.uint8), g.const((2 * r - zz).numpy(), np.int8), one,
                                  g.const(0, np.int8), g.const(ys), g.const(128, np.uint8)], pads=[1, 1, 1, 1])
        y = g.op("Mul", [g.op("DequantizeLinear", [yq, g.const(ys), g.const(128, np.uint8)]), g.channel(s / zz**2)])
    else:
        y = g.kbit_conv(z, q.conv, bits, size, integer=variant == "kbit_convinteger")
    g.op("Identity", [y], "y")
    h, tp = g.onnx.helper, g.onnx.TensorProto
    return g.model([h.make_tensor_value_info("x", tp.FLOAT, ["N", c, size, size])],
                   [h.make_tensor_value_info("y", tp.FLOAT, ["N", c, size, size])], "layer").SerializeToString()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", default="results/onnx_conv_speed.json")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    import onnxruntime

    gen = torch.Generator().manual_seed(0)
    load_before, rows = os.getloadavg()[0], []
    for c, size in SHAPES:
        sessions = {v: session(layer(v, c, size, a.bits, gen)) for v in VARIANTS}
        for n in (1, 64):
            x = {"x": torch.randn(n, c, size, size, generator=gen).numpy()}
            reps = max(2, 128 // n)
            best = dict.fromkeys(VARIANTS, float("inf"))
            for _ in range(a.rounds):
                for v, s in sessions.items():
                    s.run(["y"], x)
                    t = time.perf_counter()
                    for _ in range(reps):
                        s.run(["y"], x)
                    best[v] = min(best[v], (time.perf_counter() - t) / reps / n * 1e6)
            rows.append({"channels": c, "size": size, "batch": n, "us_per_image": {v: round(t, 2) for v, t in best.items()},
                         "float_levels_exact": float_conv_exact(c, a.bits)})
            print(json.dumps(rows[-1]), flush=True)
    result = {"command": "python benchmarks/onnx_conv_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "bits": a.bits, "threads": 1, "onnxruntime": onnxruntime.__version__, "cpu": platform.processor() or
              platform.machine(), "cpus": os.cpu_count(),
              "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # before, after: shared CPUs
              "rows": rows}
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
