"""docs/deploy.md, run: its `sh` blocks in order as one bash script (a tiny checkpoint for the real one, free ports
for 8443/8001/8002, a few PNGs for photos/), its systemd units checked by `systemd-analyze verify` and their
ExecStart= commands run (server, then the edge against it, then the unit's KillSignal)."""

import json
import os
import re
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import random_inputs, write_tiny_checkpoint

from hybridexit.runtime.server import bind_socket

DOC = Path(__file__).resolve().parent.parent / "docs" / "deploy.md"
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
DOC_CKPT = "checkpoints/c10-r32-e20-b1-x20"
BIN = str(Path(sys.executable).parent)  # the venv's bin: hybridexit is there

for tool in ("bash", "openssl", "curl"):
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed", allow_module_level=True)


def blocks(kind: str) -> list[str]:
    return [body for lang, body in BLOCK.findall(DOC.read_text()) if lang == kind]


def free_port() -> int:
    s = bind_socket("127.0.0.1", 0)
    port = s.getsockname()[1]
    s.close()
    return port


def with_ports(text: str, ports: dict[str, int]) -> str:
    return re.sub(r"\b(8443|8001|8002)\b", lambda m: str(ports[m.group(1)]), text)


def write_photos(folder: Path, n: int, seed: int = 0) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(random_inputs(n, seed).images):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")


def run_script(script: str, cwd: Path, timeout: float) -> tuple[int, str, str]:
    """bash -eu: the doc's commands as a user pastes them; every process it started is killed afterwards."""
    p = subprocess.Popen(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True,
                         env={**os.environ, "PATH": BIN + os.pathsep + os.environ["PATH"], "HYBRIDEXIT_TOKEN": ""})
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # servers left behind by a failed step
        except ProcessLookupError:
            pass
    return p.returncode, out, err


def test_the_doc_has_only_blocks_the_tests_cover():
    """sh, ini and nginx blocks run here; console blocks are the device section's commands (scp, pip on the
    device), whose flow tests/test_edge_package.py runs: export, the wheel in a fresh venv, info, run."""
    langs = [lang for lang, _ in BLOCK.findall(DOC.read_text())]
    assert set(langs) <= {"sh", "ini", "nginx", "console"} and langs.count("sh") >= 6 and langs.count("ini") == 3
    assert langs.count("console") == 3 and "hybridexit-edge run" in DOC.read_text().split("```console")[-1]


@pytest.fixture(scope="module")
def doc_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("deploy")
    ckpt = write_tiny_checkpoint(tmp_path_factory.mktemp("ck") / "ck")
    write_photos(work / "photos", 5)
    ports = {p: free_port() for p in ("8443", "8001", "8002")}
    script = with_ports("\n".join(blocks("sh")), ports).replace(DOC_CKPT, str(ckpt))
    code, out, err = run_script(script, work, timeout=400)
    return {"work": work, "ckpt": ckpt, "ports": ports, "code": code, "out": out, "err": err}


def test_every_sh_command_of_the_doc_runs(doc_run):
    work, out, err = doc_run["work"], doc_run["out"], doc_run["err"]
    assert doc_run["code"] == 0, err[-3000:]
    assert oct((work / "token").stat().st_mode & 0o777) == "0o600"
    assert f"ready at https://0.0.0.0:{doc_run['ports']['8443']}" in out
    assert "accuracy" in out and "energy reduction" in out  # the edge's summary table
    recs = [json.loads(line) for line in (work / "records.jsonl").read_text().splitlines()]
    assert len(recs) == 5 and all(r["decided_at"] != "fallback" for r in recs)
    stats = [json.loads(line) for line in out.splitlines() if line.startswith('{"requests"')]
    assert len(stats) == 3 and all("batch_samples" in d for d in stats)  # the TLS server's, then each replica's
    assert err.count("hybridexit serve: stopped on SIGTERM") == 3
    assert "Traceback" not in err and "without TLS" not in err


def _units(doc_run, tmp_path) -> dict[str, Path]:
    """The doc's units with paths made local: /etc/hybridexit -> the doc run's files, /srv and /var -> tmp."""
    etc, var = tmp_path / "etc", tmp_path / "var"
    etc.mkdir()
    (var / "incoming").mkdir(parents=True)
    for f in ("token", "ca.pem", "server.crt", "server.key"):
        shutil.copy(doc_run["work"] / f, etc / f)
    port = str(free_port())
    out = {}
    for body in blocks("ini"):
        name = body.splitlines()[0].split("/")[-1]
        text = (body.replace("/srv/hybridexit/.venv/bin/hybridexit", f"{BIN}/hybridexit")
                .replace(f"/srv/hybridexit/{DOC_CKPT}", str(doc_run["ckpt"])).replace("/srv/hybridexit", str(tmp_path))
                .replace("/etc/hybridexit", str(etc)).replace("/var/lib/hybridexit", str(var))
                .replace("cloud.example", "localhost").replace("8443", port).replace("User=hybridexit\n", ""))
        out[name] = tmp_path / name
        out[name].write_text(text)
    return out


def _setting(unit: Path, key: str) -> str:
    return next(line.split("=", 1)[1] for line in unit.read_text().splitlines() if line.startswith(key + "="))


def _exec_start(unit: Path) -> list[str]:
    """ExecStart= as systemd runs it: %% and $$ are systemd's escapes of % and $."""
    return shlex.split(_setting(unit, "ExecStart").replace("%%", "%").replace("$$", "$"))


def test_systemd_units_verify_and_their_commands_run(doc_run, tmp_path):
    assert doc_run["code"] == 0
    units = _units(doc_run, tmp_path)
    assert set(units) == {"hybridexit-serve.service", "hybridexit-edge.path", "hybridexit-edge.service"}
    if shutil.which("systemd-analyze"):
        v = subprocess.run(["systemd-analyze", "verify", *map(str, units.values())], capture_output=True, text=True,
                           timeout=60)
        assert v.returncode == 0 and not v.stderr.strip(), v.stderr

    serve = units["hybridexit-serve.service"]
    server = subprocess.Popen(_exec_start(serve), cwd=_setting(serve, "WorkingDirectory"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        url = "https://localhost:" + re.search(r"--port (\d+)", serve.read_text()).group(1)
        ca = ssl.create_default_context(cafile=str(tmp_path / "etc" / "ca.pem"))
        t_end = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.communicate()[1]
            try:
                if httpx.get(url + "/healthz", verify=ca).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < t_end, "the server unit's command did not become healthy"
            time.sleep(0.5)

        write_photos(tmp_path / "var" / "incoming", 3, seed=1)
        edge = units["hybridexit-edge.service"]
        r = subprocess.run(_exec_start(edge), cwd=_setting(edge, "WorkingDirectory"), capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert json.loads(r.stdout)["n"] == 3 and not any((tmp_path / "var" / "incoming").iterdir())
        (records,) = (tmp_path / "var" / "batches").glob("*.jsonl")
        recs = [json.loads(line) for line in records.read_text().splitlines()]
        assert len(recs) == 3 and all(r["decided_at"] != "fallback" for r in recs)

        server.send_signal(getattr(signal, _setting(serve, "KillSignal")))
        _, err = server.communicate(timeout=float(_setting(serve, "TimeoutStopSec")))
        assert server.returncode == 0 and err.strip().splitlines()[-1] == "hybridexit serve: stopped on SIGTERM"
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
