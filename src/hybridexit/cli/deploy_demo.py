"""``python -m hybridexit.cli.deploy_demo``: the whole system on one machine, as two processes over loopback.

Starts a cloud server (``hybridexit serve``, its own process, with a fresh random bearer token) for the
checkpoint, waits until it is healthy, runs the edge over the first 1,000 CIFAR test images, prints the summary
table, and stops the server (also on error or Ctrl-C).
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time

DEFAULT_CHECKPOINT = "checkpoints/c10-r32-e20-b1-x20"


def default_codec(checkpoint) -> str:
    """The codec a checkpoint is deployed with: its learned codec (``bn``) when it carries one, else fp32."""
    from ..codecs import LEARNED, codec_home

    return LEARNED if codec_home(checkpoint) is not None else "fp32"


def run_demo(checkpoint: str, data_dir: str | None = None, limit: int = 1000, codec: str | None = None,
             batch_size: int = 1, threads: int | None = 1, out: str | None = None) -> dict:
    import torch

    from ..data import Inputs
    from ..data.datasets import get_split, load_cifar
    from ..model.checkpoint import read_config
    from ..runtime.client import EdgeOptions, run_edge
    from ..runtime.process import ServerProcess, ServerStartError
    from ..runtime.summary import format_summary
    from ..runtime.transport import CloudClient

    meta = read_config(checkpoint)  # a missing checkpoint stops here, before anything starts
    codec = codec or default_codec(checkpoint)
    d = meta.get("data", {})
    ds = load_cifar(d.get("name", "cifar10"), data_dir)
    split = get_split(ds, "test").limit(limit)
    token = secrets.token_hex(16)
    args = ["--threads", str(threads)] if threads else []
    t0 = time.perf_counter()
    print(f"[demo] starting the cloud server for {checkpoint} ...", flush=True)
    with ServerProcess(checkpoint, args, env={"HYBRIDEXIT_TOKEN": token}) as srv:
        with CloudClient(srv.url) as c:
            t_end = time.monotonic() + 30
            while not c.health():
                if time.monotonic() > t_end or srv.proc.poll() is not None:
                    raise ServerStartError(f"the cloud server at {srv.url} never answered /healthz")
                time.sleep(0.1)
        print(f"[demo] cloud server healthy at {srv.url} ({time.perf_counter() - t0:.1f} s); running the edge on "
              f"{len(split)} {ds.name} test images ...", flush=True)
        if threads:
            torch.set_num_threads(threads)
        opts = EdgeOptions(srv.url, token=token, codec=codec, batch_size=batch_size)
        summary, _ = run_edge(checkpoint, Inputs(split.images, split.labels, None, f"{ds.name} test"), opts,
                              out=out, progress=sys.stderr.isatty())
    print(f"[demo] {checkpoint}: edge process -> cloud process over loopback HTTP")
    print(format_summary(summary))
    print(f"[demo] done in {time.perf_counter() - t0:.1f} s; server stopped")
    return summary


def main(argv=None) -> int:
    from .main import guarded
    from .options import add_codec_option

    p = argparse.ArgumentParser(prog="python -m hybridexit.cli.deploy_demo", description=__doc__)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    p.add_argument("--data-dir", default=None, help="CIFAR folder (default: $HYBRIDEXIT_DATA, then the cache)")
    p.add_argument("--limit", type=int, default=1000)
    add_codec_option(p, None, " (default: the checkpoint's learned codec bn if it carries one, else fp32)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (0: torch's default)")
    p.add_argument("--out", default=None, help="write the per-image records (JSONL)")
    a = p.parse_args(argv)
    return guarded(lambda: run_demo(a.checkpoint, a.data_dir, a.limit, a.codec, a.batch_size,
                                    a.threads or None, a.out), "hybridexit demo")


if __name__ == "__main__":
    sys.exit(main())
