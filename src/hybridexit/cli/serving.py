"""``hybridexit serve`` and ``hybridexit edge``: parse, call the runtime library, print.

``add_parsers(sub)`` adds both subcommands to the ``hybridexit`` parser (cli.py). User errors are raised as
``HybridExitError`` subclasses; cli.main prints them on one line and exits 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import json

from ..codecs import QUANT_NAMES, ZSTD
from ..engines import CHOICES as ENGINE_CHOICES
from ..errors import missing_extra
from ..threads import runtime_threads, runtime_threads_help
from .options import (
    POLICY_HELP,
    add_codec_option,
    checkpoint_dir,
    codec_of,
    device,
    existing_dir,
    existing_file,
    http_url,
    non_negative_float,
    non_negative_int,
    output_file,
    port,
    positive_float,
    positive_int,
    refused,
    threshold,
)

TOKEN_ON_COMMAND_LINE = ("a command line is visible to every user in ps; put the token in a file and pass "
                         "--token-file FILE, or set HYBRIDEXIT_TOKEN")


def _require(*modules: str) -> None:
    """Stop in one line (the extra named) before any work when the runtime's optional modules are missing."""
    for m in modules:
        if importlib.util.find_spec(m) is None:
            raise missing_extra(m, "the runtime", "runtime")


def cmd_serve(a) -> None:
    _require("fastapi", "uvicorn")
    from ..runtime.auth import resolve_token
    from ..runtime.server import ServerSettings, serve

    settings = ServerSettings(max_batch=a.max_batch, max_wait_ms=a.max_wait_ms,
                              max_request_bytes=a.max_request_bytes, request_timeout_s=a.request_timeout_s,
                              max_queue_samples=a.max_queue, token=resolve_token(a.token_file),
                              idle_timeout_s=a.idle_timeout_s, header_timeout_s=a.header_timeout_s)
    serve(a.checkpoint, a.host, a.port, settings, device=a.device, threads=a.threads, log_level=a.log_level,
          tls_cert=a.tls_cert, tls_key=a.tls_key)


def _inputs(a, meta: dict):
    from ..data import Inputs, inputs_from_folder
    from ..model.checkpoint import network_config

    d = meta.get("data", {})
    if a.images:  # read at the network's input size
        return inputs_from_folder(a.images, d.get("classes"), network_config(meta).image_size).head(a.limit)
    from ..data.datasets import load_recorded
    from ..model.checkpoint import split_of

    ds = load_recorded(d, a.data_dir)  # CIFAR, or the class-folder dataset the checkpoint was trained on
    split = split_of(a.checkpoint, ds, a.split).limit(a.limit)
    return Inputs(split.images, split.labels, None, f"{ds.name} {a.split}")


def _codec_calibration(a, meta):
    """Edge features of the checkpoint's validation split: a q codec chooses its clip ranges on them."""
    import torch

    from ..data.datasets import load_recorded
    from ..model.checkpoint import load_model, split_of

    ds = load_recorded(meta.get("data"), a.data_dir)
    val = split_of(a.checkpoint, ds, "val")
    edge, _ = load_model(a.checkpoint)[0].split()
    with torch.no_grad():
        return torch.cat([edge.eval()(val.images[i:i + 500]) for i in range(0, len(val), 500)])


def _edge_adaptive(a, opts, inputs, meta, policy) -> None:
    """``edge --slo-ms``: the adaptive edge (runtime/adaptive_edge.py); its exit policies' exit rates are read on
    the checkpoint's validation split."""
    from ..runtime.adaptive_edge import AdaptiveOptions, format_adaptive_summary, run_adaptive_edge

    ad = AdaptiveOptions(slo_ms=a.slo_ms, quantile=a.slo_quantile, link=a.link, edge_watts=a.edge_watts,
                         codecs=tuple(a.adaptive_codecs), boundaries=a.boundaries)
    val = _inputs(argparse.Namespace(**{**vars(a), "images": None, "split": "val", "limit": None}), meta).images
    summary, _ = run_adaptive_edge(a.checkpoint, inputs, opts, ad, val, out=a.out, resume=a.resume, policy=policy)
    summary = {"checkpoint": a.checkpoint, "inputs_from": inputs.description, "cloud": a.cloud, **summary}
    if a.json:
        print(json.dumps(summary))
    else:
        print(f"hybridexit edge (adaptive): {inputs.description} -> {a.cloud}"
              + (f", records in {a.out}" if a.out else ""))
        print(format_adaptive_summary(summary))


