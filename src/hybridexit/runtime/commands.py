"""``hybridexit serve`` and ``hybridexit edge``: parse, call the runtime library, print.

``add_parsers(sub)`` adds both subcommands to the ``hybridexit`` parser (cli.py). User errors are raised as
``HybridExitError`` subclasses; cli.main prints them on one line and exits 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import json

from ..errors import HybridExitError


class MissingDependency(HybridExitError):
    """An optional dependency of the runtime is not installed."""


def _require(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependency(f"the runtime needs {', '.join(missing)}: pip install 'hybridexit[runtime]'")


def _positive_int(v: str) -> int:
    n = int(v)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{v}: must be at least 1")
    return n


def cmd_serve(a) -> None:
    _require("fastapi", "uvicorn")
    from .server import ServerSettings, resolve_token, serve

    settings = ServerSettings(max_batch=a.max_batch, max_wait_ms=a.max_wait_ms,
                              max_request_bytes=a.max_request_bytes, request_timeout_s=a.request_timeout_s,
                              max_queue_samples=a.max_queue, token=resolve_token(a.token))
    serve(a.checkpoint, a.host, a.port, settings, device=a.device, threads=a.threads, log_level=a.log_level)


def _inputs(a, meta: dict):
    from .client import Inputs, inputs_from_folder

    d = meta.get("data", {})
    if a.images:
        inp = inputs_from_folder(a.images, d.get("classes"))
        if a.limit is not None:
            inp = Inputs(inp.images[:a.limit], inp.labels[:a.limit], inp.paths[:a.limit], inp.description)
        return inp
    from ..data import get_split, load_cifar

    ds = load_cifar(d.get("name", "cifar10"), a.data_dir)
    split = get_split(ds, a.split, d.get("val_size", 5000), d.get("split_seed", 0)).limit(a.limit)
    return Inputs(split.images, split.labels, None, f"{ds.name} {a.split}")


def cmd_edge(a) -> None:
    _require("httpx")
    if a.compress:
        _require("zstandard")
    import torch

    from ..checkpoint import read_config
    from .client import EdgeOptions, format_summary, run_edge
    from .server import resolve_token

    if a.threads:
        torch.set_num_threads(a.threads)
    opts = EdgeOptions(cloud_url=a.cloud, token=resolve_token(a.token), codec=a.codec, compress=a.compress,
                       batch_size=a.batch_size, timeout_s=a.timeout_s, retries=a.retries,
                       retry_backoff_ms=a.retry_backoff_ms, cooldown_s=a.cooldown_s,
                       on_cloud_failure=a.on_cloud_failure,
                       thresholds=tuple(a.thresholds) if a.thresholds is not None else None, device=a.device)
    inputs = _inputs(a, read_config(a.checkpoint))
    summary, _ = run_edge(a.checkpoint, inputs, opts, out=a.out, progress=not a.json)
    summary = {"checkpoint": a.checkpoint, "inputs": inputs.description, "cloud": a.cloud, **summary}
    if a.json:
        print(json.dumps(summary))
    else:
        print(f"hybridexit edge: {inputs.description} -> {a.cloud}" + (f", records in {a.out}" if a.out else ""))
        print(format_summary(summary))


def add_parsers(sub) -> None:
    s = sub.add_parser("serve", help="cloud server: the cloud half of a checkpoint over HTTP, dynamic batching",
                       description="Serve the CloudNet of a checkpoint (POST /v1/infer, GET /healthz, /v1/info, "
                                   "/v1/stats). See docs/wire-format.md.")
    s.add_argument("checkpoint")
    s.add_argument("--host", default="127.0.0.1", help="address to bind; non-loopback needs a token")
    s.add_argument("--port", type=int, default=8000, help="port (0: any free port, printed at start-up)")
    s.add_argument("--token", default=None, help="bearer token clients must send (default: $HYBRIDEXIT_TOKEN)")
    s.add_argument("--max-batch", type=_positive_int, default=64, help="samples per forward pass")
    s.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long a request waits for others to join its batch")
    s.add_argument("--max-request-bytes", type=_positive_int, default=8 * 1024 * 1024,
                   help="largest request body (and decoded tensor) accepted")
    s.add_argument("--request-timeout-s", type=float, default=30.0, help="per request: body, queue and compute")
    s.add_argument("--max-queue", type=_positive_int, default=4096,
                   help="samples allowed to wait; beyond, 503 overloaded")
    s.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    s.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    s.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    s.set_defaults(func=cmd_serve)

    e = sub.add_parser("edge", help="edge client: exits locally, offloads the rest to a cloud server",
                       description="Run the edge half and its exits on a split (or a folder of images); send only "
                                   "the samples that do not exit to the cloud server; one record per input.")
    e.add_argument("checkpoint")
    e.add_argument("--cloud", required=True, help="server URL, e.g. http://127.0.0.1:8000")
    e.add_argument("--token", default=None, help="bearer token (default: $HYBRIDEXIT_TOKEN)")
    e.add_argument("--data-dir", default=None, help="dataset folder (default: $HYBRIDEXIT_DATA, then the cache)")
    e.add_argument("--split", default="test", choices=["test", "val", "train"])
    e.add_argument("--images", default=None,
                   help="a folder of image files instead of the dataset: FOLDER/*.png or FOLDER/<class>/*.png")
    e.add_argument("--limit", type=_positive_int, default=None, help="the first N inputs")
    e.add_argument("--out", default=None, help="write one JSON record per input (JSONL)")
    e.add_argument("--codec", default="fp32", choices=["fp32", "fp16", "int8"], help="feature codec on the wire")
    e.add_argument("--compress", action="store_true", help="zstd-compress the payload")
    e.add_argument("--batch-size", type=_positive_int, default=1,
                   help="inputs processed together (1: streaming, per-sample latency and bytes)")
    e.add_argument("--thresholds", type=float, nargs="*", default=None, help="override the checkpoint's thresholds")
    e.add_argument("--timeout-s", type=float, default=10.0, help="per HTTP attempt")
    e.add_argument("--retries", type=int, default=2, help="retries of a failed request (after the first try)")
    e.add_argument("--retry-backoff-ms", type=float, default=100.0, help="first retry delay, doubled each retry")
    e.add_argument("--cooldown-s", type=float, default=5.0,
                   help="after a request fails all its retries, skip the cloud this long before trying again")
    e.add_argument("--on-cloud-failure", default="fallback", choices=["fallback", "error"],
                   help="fallback: answer with the last exit's prediction (marked); error: stop")
    e.add_argument("--device", default=None)
    e.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    e.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    e.set_defaults(func=cmd_edge)
