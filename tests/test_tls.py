"""TLS end to end: a certificate authority and a server certificate generated here (trustme), a real HTTPS
server (uvicorn's own TLS) and the edge verifying it; the token from a file; the warning for plain HTTP on a
non-loopback address."""

import json
import threading
import time

import pytest
import torch
from conftest import random_inputs, write_tiny_checkpoint

from hybridexit.cli import main
from hybridexit.model.checkpoint import load_model
from hybridexit.runtime.client import EdgeOptions, run_edge
from hybridexit.runtime.process import ServerProcess
from hybridexit.runtime.server import CloudModel, ServerSettings, bind_socket, make_server, url_of
from hybridexit.runtime.transport import CloudRejected

trustme = pytest.importorskip("trustme")
TOKEN = "tls-test-token-0123456789"
N = 6


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # threshold 0: no input exits, every one goes to the cloud over TLS
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tls") / "ck", thresholds=(0.0,))


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_pem.write_to_path(str(d / "server.key"))
    cert.cert_chain_pems[0].write_to_path(str(d / "server.crt"))
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(str(d / "server.crt"), append=True)
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    other = trustme.CA()  # a CA that did not sign the server's certificate
    other.cert_pem.write_to_path(str(d / "other-ca.pem"))
    (d / "token").write_text(TOKEN + "\n")
    return d


@pytest.fixture(scope="module")
def images():
    return random_inputs(N, seed=3)


@pytest.fixture(scope="module")
def https_server(ckpt, pki):
    """A real uvicorn HTTPS server in a thread of this process."""
    sock = bind_socket("127.0.0.1", 0)
    server = make_server(CloudModel.from_checkpoint(ckpt, "cpu"), ServerSettings(token=TOKEN), sock,
                         tls_cert=str(pki / "server.crt"), tls_key=str(pki / "server.key"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    t_end = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < t_end and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    yield url_of(sock, tls=True)
    server.should_exit = True
    thread.join(15)
    sock.close()


def test_edge_verifies_the_server_with_the_given_ca(https_server, ckpt, pki, images):
    assert https_server.startswith("https://127.0.0.1:")
    # the torch engine: the reference below is the torch model (other engines agree only to float rounding)
    summary, recs = run_edge(ckpt, images, EdgeOptions(https_server, token=TOKEN, ca=str(pki / "ca.pem"), engine="torch"))
    model, _ = load_model(ckpt)
    with torch.no_grad():
        want = model(images.images)[-1].argmax(1).tolist()
    assert [r["decided_at"] for r in recs] == ["cloud"] * N  # every answer crossed the TLS connection
    assert [r["prediction"] for r in recs] == want
    assert summary["fallback_fraction"] == 0 and summary["requests"] == N


@pytest.mark.parametrize("ca", [None, "other-ca.pem"])
def test_edge_refuses_a_certificate_it_cannot_verify(https_server, ckpt, pki, images, ca):
    # not retried and not a fallback: an unverifiable server is a configuration error, whatever the policy
    opts = EdgeOptions(https_server, token=TOKEN, ca=str(pki / ca) if ca else None, on_cloud_failure="fallback")
    with pytest.raises(CloudRejected, match="cannot verify the certificate.*--ca") as e:
        run_edge(ckpt, images, opts)
    assert e.value.code == "tls_verify_failed" and e.value.attempts == 1


def test_cli_serve_and_edge_over_tls_with_token_files(ckpt, pki, images, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HYBRIDEXIT_TOKEN", raising=False)
    args = ["--tls-cert", str(pki / "server.crt"), "--tls-key", str(pki / "server.key"), "--token-file",
            str(pki / "token"), "--threads", "1"]
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(images.images[i].permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    imgs = ["--images", str(folder)]
    with ServerProcess(ckpt, args) as srv:
        assert srv.url.startswith("https://")
        out = tmp_path / "r.jsonl"
        code = main(["edge", str(ckpt), "--cloud", srv.url, "--ca", str(pki / "ca.pem"), "--token-file",
                     str(pki / "token"), "--out", str(out), "--json", *imgs])
        assert code == 0, capsys.readouterr().err
        summary = json.loads(capsys.readouterr().out)
        recs = [json.loads(line) for line in out.read_text().splitlines()]
        assert summary["n"] == 4 and len(recs) == 4 and {r["decided_at"] for r in recs} == {"cloud"}
        # without the token the server refuses: the edge stops at once
        assert main(["edge", str(ckpt), "--cloud", srv.url, "--ca", str(pki / "ca.pem"), *imgs]) == 2
        assert "missing_token" in capsys.readouterr().err
        # plain HTTP to the HTTPS port does not get through
        assert main(["edge", str(ckpt), "--cloud", srv.url.replace("https", "http"), "--token-file",
                     str(pki / "token"), "--retries", "0", "--on-cloud-failure", "error", *imgs]) == 2
        capsys.readouterr()
    assert srv.proc.returncode == 0


@pytest.mark.parametrize("tls", [False, True])
def test_non_loopback_bind_warns_without_tls(ckpt, pki, tls):
    args = ["--host", "0.0.0.0", "--token-file", str(pki / "token"), "--threads", "1"]
    if tls:
        args += ["--tls-cert", str(pki / "server.crt"), "--tls-key", str(pki / "server.key")]
    with ServerProcess(ckpt, args) as srv:
        time.sleep(0.2)
        warned = [ln for ln in srv.stderr_tail if "without TLS" in ln]
    assert len(warned) == (0 if tls else 1)
    if not tls:
        assert warned[0].startswith("hybridexit serve: warning: listening on 0.0.0.0 without TLS")