def cmd_edge(a) -> None:
    codec = codec_of(a)
    _require("httpx")
    if codec.endswith(ZSTD):
        _require("zstandard")
    import torch

    from ..model.checkpoint import fingerprint, read_config
    from ..model.policy import read_policy_file
    from ..runtime.auth import resolve_token
    from ..runtime.client import EdgeOptions, run_edge
    from ..runtime.summary import format_summary

    if a.threads:
        torch.set_num_threads(a.threads)
    if a.audit_burst_rate is not None and not a.audit_rate:
        from ..errors import ConfigError

        raise ConfigError("--audit-burst-rate needs --audit-rate (the base rate of audits)")
    opts = EdgeOptions(cloud_url=a.cloud, token=resolve_token(a.token_file), ca=a.ca, codec=codec,
                       batch_size=a.batch_size, timeout_s=a.timeout_s, retries=a.retries,
                       retry_backoff_ms=a.retry_backoff_ms, cooldown_s=a.cooldown_s,
                       on_cloud_failure=a.on_cloud_failure,
                       thresholds=tuple(a.thresholds) if a.thresholds is not None else None, device=a.device,
                       engine=a.engine, audit_rate=a.audit_rate, audit_eps=a.audit_eps, audit_seed=a.audit_seed,
                       audit_burst_rate=a.audit_burst_rate, insecure=a.insecure)
    meta = read_config(a.checkpoint)
    if a.thresholds is not None:  # a wrong count is refused before any input is read
        from ..model.checkpoint import network_config
        from ..model.hybrid import resolve_thresholds

        resolve_thresholds(network_config(meta), a.thresholds)
    inputs = _inputs(a, meta)
    calibration = _codec_calibration(a, meta) if a.codec in QUANT_NAMES else None
    policy = read_policy_file(a.policy, fingerprint(a.checkpoint)) if a.policy else None
    if a.resume and not a.out:
        from ..errors import ConfigError

        raise ConfigError("--resume continues the --out file of an interrupted run: give that --out")
    if a.slo_ms is not None:
        return _edge_adaptive(a, opts, inputs, meta, policy)
    summary, _ = run_edge(a.checkpoint, inputs, opts, out=a.out, progress=not a.json, codec_calibration=calibration,
                          policy=policy, resume=a.resume)
    summary = {"checkpoint": a.checkpoint, "inputs": inputs.description, "cloud": a.cloud, **summary,
               **inputs.folder_summary()}
    if a.json:
        print(json.dumps(summary))
    else:
        print(f"hybridexit edge: {inputs.description} -> {a.cloud}" + (f", records in {a.out}" if a.out else ""))
        print(format_summary(summary))


def add_parsers(sub) -> None:
    """``serve`` and ``edge`` on the ``hybridexit`` parser."""
    _add_serve(sub)
    _add_edge(sub)


def _add_serve(sub) -> None:
    s = sub.add_parser("serve", help="cloud server: the cloud half of a checkpoint over HTTP, dynamic batching",
                       description="Serve the CloudNet of a checkpoint (POST /v1/infer, GET /healthz, /v1/info, "
                                   "/v1/stats). See docs/wire-format.md.")
    s.add_argument("checkpoint", type=checkpoint_dir, help="checkpoint folder (the same one the edge runs)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind; non-loopback needs a token")
    s.add_argument("--port", type=port, default=8000, help="port (0: any free port, printed at start-up)")
    s.add_argument("--token-file", type=existing_file, default=None,
                   help="file holding the bearer token clients must send (default: $HYBRIDEXIT_TOKEN)")
    s.add_argument("--token", action=refused(TOKEN_ON_COMMAND_LINE), help=argparse.SUPPRESS)
    s.add_argument("--tls-cert", type=existing_file, default=None, help="serve HTTPS with this certificate chain (PEM)")
    s.add_argument("--tls-key", type=existing_file, default=None,
                   help="private key of --tls-cert (PEM; not needed when inside the certificate file)")
    s.add_argument("--max-batch", type=positive_int, default=64, help="samples per forward pass")
    s.add_argument("--max-wait-ms", type=non_negative_float, default=5.0,
                   help="how long a request waits for others to join its batch")
    s.add_argument("--max-request-bytes", type=positive_int, default=8 * 1024 * 1024,
                   help="largest request body (and decoded tensor) accepted")
    s.add_argument("--request-timeout-s", type=positive_float, default=30.0,
                   help="per request: body, queue and compute")
    s.add_argument("--idle-timeout-s", type=positive_float, default=15.0,
                   help="close a connection that has no request under way (new, or kept alive) after this long")
    s.add_argument("--header-timeout-s", type=positive_float, default=10.0,
                   help="close a connection whose request headers are not complete this long after its first byte")
    s.add_argument("--max-queue", type=positive_int, default=4096,
                   help="samples allowed to wait; beyond, 503 overloaded")
    s.add_argument("--device", type=device, default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    s.add_argument("--threads", type=positive_int, default=runtime_threads(), help=runtime_threads_help("server"))
    s.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="server log level")
    s.set_defaults(func=cmd_serve)


