"""Generate the link traces of benchmarks/traces/ (synthetic, seeded: rerunning this script rewrites the same files).

    .venv/bin/python benchmarks/traces/make_traces.py

Each trace is ``t_s,up_mbps,down_mbps,rtt_ms,loss`` with one row per second (format: runtime/shaper.py). They are
models, not recordings; the ranges follow what measurement studies report for the situations named:

- ``commuter_lte.csv`` (240 s): a phone on a train or bus. A Markov chain over radio conditions (good / fair /
  poor / handover) held for a few seconds each; uplink log-normal around 12 / 4 / 0.6 / 0.3 Mbit/s, downlink
  about 3x the uplink, RTT 45 / 70 / 140 / 280 ms, loss 0 - 2 % (worse conditions, more loss). LTE uplinks swing
  between tens of Mbit/s and a few hundred kbit/s with 40 - 300 ms round trips (Huang et al., MobiSys 2012;
  van der Hooft et al., IEEE Comm. Letters 2016, 4G logs on commutes).
- ``wifi_interference.csv`` (240 s): an indoor Wi-Fi link (uplink ~40 Mbit/s, RTT ~8 ms) hit by interference
  bursts of 3 - 12 s (a microwave oven, a busy neighbouring channel) about every 25 s, during which the uplink falls
  to 0.4 - 3 Mbit/s, the RTT rises to 60 - 250 ms and 3 - 10 % of segments are lost.
- ``outage_30s.csv`` (180 s): a fair LTE link (uplink ~5 Mbit/s, RTT ~60 ms) with a 30 s outage (both rates 0)
  from t = 60 s to t = 90 s, e.g. a tunnel.
"""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from hybridexit.runtime.shaper import Trace  # noqa: E402

HERE = Path(__file__).resolve().parent
SEED = 20261207


def _lognormal(rng: random.Random, median: float, sigma: float) -> float:
    return median * math.exp(rng.gauss(0.0, sigma))


def commuter_lte(rng: random.Random, seconds: int = 240) -> Trace:
    states = {  # uplink median Mbit/s, RTT median ms, loss, mean dwell s
        "good": (12.0, 45.0, 0.0, 12), "fair": (4.0, 70.0, 0.002, 8),
        "poor": (0.6, 140.0, 0.01, 6), "handover": (0.3, 280.0, 0.02, 2),
    }
    nxt = {"good": ["fair", "fair", "handover"], "fair": ["good", "poor", "handover"],
           "poor": ["fair", "fair", "handover"], "handover": ["good", "fair", "poor"]}
    rows, state, left = [], "good", 10
    for t in range(seconds):
        if left <= 0:
            state = rng.choice(nxt[state])
            left = max(1, round(rng.expovariate(1 / states[state][3])))
        up, rtt, loss, _ = states[state]
        u = round(_lognormal(rng, up, 0.35), 3)
        rows.append((t, u, round(u * _lognormal(rng, 3.0, 0.2), 3), round(_lognormal(rng, rtt, 0.2), 1), loss))
        left -= 1
    return Trace(*map(tuple, zip(*rows)), name="commuter_lte")


def wifi_interference(rng: random.Random, seconds: int = 240) -> Trace:
    rows, burst_left, quiet_left = [], 0, 15
    for t in range(seconds):
        if burst_left == 0 and quiet_left <= 0:
            burst_left, quiet_left = rng.randint(3, 12), round(rng.expovariate(1 / 25)) + 5
        if burst_left > 0:
            u = round(rng.uniform(0.4, 3.0), 3)
            row = (t, u, round(u * rng.uniform(1.5, 3.0), 3), round(rng.uniform(60, 250), 1),
                   round(rng.uniform(0.03, 0.10), 3))
            burst_left -= 1
        else:
            u = round(_lognormal(rng, 40.0, 0.15), 3)
            row = (t, u, round(u * _lognormal(rng, 1.5, 0.1), 3), round(_lognormal(rng, 8.0, 0.25), 1), 0.0)
            quiet_left -= 1
        rows.append(row)
    return Trace(*map(tuple, zip(*rows)), name="wifi_interference")


def outage_30s(rng: random.Random, seconds: int = 180, start: int = 60, length: int = 30) -> Trace:
    rows = []
    for t in range(seconds):
        if start <= t < start + length:
            rows.append((t, 0.0, 0.0, 60.0, 0.0))
        else:
            u = round(_lognormal(rng, 5.0, 0.3), 3)
            rows.append((t, u, round(u * _lognormal(rng, 3.0, 0.2), 3), round(_lognormal(rng, 60.0, 0.15), 1), 0.001))
    return Trace(*map(tuple, zip(*rows)), name="outage_30s")


TRACES = {"commuter_lte": commuter_lte, "wifi_interference": wifi_interference, "outage_30s": outage_30s}


def main() -> None:
    for i, (name, make) in enumerate(TRACES.items()):
        make(random.Random(SEED + i)).write(HERE / f"{name}.csv")


if __name__ == "__main__":
    main()
