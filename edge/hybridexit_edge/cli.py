"""``hybridexit-edge``: run an exported edge against ``hybridexit serve``; the only module that prints."""

from __future__ import annotations

import argparse
import json
import os
import sys
from array import array

from .errors import HybridExitError


def _inputs(path: str, limit: int | None) -> tuple[memoryview, list[int]]:
    """``images`` uint8 (N, C, H, W) and optional integer ``labels`` (N,) from an .npz (``numpy.savez``)."""
    from .tensors import read_npz

    arrays = read_npz(path)
    if "images" not in arrays or arrays["images"][0] != "B" or len(arrays["images"][1]) != 4:
        raise HybridExitError(f"--inputs {path}: 'images' must be a uint8 (N, C, H, W) array")
    _, shape, images = arrays["images"]
    n = shape[0]
    if "labels" in arrays:
        code, lshape, raw = arrays["labels"]
        labels = list(array(code, raw)) if code in "qib" and lshape == (n,) else None
        if labels is None:
            raise HybridExitError(f"--inputs {path}: 'labels' must be integers, one per image")
    else:
        labels = [-1] * n
    n = n if limit is None else min(n, limit)
    return memoryview(images)[: n * (len(images) // max(shape[0], 1))], labels[:n]


def _token(path: str | None) -> str | None:
    if path:
        with open(path) as f:
            return f.read().strip()
    return os.environ.get("HYBRIDEXIT_TOKEN") or None


def _table(s: dict) -> str:
    pct = lambda v: "n/a" if v is None else f"{100 * v:.2f} %"  # noqa: E731
    ms = lambda a, b: "n/a" if a is None else f"{a:.1f} / {b:.1f} ms"  # noqa: E731
    rows = [("inputs", str(s["inputs"])), ("accuracy", pct(s["accuracy"])),
            ("decided at the edge", pct(s["edge_fraction"])), ("answered by the cloud", pct(s["cloud_fraction"])),
            ("fallback (cloud failed)", pct(s["fallback_fraction"])),
            ("energy per image", "n/a" if s["expected_uj"] is None else f"{s['expected_uj']:.2f} uJ"),
            ("bytes sent per input", f"{s['payload_bytes_per_input']:.0f} B"),
            ("latency p50 / p95", ms(s["latency_ms_p50"], s["latency_ms_p95"])),
            ("edge engine", f"{s['engine']} ({s['isa']})"),
            ("codec", f"{s['codec']}{' + zstd' if s['compressed'] else ''}, batch size {s['batch_size']}"),
            ("cloud requests", f"{s['requests']} sent ({s['failed_requests']} failed, {s['retries']} retries, "
                               f"{s['skipped_requests']} skipped while the cloud was down)")]
    w = max(len(k) for k, _ in rows) + 2
    return "\n".join(f"{k:<{w}}{v}" for k, v in rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="hybridexit-edge", description="The edge half of a hybridexit checkpoint "
                                "without PyTorch: exits locally, offloads the rest to `hybridexit serve`.")
    sub = p.add_subparsers(dest="cmd", required=True)
    info = sub.add_parser("info", help="this machine's kernels and an exported edge's model")
    info.add_argument("edge", nargs="?", help="folder of `hybridexit export CKPT --format packed`")
    r = sub.add_parser("run", help="run inputs through the edge and the cloud; one JSON record per input")
    r.add_argument("edge", help="folder of `hybridexit export CKPT --format packed` (edge.packed.safetensors, edge.json)")
    r.add_argument("--cloud", required=True, help="server URL, e.g. https://cloud.example:8443")
    r.add_argument("--inputs", required=True, help=".npz with images (uint8 N, C, H, W) and optional labels")
    r.add_argument("--limit", type=int, default=None)
    r.add_argument("--out", default=None, help="JSONL records")
    r.add_argument("--token-file", default=None, help="the server's bearer token (default: $HYBRIDEXIT_TOKEN)")
    r.add_argument("--ca", default=None, help="CA certificate (PEM) of an https server")
    r.add_argument("--insecure", action="store_true", help="allow a token over plain http:// to another machine")
    r.add_argument("--codec", default="fp32", help="fp32, fp16 or int8")
    r.add_argument("--compress", action="store_true", help="zstd the payload (needs zstandard)")
    r.add_argument("--batch-size", type=int, default=1)
    r.add_argument("--thresholds", type=float, nargs="*", default=None)
    r.add_argument("--timeout-s", type=float, default=10.0)
    r.add_argument("--retries", type=int, default=2)
    r.add_argument("--retry-backoff-ms", type=float, default=100.0)
    r.add_argument("--cooldown-s", type=float, default=5.0)
    r.add_argument("--on-cloud-failure", default="fallback", choices=["fallback", "error"])
    r.add_argument("--json", action="store_true", help="print the summary as JSON")
    a = p.parse_args(argv)
    try:
        from . import native

        isa = "binary/float {}, k-bit {}".format(*native.isa_names())
        if a.cmd == "info":
            d = {"arch": native.lib().hx_arch().decode(), "isa": isa, "library": str(native.library_path())}
            if a.edge:
                from .artifact import PackedEdge

                m = PackedEdge(a.edge).manifest
                d.update({k: m[k] for k in ("checkpoint", "fingerprint", "bits", "num_classes", "thresholds")})
            print(json.dumps(d, indent=1))
            return 0
        from .runner import Options, run_edge

        opts = Options(cloud_url=a.cloud, token=_token(a.token_file), codec=a.codec, compress=a.compress,
                       batch_size=a.batch_size, timeout_s=a.timeout_s, retries=a.retries,
                       retry_backoff_ms=a.retry_backoff_ms, cooldown_s=a.cooldown_s,
                       on_cloud_failure=a.on_cloud_failure,
                       thresholds=tuple(a.thresholds) if a.thresholds is not None else None, ca=a.ca,
                       insecure=a.insecure)
        images, labels = _inputs(a.inputs, a.limit)
        summary, _ = run_edge(a.edge, images, labels, opts, out=a.out)
        summary.update(edge=a.edge, cloud=a.cloud, isa=isa)
        print(json.dumps(summary) if a.json else _table(summary))
        return 0
    except (HybridExitError, OSError) as e:
        print(f"hybridexit-edge: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