def _add_edge(sub) -> None:
    e = sub.add_parser("edge", help="edge client: exits locally, offloads the rest to a cloud server",
                       description="Run the edge half and its exits on a split (or a folder of images); send only "
                                   "the samples that do not exit to the cloud server; one record per input.")
    e.add_argument("checkpoint", type=checkpoint_dir, help="checkpoint folder (the same one the server runs)")
    e.add_argument("--cloud", type=http_url, required=True, help="server URL, e.g. https://cloud.example:8443")
    e.add_argument("--token-file", type=existing_file, default=None,
                   help="file holding the server's bearer token (default: $HYBRIDEXIT_TOKEN)")
    e.add_argument("--token", action=refused(TOKEN_ON_COMMAND_LINE), help=argparse.SUPPRESS)
    e.add_argument("--insecure", action="store_true",
                   help="allow plain http:// to a non-loopback server with a token (refused by default: the token "
                        "and the features would cross the network in clear)")
    e.add_argument("--ca", type=existing_file, default=None,
                   help="CA certificate (PEM) that signed the server's certificate (default: the system's CAs)")
    e.add_argument("--data-dir", type=existing_dir, default=None,
                   help="dataset folder (default: $HYBRIDEXIT_DATA, then the cache; for a checkpoint trained on a "
                        "class-folder dataset, the folder it was trained on)")
    e.add_argument("--split", default="test", choices=["test", "val", "train"], help="dataset split to run on")
    e.add_argument("--images", type=existing_dir, default=None,
                   help="a folder of image files instead of the dataset: FOLDER/*.png or FOLDER/<class>/*.png")
    e.add_argument("--limit", type=positive_int, default=None, help="the first N inputs")
    e.add_argument("--out", type=output_file, default=None, help="write one JSON record per input (JSONL)")
    e.add_argument("--resume", action="store_true",
                   help="continue the --out file of an interrupted run: keep its complete records, run the inputs "
                        "after them (each input gets exactly one record)")
    e.add_argument("--slo-ms", type=positive_float, default=None, metavar="MS",
                   help="adaptive edge: per input choose the hand-off block, codec and exit policy that meet this "
                        "latency target (at --slo-quantile) with the least edge energy; local answers when the cloud "
                        "is unreachable, marked degraded (docs/adaptive.md)")
    e.add_argument("--slo-quantile", type=float, default=0.95, help="with --slo-ms: the quantile the target is for")
    e.add_argument("--link", default="lte", choices=["ble", "wifi", "lte", "5g"],
                   help="with --slo-ms: the radio whose energy per bit is charged (codecs/links.py)")
    e.add_argument("--edge-watts", type=positive_float, default=None,
                   help="with --slo-ms: price the edge's computation at its measured time x this power instead of the "
                        "energy model's")
    e.add_argument("--boundaries", default="split", choices=["split", "all"],
                   help="with --slo-ms: hand off at the checkpoint's boundary (or finish locally), or at any block")
    e.add_argument("--adaptive-codecs", nargs="+", default=["bn", "int8+zstd", "fp16"], metavar="CODEC",
                   help="with --slo-ms: the codecs to choose from (bn: the checkpoint's learned codec, if any)")
    add_codec_option(e, "fp32", compress_alias=True)
    e.add_argument("--batch-size", type=positive_int, default=1,
                   help="inputs processed together (1: streaming, per-sample latency and bytes)")
    e.add_argument("--thresholds", type=threshold, nargs="*", default=None,
                   help="exit thresholds, one per exit (default: the checkpoint's exit policy)")
    e.add_argument("--policy", type=existing_file, default=None, metavar="FILE",
                   help=POLICY_HELP + "; its guarantee gives the audit's EPS and levels")
    e.add_argument("--timeout-s", type=positive_float, default=10.0, help="per HTTP attempt")
    e.add_argument("--retries", type=non_negative_int, default=2, help="retries of a failed request (after the first try)")
    e.add_argument("--retry-backoff-ms", type=non_negative_float, default=100.0,
                   help="first retry delay, doubled each retry")
    e.add_argument("--cooldown-s", type=non_negative_float, default=5.0,
                   help="after a request fails all its retries, skip the cloud this long before trying again")
    e.add_argument("--on-cloud-failure", default="fallback", choices=["fallback", "error"],
                   help="fallback: answer with the last exit's prediction (marked); error: stop")
    e.add_argument("--device", type=device, default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    e.add_argument("--threads", type=positive_int, default=runtime_threads(), help=runtime_threads_help("edge"))
    e.add_argument("--engine", default="auto", choices=list(ENGINE_CHOICES),
                   help="engine of the edge half (default auto: the fastest that can run the checkpoint here, packed "
                        "then onnx then torch; onnx, packed: CPU; the cloud half is unchanged)")
    e.add_argument("--audit-rate", type=float, default=0.0, metavar="P",
                   help="also send this share of the exited inputs to the cloud; the edge's answer stays, the cloud's "
                        "measures disagreement, and the exits tighten when it exceeds EPS (docs/trust.md)")
    e.add_argument("--audit-eps", type=float, default=None, metavar="EPS",
                   help="with --audit-rate: the disagreement allowed (default: the exit policy's Learn-then-Test EPS)")
    e.add_argument("--audit-seed", type=int, default=0, help="with --audit-rate: seed of the audit draws")
    e.add_argument("--audit-burst-rate", type=float, default=None, metavar="P",
                   help="with --audit-rate: when the share of inputs that would exit drifts from the policy's "
                        "validation share, audit at this rate for a burst (docs/trust.md)")
    e.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    e.set_defaults(func=cmd_edge)
