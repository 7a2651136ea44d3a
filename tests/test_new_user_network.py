"""The edge-cloud pair against the mistakes and abuse a new user's network brings (issue 35, items 3, 5 and 6):
a token never sent in clear to another machine by default, a URL of the wrong scheme an error at start, idle and
half-sent connections closed, outputs that would not be finite refused."""

import selectors
import socket
import time

import httpx
import pytest
import torch
from conftest import write_tiny_checkpoint
from test_runtime import ThreadServer as Server

from hybridexit.cli import main
from hybridexit.errors import ConfigError
from hybridexit.model.checkpoint import fingerprint
from hybridexit.runtime import wire
from hybridexit.runtime.client import EdgeOptions
from hybridexit.runtime.server import CloudModel, ServerSettings

TOKEN = "net-test-token-0123456789"
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("net") / "ck", thresholds=(0.0,))  # nothing exits


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    trustme = pytest.importorskip("trustme")
    d = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_pem.write_to_path(str(d / "server.key"))
    cert.cert_chain_pems[0].write_to_path(str(d / "server.crt"))
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    return d


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("imgs")
    for i in range(3):
        Image.new("RGB", (32, 32), (60 * i, 30, 90)).save(d / f"{i}.png")
    return d


# ---------------------------------------------------------------------------------------------- item 3
def test_token_in_clear_to_another_machine_needs_insecure(ckpt, images, capsys, monkeypatch):
    with pytest.raises(ConfigError, match="in clear"):
        EdgeOptions("http://192.0.2.10:8000", token=TOKEN)
    EdgeOptions("http://192.0.2.10:8000", token=TOKEN, insecure=True)  # said so: allowed
    EdgeOptions("http://192.0.2.10:8000")  # no token to leak
    for url in ("http://127.0.0.1:8000", "http://localhost:8000", "http://[::1]:8000", "https://192.0.2.10:8443"):
        EdgeOptions(url, token=TOKEN)
    monkeypatch.setenv("HYBRIDEXIT_TOKEN", TOKEN)
    t0 = time.monotonic()
    assert main(["edge", str(ckpt), "--cloud", "http://192.0.2.10:8000", "--images", str(images), "--engine",
                 "torch"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--insecure" in err and time.monotonic() - t0 < 30  # refused, nothing tried


@pytest.mark.parametrize("server_tls", [True, False])
def test_a_url_of_the_wrong_scheme_is_one_line_at_start(ckpt, pki, images, server_tls, capsys, monkeypatch):
    tls = (str(pki / "server.crt"), str(pki / "server.key")) if server_tls else None
    srv = Server(ckpt, ServerSettings(token=TOKEN), tls)
    try:
        wrong = srv.url.replace("https://", "http://") if server_tls else srv.url.replace("http://", "https://")
        monkeypatch.setenv("HYBRIDEXIT_TOKEN", TOKEN)
        code = main(["edge", str(ckpt), "--cloud", wrong, "--images", str(images), "--retries", "0",
                     "--ca", str(pki / "ca.pem"), "--engine", "torch"])
        err = "".join(ln for ln in capsys.readouterr().err.splitlines(True) if ln.startswith("hybridexit"))
        assert code == 2 and err.count("\n") == 1, err  # (the in-process server logs the bad request: not ours)
        assert ("speaks TLS: use https://" if server_tls else "answers plain HTTP, not TLS: use http://") in err
    finally:
        srv.stop()


# ---------------------------------------------------------------------------------------------- items 5 and 6
def _closed_within(socks, seconds) -> int:
    """How many of ``socks`` the server closed (EOF or reset) within ``seconds``."""
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    closed, t_end = 0, time.monotonic() + seconds
    while closed < len(socks) and time.monotonic() < t_end:
        for key, _ in sel.select(timeout=max(t_end - time.monotonic(), 0)):
            try:
                data = key.fileobj.recv(1024)
            except ConnectionError:
                data = b""
            if not data:
                sel.unregister(key.fileobj)
                closed += 1
    sel.close()
    return closed


def test_idle_and_half_sent_connections_do_not_lock_clients_out(ckpt):
    srv = Server(ckpt, ServerSettings(token=TOKEN, idle_timeout_s=2.0, header_timeout_s=2.0))
    host, port = srv.sock.getsockname()[:2]
    idle, half = [], []
    try:
        for _ in range(500):
            idle.append(socket.create_connection((host, port)))
        for _ in range(20):
            s = socket.create_connection((host, port))
            s.sendall(b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-")  # and no more
            half.append(s)
        body = wire.encode(torch.zeros(1, *CloudModel.from_checkpoint(ckpt, "cpu").feature_shape), fingerprint(ckpt))
        t0 = time.monotonic()
        r = httpx.post(f"{srv.url}/v1/infer", content=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
        assert r.status_code == 200 and time.monotonic() - t0 < 1.0  # answered at once, 520 sockets beside it
        assert _closed_within(idle + half, 8.0) == 520  # the server let none of them stay
        assert httpx.get(f"{srv.url}/healthz", timeout=5).status_code == 200
    finally:
        for s in idle + half:
            s.close()
        srv.stop()


def test_features_whose_output_would_not_be_finite_get_a_4xx(ckpt):
    srv = Server(ckpt, ServerSettings(token=TOKEN))
    try:
        shape = CloudModel.from_checkpoint(ckpt, "cpu").feature_shape
        huge = torch.full((2, *shape), 3e38)
        r = httpx.post(f"{srv.url}/v1/infer", content=wire.encode(huge, fingerprint(ckpt)),
                       headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
        assert 400 <= r.status_code < 500 and r.json()["error"] == "non_finite_output", r.text
        ok = httpx.post(f"{srv.url}/v1/infer", content=wire.encode(torch.ones(1, *shape), fingerprint(ckpt)),
                        headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
        assert ok.status_code == 200 and torch.isfinite(wire.decode(ok.content, fingerprint(ckpt))).all()
    finally:
        srv.stop()
