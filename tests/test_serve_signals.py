"""The cloud server as a service manager runs it: SIGTERM (systemd, docker, kubernetes) stops it as cleanly as
SIGINT (Ctrl-C): the request in flight is answered, then the stopped line, exit status 0. A client that
disconnects mid-request costs one warning line in the log, never a traceback."""

import signal
import socket
import threading
import time

import httpx
import pytest
import torch
from conftest import write_tiny_checkpoint

from hybridexit.model.checkpoint import fingerprint, load_model
from hybridexit.runtime import wire
from hybridexit.runtime.process import ServerProcess

TOKEN = "signal-test-token-0123"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("sig") / "ck")


def _frame(ckpt, n=3):
    model, _ = load_model(ckpt)
    edge, cloud = model.split()
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        f = edge(x)
        return wire.encode(f, fingerprint(ckpt)), cloud(f)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_drains_the_request_in_flight_then_stops(ckpt, sig):
    body, want = _frame(ckpt)
    # a lone request waits up to 3 s for others to join its batch: the signal arrives while it waits
    args = ["--threads", "1", "--max-wait-ms", "3000"]
    with ServerProcess(ckpt, args, env={"HYBRIDEXIT_TOKEN": TOKEN}) as srv:
        result = {}

        def post():
            result["r"] = httpx.post(srv.url + "/v1/infer", content=body, timeout=30,
                                     headers={"Authorization": f"Bearer {TOKEN}"})

        t = threading.Thread(target=post)
        t.start()
        time.sleep(1.0)
        assert "r" not in result  # still queued
        srv.proc.send_signal(sig)
        t.join(30)
        assert srv.proc.wait(30) == 0
        time.sleep(0.2)  # let the stderr reader take the last lines
        log = list(srv.stderr_tail)
    r = result["r"]
    assert r.status_code == 200, r.text
    torch.testing.assert_close(wire.decode(r.content, fingerprint(ckpt), (3, 10)), want, rtol=1e-5, atol=1e-5)
    assert log[-1] == f"hybridexit serve: stopped on {sig.name}", log
    assert not any("Traceback" in ln or "Error" in ln for ln in log), log


def test_client_disconnecting_mid_request_is_one_warning_line(ckpt):
    body, want = _frame(ckpt)
    with ServerProcess(ckpt, ["--threads", "1"], env={"HYBRIDEXIT_TOKEN": TOKEN}) as srv:
        host, port = srv.url.rsplit("/", 1)[-1].rsplit(":", 1)
        with socket.create_connection((host, int(port))) as s:  # announces the body, sends a third, hangs up
            s.sendall(f"POST /v1/infer HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
                      f"Content-Type: {wire.CONTENT_TYPE}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                      + body[:len(body) // 3])
            time.sleep(0.3)
        time.sleep(0.5)
        r = httpx.post(srv.url + "/v1/infer", content=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
        assert r.status_code == 200  # the server goes on
        stats = httpx.get(srv.url + "/v1/stats", headers={"Authorization": f"Bearer {TOKEN}"}).json()
        srv.stop()
        time.sleep(0.2)
        log = [ln for ln in srv.stderr_tail if ln.strip()]
    assert stats["refused"] == {"client_disconnected": 1}
    warnings = [ln for ln in log if "disconnected" in ln]
    assert len(warnings) == 1 and warnings[0].startswith("WARNING:"), log
    assert f"after {len(body) // 3} of {len(body)} body bytes" in warnings[0]
    assert not any("Traceback" in ln or "Exception" in ln for ln in log), log
    assert log[-1] == "hybridexit serve: stopped on SIGTERM"
