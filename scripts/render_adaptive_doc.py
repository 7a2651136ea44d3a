"""Render the figures section of docs/adaptive.md from results/adaptive.json (benchmarks/adaptive.py).

    python scripts/render_adaptive_doc.py [--check]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from splice import splice

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "adaptive.md"
RESULTS = ROOT / "results" / "adaptive.json"
BEGIN, END = "<!-- adaptive:figures -->", "<!-- /adaptive:figures -->"
WITHIN_TARGET = 0.99  # issue 39: the adaptive edge keeps >= 99 % of inputs within the target on every trace


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f} %"


def _routes(r: dict) -> str:
    names = {"cloud": "cloud", "local": "local", "fallback": "fallback"}
    parts = [f"{names[k]} {_pct(v)}" for k, v in r["routes"].items() if k in names]
    if r.get("degraded"):
        parts.append(f"degraded {_pct(r['degraded'])}")
    return ", ".join(parts) or "-"


def _ms(v) -> str:
    return "never" if v is None else f"{v:.0f}"


def _row(r: dict) -> str:
    exits = sum(v for k, v in r["routes"].items() if k.startswith("exit:"))
    total = r["compute_uj"] + r["radio_uj"]
    dis = "n/a" if r["exit_disagreement"] is None else _pct(r["exit_disagreement"])
    return (f"| {r['config']} | {r['arrivals']} ({r['unanswered_at_end']}) | **{_pct(r['arrival_within_slo'])}** / "
            f"{_pct(r['within_slo'])} | {_ms(r['arrival_ms_p50'])} / {_ms(r['arrival_ms_p95'])} / "
            f"{_ms(r['arrival_ms_p99'])} | {r['latency_ms_p95']:.1f} | {_pct(r['accuracy'])} "
            f"({_pct(r['full_network_accuracy_same_inputs'])}) | {_pct(exits)} | {dis} | "
            f"{r['payload_bytes_per_input']:.0f} | {r['compute_uj']:.1f} / {r['radio_uj']:.1f} / {total:.1f} | "
            f"{_routes(r)} |")


def _verdicts(rows: list[dict], adaptive: str) -> list[str]:
    """Issue 39's two targets for one adaptive configuration on one trace."""
    a = next((r for r in rows if r["config"] == adaptive), None)
    if a is None:
        return []
    w = a["arrival_within_slo"]
    ok = w >= WITHIN_TARGET
    out = [f"- `{adaptive}`: {_pct(w)} of the inputs answered within {a['slo_ms']:g} ms of their arrival "
           f"({_pct(a['within_slo'])} from the start of their processing): target >= 99 % "
           f"**{'met' if ok else 'missed'}**" + ("" if ok else f" (by {100 * (WITHIN_TARGET - w):.2f} points)") + "."]
    ea = a["compute_uj"] + a["radio_uj"]
    for s in rows:
        if not s["config"].startswith("static") or s["arrival_within_slo"] < WITHIN_TARGET:
            continue
        es = s["compute_uj"] + s["radio_uj"]
        out.append(f"  - `{s['config']}` also keeps the target ({_pct(s['arrival_within_slo'])}); edge energy {ea:.1f} uJ "
                   f"against its {es:.1f} uJ: no more **{'met' if ea <= es else 'missed'}**.")
    if len(out) == 1:
        statics = [r["compute_uj"] + r["radio_uj"] for r in rows if r["config"].startswith("static")]
        if a.get("edge_watts"):  # its computation is priced by time x power, the static rows' by the energy model
            out.append(f"  - no static configuration keeps the target on this trace (this row prices the edge's "
                       f"computation at {a['edge_watts']:g} W x its measured time; the static rows use the energy "
                       f"model: their energies are not comparable).")
        else:
            out.append("  - no static configuration keeps the target on this trace" + (
                f"; edge energy {ea:.1f} uJ per input against the static ones' {min(statics):.1f} to "
                f"{max(statics):.1f} uJ." if statics else "."))
    return out


def render() -> str:
    text = DOC.read_text()
    if not RESULTS.exists():
        return text
    res = json.loads(RESULTS.read_text())
    body = ["", f"Measured by `{res['command']}` on {res['date']} ({res['machine']}); checkpoint "
                f"`{res['checkpoint']}` (model SHA-256 `{res['model_sha256'][:16]}...`). Traces played "
                f"{res['speed']:g}x faster than recorded, one input every {res['interval_ms']:g} ms, batch 1, "
                f"target {res['slo_ms']:g} ms. Exit policy guarantee: {res['guarantee']}", ""]
    traces = list(dict.fromkeys(r["trace"] for r in res["rows"]))
    for t in traces:
        rows = [r for r in res["rows"] if r["trace"] == t]
        body += [f"### {t} ({rows[0]['link']} radio)", "",
                 "| configuration | inputs (unanswered at the end) | within target: from arrival / from start | "
                 "from arrival p50 / p95 / p99 ms | from start p95 ms | accuracy (whole network on the same inputs) "
                 "| exits | exit answers unlike the whole network | bytes / input | edge uJ / input: computation / "
                 "radio / total | answered |",
                 "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        body += [_row(r) for r in rows]
        body += [""]
        for cfg in ("adaptive", "adaptive-power"):
            body += _verdicts(rows, cfg)
        body += [""]
    eps = res.get("eps")
    worst = max((r["exit_disagreement"] for r in res["rows"]
                 if r["config"].startswith("adaptive") and r["exit_disagreement"] is not None), default=None)
    if eps is not None and worst is not None:
        body += [f"Exit answers unlike the whole network's, adaptive rows: at most {_pct(worst)} against the "
                 f"guarantee's {_pct(eps)} (a statement about exchangeable data with probability >= 0.9, checked "
                 f"here on each trace's inputs).", ""]
    k = res.get("kill_check")
    if k:
        body += [f"Kill check: `{k['command']}` was killed after {k['killed_after_records']} records and resumed: "
                 f"{k['records']} records for {k['inputs']} inputs, each input exactly once: "
                 f"**{'met' if k['each_input_exactly_once'] else 'missed'}**.", ""]
    return splice(text, BEGIN, END, "\n".join(body), str(DOC))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--check", action="store_true", help="exit 1 if docs/adaptive.md is not the rendering")
    a = p.parse_args()
    new = render()
    if a.check:
        return 0 if DOC.read_text() == new else 1
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
