"""A fresh venv with hybridexit-edge (edge/), without torch or numpy (the package needs only the standard library):
the wheel built from this checkout, cached per source hash under ``~/.cache/hybridexit/edge-package``
(``$HYBRIDEXIT_EDGE_CACHE``), installed offline. Used by tests/test_edge_package.py and benchmarks/edge_package.py."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EDGE = ROOT / "edge"
CORE = ("bconv.cpp", "kbit.cpp", "decide.cpp", "layout.cpp", "bconv_isa.inc", "kbit_isa.inc", "hx_edge.h",
        "hx_internal.h")


def source_hash() -> str:
    h = hashlib.sha256()
    files = sorted(EDGE.glob("hybridexit_edge/*.py")) + [EDGE / "setup.py", EDGE / "pyproject.toml"]
    for f in files + [EDGE / "csrc" / c for c in CORE]:
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def _pip(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=timeout)


def make_edge_venv(venv: Path) -> Path:
    """Build (or reuse) the wheel, create ``venv`` and install hybridexit-edge into it offline."""
    cache = Path(os.environ.get("HYBRIDEXIT_EDGE_CACHE") or Path.home() / ".cache" / "hybridexit" / "edge-package")
    wheels = cache / "wheels" / source_hash()
    if not list(wheels.glob("*.whl")):
        r = _pip("wheel", "--no-deps", "--no-build-isolation", str(EDGE), "-w", str(wheels))
        if r.returncode != 0:
            raise RuntimeError("building the hybridexit-edge wheel failed:\n" + r.stdout[-3000:] + r.stderr[-3000:])
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    r = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-index", "--find-links", str(wheels),
                        "hybridexit-edge"], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError("installing hybridexit-edge into a fresh venv failed:\n" + r.stderr[-3000:])
    return venv
