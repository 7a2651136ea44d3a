"""The adaptive edge (``hybridexit edge --slo-ms``): per input, a plan chosen against a latency target.

At start the edge measures itself (``profile``): its time to every block boundary (the engine's edge half up to
the checkpoint's boundary, torch blocks after it, the final head), each codec's bytes and encoding time at each
boundary, and on the validation split the entropies at every exit (the exit rate of each certified exit policy,
``guarantee.levels`` of the exit policy). ``build_plans`` turns that into ``adaptive.Plan``s with their costs: the
energy model's computation per block and exit (``energy.energy_report``; or, with ``edge_watts``, measured time x
power), the radio's energy per bit (``links.py``) on the request's bytes (HTTP headers included).

Per input (``AdaptiveEdge.run_one``): a probe first when the link has been quiet (``GET /healthz``, timed); the
policy's choice on the live estimate; the edge runs to the hand-off (exits on the way, with the plan's thresholds);
an input no exit answers is either finished locally (a local plan: the rest of the network on the edge) or sent to
the cloud with the frame naming its boundary, with a timeout that leaves room to finish locally within the target.
When that request fails, the edge finishes the network itself and the record is ``degraded``. Every record names
its plan, predicted and measured latency, bytes and its edge energy split into computation and radio.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, replace

import torch

from ..errors import ConfigError
from ..model.exits import exit_rule
from . import wire
from .adaptive import AdaptivePolicy, Plan
from .linkest import LinkEstimate

PROBE_BYTES = 120  # a GET /healthz: request line and headers, about


@dataclass(frozen=True)
class AdaptiveOptions:
    slo_ms: float
    quantile: float = 0.95
    link: str = "lte"  # the radio whose energy per bit is charged (links.LINKS)
    uj_per_bit: float | None = None
    edge_watts: float | None = None  # None: computation from the energy model; else measured time x this power
    codecs: tuple[str, ...] = ("bn", "int8", "fp16")  # bn only where it was trained (the checkpoint's boundary)
    boundaries: str = "split"  # "split": the checkpoint's boundary and local; "all": every block boundary too
    window_s: float = 5.0
    probe_interval_s: float = 0.5
    margin: float = 0.9
    calibration_images: int = 1000
    timing_reps: int = 15

    def __post_init__(self):
        if not self.slo_ms > 0:
            raise ConfigError(f"--slo-ms {self.slo_ms}: the latency target must be > 0 ms")
        if self.boundaries not in ("split", "all"):
            raise ConfigError(f"boundaries={self.boundaries!r}: use 'split' or 'all'")
        if self.edge_watts is not None and not self.edge_watts > 0:
            raise ConfigError("edge_watts must be > 0")


@dataclass
class Profile:
    """What the edge measured of itself (ms at batch 1, median of ``reps``) and of its codecs."""

    n_blocks: int
    split: int  # the checkpoint's boundary
    to_boundary_ms: dict[int, float]  # time to the features at boundary b (exits evaluated on the way)
    exit_ms: list[float]  # time of an input answered at exit k
    head_ms: float
    frame: dict[tuple[int, str], tuple[float, float]]  # (boundary, codec) -> (frame bytes, encode ms)
    entropies: torch.Tensor  # (n_val, K) entropy at each exit on the validation split
    http_overhead: int  # bytes of an inference request besides the frame (request line and headers)


def _median_ms(fn, reps: int) -> float:
    fn()  # warm
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1000.0)
    return sorted(ts)[len(ts) // 2]


def request_overhead(url: str, token: str | None) -> int:
    """Bytes of an HTTP/1.1 inference request besides its body, as httpx writes it (request line + headers)."""
    import httpx

    headers = {"Content-Type": wire.CONTENT_TYPE, "Content-Length": "1000"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    with httpx.Client(base_url=url.rstrip("/")) as c:
        req = c.build_request("POST", "/v1/infer", content=b"x" * 1000, headers=headers)
    line = f"POST {req.url.raw_path.decode()} HTTP/1.1\r\n"
    return len(line) + sum(len(k) + len(v) + 4 for k, v in req.headers.raw) + 2


def profile(model, engine, codecs: dict, boundaries: list[int], val_images: torch.Tensor, reps: int,
            http_overhead: int) -> Profile:
    """Measure the edge: time to each boundary, per exit and head; each codec's bytes and time; val entropies.
    ``codecs``: label -> (codec for ``wire.encode``, zstd), as ``codec_specs`` gives."""
    cfg = model.cfg
    m, n = cfg.edge_blocks, len(model.blocks)
    k = len(cfg.exits)
    x1 = val_images[:1]
    never = (0.0,) * k  # entropy is never below 0: nothing exits, the whole edge half runs
    with torch.inference_mode():
        r = engine.decide(x1, never)
        feats = {m: r.features}
        to_ms = {m: _median_ms(lambda: engine.decide(x1, never), reps)}
        exit_ms = []
        for j in range(k):  # exit j answers: thresholds inf at j, 0 before it
            thr = tuple(math.inf if i == j else 0.0 for i in range(k))
            exit_ms.append(_median_ms(lambda t=thr: engine.decide(x1, t), reps))
        for b in sorted(bb for bb in boundaries if bb < m):
            edge_b, _ = model.split(at=b)
            edge_b.eval()
            feats[b] = edge_b.decide(x1, never).features
            to_ms[b] = _median_ms(lambda e=edge_b: e.decide(x1, never), reps)
        h, acc = feats[m], to_ms[m]
        for b in range(m, n):
            blk = model.blocks[b]
            acc += _median_ms(lambda blk=blk, h=h: blk(h), reps)
            h = blk(h)
            to_ms[b + 1] = acc
            feats[b + 1] = h
        head_ms = _median_ms(lambda: model.head(h), reps)
        frame = {}
        for b in boundaries:
            if b == n:
                continue
            for name, (codec, z) in codecs.items():
                if not _codec_fits(name, b, m):
                    continue
                body = wire.encode(feats[b], "0" * 16, codec, z, boundary=b)
                ms = _median_ms(lambda c=codec, z=z, f=feats[b], bb=b: wire.encode(f, "0" * 16, c, z, boundary=bb),
                                reps)
                frame[(b, name)] = (float(len(body)), ms)
        ents = []
        for i in range(0, len(val_images), 500):
            ents.append(engine.decide(val_images[i:i + 500], never).entropies.cpu())
    return Profile(n, m, {b: to_ms[b] for b in set(boundaries) | {m}}, exit_ms, head_ms, frame,
                   torch.cat(ents) if ents else torch.zeros(0, k), http_overhead)


def _codec_fits(name: str, b: int, split: int) -> bool:
    """A learned codec reads the features it was trained on: the checkpoint's boundary only."""
    from ..codecs import V1_NAMES

    return name.partition("+")[0] in V1_NAMES or b == split


@dataclass(frozen=True)
class EnergyParts:
    """The energy model's computation per part of the network (uJ per input)."""

    stem: float
    blocks: tuple[float, ...]
    exits: tuple[float, ...]  # each exit head alone
    head: float
    exit_path: tuple[float, ...]  # input answered at exit k: stem, blocks to it, exit heads to k

    @classmethod
    def of(cls, cfg) -> EnergyParts:
        from ..model.energy import energy_report
        from ..model.resnet import block_specs

        rep = energy_report(cfg)
        t = rep.table
        stem = head = 0.0
        blocks = [0.0] * len(block_specs(cfg))
        exits = [0.0] * len(cfg.exits)
        for row in rep.layers:
            uj = row.compute_pj(t) / 1e6
            if row.placement.startswith("exit:"):
                exits[int(row.placement[5:])] += uj
            elif row.block is not None:
                blocks[row.block] += uj
            elif row.placement == "edge":
                stem += uj
            else:
                head += uj
        return cls(stem, tuple(blocks), tuple(exits), head, tuple(rep.exit_path_uj))

    def to_boundary(self, cfg, b: int) -> float:
        """A non-exiting input's computation to the features at boundary b (exit heads on the way included)."""
        return (self.stem + sum(self.blocks[:b])
                + sum(e for j, e in enumerate(self.exits) if cfg.exit_block(j) < b))


def exit_rates(entropies: torch.Tensor, thresholds, exits_before: list[int]) -> list[float]:
    """Share of the validation inputs answered at each exit (only those in ``exits_before`` run)."""
    n = len(entropies)
    left = torch.ones(n, dtype=torch.bool)
    out = [0.0] * entropies.shape[1]
    for j in exits_before:
        here = left & exit_rule(entropies[:, j], thresholds[j])
        out[j] = float(here.sum()) / max(n, 1)
        left &= ~here
    return out


def build_plans(cfg, prof: Profile, parts: EnergyParts, levels: list[tuple[float, ...]], eps: float | None,
                boundaries: list[int], codec_uj: dict[str, float] | None = None,
                edge_watts: float | None = None) -> list[Plan]:
    """Every (boundary, codec, exit policy) the edge can run, with its measured and modelled costs.
    ``codec_uj``: the computation a codec adds at the edge per offloaded input (a learned reduction)."""
    codec_uj = codec_uj or {}
    n = prof.n_blocks
    plans = []
    for lv, thr in enumerate(levels):
        for b in boundaries:
            before = [j for j in range(len(cfg.exits)) if cfg.exit_block(j) < b]
            rates = exit_rates(prof.entropies, thr, before)
            er = sum(rates)
            ms_exit = sum(r * prof.exit_ms[j] for j, r in enumerate(rates)) / er if er else 0.0
            uj_exit = sum(r * parts.exit_path[j] for j, r in enumerate(rates)) / er if er else 0.0
            common = {"n_blocks": n, "level": lv, "exit_rate": er, "edge_ms_exit": ms_exit, "eps": eps}
            if b == n:
                ms_on = prof.to_boundary_ms[n] + prof.head_ms
                uj_on = parts.to_boundary(cfg, n) + parts.head
                if edge_watts is not None:
                    uj_exit, uj_on = edge_watts * ms_exit * 1000.0, edge_watts * ms_on * 1000.0
                plans.append(Plan(handoff=n, codec=None, edge_ms_on=ms_on, uj_exit=uj_exit, uj_on=uj_on, **common))
                continue
            for (bb, name), (nbytes, enc_ms) in prof.frame.items():
                if bb != b:
                    continue
                ms_on = prof.to_boundary_ms[b] + enc_ms
                uj_on = parts.to_boundary(cfg, b) + codec_uj.get(name, 0.0)
                if edge_watts is not None:
                    uj_x, uj_on = edge_watts * ms_exit * 1000.0, edge_watts * ms_on * 1000.0
                else:
                    uj_x = uj_exit
                plans.append(Plan(handoff=b, codec=name, edge_ms_on=ms_on, uj_exit=uj_x, uj_on=uj_on,
                                  request_bytes=nbytes + prof.http_overhead, server_ms=max(
                                      prof.to_boundary_ms[n] - prof.to_boundary_ms[b], 0.0) + prof.head_ms,
                                  **common))
    return plans


def codec_specs(names, checkpoint, calibration=None) -> dict:
    """Label -> (codec for ``wire.encode``, zstd or not): ``bn`` (the checkpoint's learned codec, where it has one),
    fp32 / fp16 / int8, each optionally ``+zstd``."""
    from .. import codecs as codec_registry

    out = {}
    for label in names:
        name, _, z = label.partition("+")
        if z not in ("", "zstd"):
            raise ConfigError(f"codec {label!r}: only fp32/fp16/int8 take '+zstd'")
        if name in codec_registry.V1_NAMES:
            out[label] = (name, bool(z))
        elif z:
            raise ConfigError(f"codec {label!r}: {name} codes its own payload, '+zstd' applies to fp32/fp16/int8")
        else:
            out[label] = (codec_registry.get(name, checkpoint=checkpoint, calibration=calibration), False)
    return out


def exit_levels(policy, thresholds=None) -> tuple[list[tuple[float, ...]], float | None]:
    """The exit policies the adaptive edge may use, each carrying the policy's guarantee: the levels a
    Learn-then-Test fixed-sequence test passed (``guarantee.levels``, strictest first), else the thresholds alone."""
    if thresholds is not None:
        return [tuple(float(t) for t in thresholds)], None
    g = (policy.guarantee or {}) if policy is not None else {}
    levels = [tuple(float(t) for t in lv) for lv in g.get("levels", [])]
    if not levels and policy is not None and policy.thresholds:
        levels = [tuple(policy.thresholds)]
    return levels, g.get("eps")


class AdaptiveEdge:
    """Runs inputs one at a time under ``AdaptiveOptions`` (see the module): choose, run, record."""

    def __init__(self, model, policy, fingerprint: str, options, adaptive: AdaptiveOptions, codecs: dict,
                 val_images: torch.Tensor, classes=None, cloud=None):
        from ..codecs.links import codec_uj, link
        from ..engines import engine_name, get_engine
        from .transport import CloudClient

        cfg = model.cfg
        self.cfg, self.opt, self.ad, self.fingerprint, self.classes = cfg, options, adaptive, fingerprint, classes
        self.model = model.eval()
        self.n, self.m = len(model.blocks), cfg.edge_blocks
        edge, _ = model.split()
        self.engine = get_engine(options.engine, edge.eval())
        self.engine_name = engine_name(self.engine)
        self.boundaries = [self.m, self.n] if adaptive.boundaries == "split" else list(range(self.n + 1))
        self.edge_at = {b: model.split(at=b)[0].eval() for b in self.boundaries if b < self.m}
        self.levels, eps = exit_levels(policy, options.thresholds)
        if not self.levels and cfg.exits:
            raise ConfigError("the adaptive edge needs exit thresholds: calibrate the checkpoint or pass --thresholds")
        self.temperatures = (policy.temperatures or None) if policy is not None else None
        self.codecs = codecs
        self.cloud = cloud or CloudClient(options.cloud_url, options.token, options.timeout_s, 0, 0.0, 0.0, options.ca)
        self.estimate = LinkEstimate(adaptive.window_s, probe_interval_s=adaptive.probe_interval_s)
        self.link = link(adaptive.link, adaptive.uj_per_bit)
        overhead = request_overhead(options.cloud_url, options.token)
        self.profile = profile(model, self.engine, codecs, self.boundaries,
                               val_images[:adaptive.calibration_images], adaptive.timing_reps, overhead)
        self.parts = EnergyParts.of(cfg)
        from ..model.energy import EnergyTable

        table = EnergyTable()
        shape = tuple(edge.feature_shape)
        cuj = {k: codec_uj(v[0].edge_macs(shape), table) for k, v in codecs.items() if not isinstance(v[0], str)}
        self.plans = build_plans(cfg, self.profile, self.parts, self.levels, eps, self.boundaries, cuj,
                                 adaptive.edge_watts)
        self.policy = AdaptivePolicy(self.plans, self.link, adaptive.slo_ms, adaptive.quantile, adaptive.margin)
        # the link matters only if some offloading plan costs less energy than the best local plan in the target
        local_ok = [self.policy.energy(p) for p in self.plans if p.local and p.edge_ms_on <= adaptive.slo_ms]
        self.link_matters = not local_ok or any(self.policy.energy(p) < min(local_ok)
                                                for p in self.plans if not p.local)
        self.probe_bytes = 0
        self.probes = 0
        self._probe_uj = 0.0  # radio of probes not yet charged to a record
        self._stop = threading.Event()
        self._prober: threading.Thread | None = None

    # ------------------------------------------------------------------ the link
    def probe(self, client=None) -> None:
        """A timed ``GET /healthz``: the round trip, or the link marked down."""
        t = time.perf_counter()
        ok = (client or self.cloud).health(timeout_s=min(1.0, self.opt.timeout_s))
        ms = (time.perf_counter() - t) * 1000.0
        self.probes += 1
        self.probe_bytes += PROBE_BYTES
        self._probe_uj += self.link.transmit_uj(PROBE_BYTES)
        if ok:
            self.estimate.observe(PROBE_BYTES, ms)
        else:
            self.estimate.observe_failure()

    def _probe_loop(self, client) -> None:
        """In the background (never in an input's way): a probe whenever the link has been quiet."""
        with client:
            while not self._stop.wait(self.ad.probe_interval_s / 4):
                if self.estimate.needs_probe():
                    self.probe(client)

    def __enter__(self):
        """Start the background probe (only when some offloading plan could be the cheapest); close on exit."""
        from .transport import CloudClient

        if self.link_matters:
            client = CloudClient(self.opt.cloud_url, self.opt.token, self.opt.timeout_s, 0, 0.0, 0.0, self.opt.ca)
            self._prober = threading.Thread(target=self._probe_loop, args=(client,), daemon=True, name="probe")
            self._prober.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._prober is not None:
            self._prober.join(5)
        self.cloud.close()

    def _server_time(self, plan: Plan, served_ms: float) -> None:
        """The cloud's reported time for this boundary: the plans sending there are re-priced (moving average)."""
        if not math.isfinite(served_ms):
            return
        new = [replace(p, server_ms=0.8 * p.server_ms + 0.2 * served_ms) if p.handoff == plan.handoff and not p.local
               else p for p in self.policy.plans]
        self.policy = AdaptivePolicy(new, self.link, self.ad.slo_ms, self.ad.quantile, self.ad.margin)

    # ------------------------------------------------------------------ one input
    def _finish(self, h: torch.Tensor, b: int) -> torch.Tensor:
        for i in range(b, self.n):
            h = self.model.blocks[i](h)
        return self.model.head(h)

    def _uj(self, what: str, ms: float, model_uj: float) -> float:
        return self.ad.edge_watts * ms * 1000.0 if self.ad.edge_watts is not None else model_uj

    def run_one(self, image: torch.Tensor, label: int, index: int, waited_ms: float = 0.0) -> dict:
        """One input; ``waited_ms``: how long it has waited since it arrived (behind earlier inputs)."""
        from .transport import CloudError

        radio, self._probe_uj = self._probe_uj, 0.0
        choice = self.policy.choose(self.estimate, waited_ms)
        plan = choice.plan
        thr = self.levels[plan.level] if self.levels else ()
        t0 = time.perf_counter()
        with torch.inference_mode():
            runner = self.engine if plan.handoff >= self.m else self.edge_at[plan.handoff]
            r = runner.decide(image, thr, self.temperatures)
        ents = [round(float(e), 6) for e in r.entropies[0].tolist() if not math.isnan(e)]
        rec = {"index": index, "label": int(label), "prediction": int(r.predictions[0]), "entropies": ents,
               "plan": plan.label, "handoff": plan.handoff, "codec": plan.codec, "level": plan.level,
               "thresholds": list(thr), "predicted_ms": round(choice.predicted_ms, 3)
               if math.isfinite(choice.predicted_ms) else None, "degraded": choice.degraded, "payload_bytes": 0,
               "waited_ms": round(waited_ms, 3),
               "engine": self.engine_name}
        if not r.remaining.numel():  # an exit answered
            k = int(r.decided_at[0])
            ms = (time.perf_counter() - t0) * 1000.0
            rec.update(decided_at=f"exit:{k}", latency_ms=round(ms, 3), degraded=False,  # answered as designed
                       compute_uj=self._uj("exit", ms, self.parts.exit_path[k]), radio_uj=radio)
            return rec
        h, at = r.features, min(plan.handoff, self.m)  # the engine stops at the checkpoint's boundary
        with torch.inference_mode():
            for i in range(at, plan.handoff if not plan.local else at):  # hand-off after it: float blocks here
                h = self.model.blocks[i](h)
        at = max(at, plan.handoff) if not plan.local else at
        if plan.local:
            with torch.inference_mode():
                logits = self._finish(h, at)
            ms = (time.perf_counter() - t0) * 1000.0
            rec.update(prediction=int(logits.argmax(1)[0]), decided_at="local", latency_ms=round(ms, 3),
                       compute_uj=self._uj("local", ms, plan.uj_on), radio_uj=radio)
            return rec
        codec, z = self.codecs[plan.codec]
        body = wire.encode(h, self.fingerprint, codec, z, boundary=plan.handoff)
        t_send = time.perf_counter()
        edge_ms = (t_send - t0) * 1000.0
        timeout = self.policy.request_timeout_ms(plan, waited_ms + edge_ms) / 1000.0
        sent = len(body) + self.profile.http_overhead
        radio += self.link.transmit_uj(sent)
        rec["payload_bytes"] = len(body)
        try:
            reply = self.cloud.infer(body, self.fingerprint, self.cfg.num_classes, timeout_s=timeout)
        except CloudError as e:
            self.estimate.observe_failure()
            t_fail = time.perf_counter()
            with torch.inference_mode():
                logits = self._finish(h, at)
            t_end = time.perf_counter()
            local_ms = edge_ms + (t_end - t_fail) * 1000.0
            rest = self.parts.to_boundary(self.cfg, self.n) - self.parts.to_boundary(self.cfg, plan.handoff)
            rec.update(prediction=int(logits.argmax(1)[0]), decided_at="local", degraded=True, error=str(e),
                       latency_ms=round((t_end - t0) * 1000.0, 3), radio_uj=radio,
                       compute_uj=self._uj("fallback", local_ms, plan.uj_on + rest + self.parts.head))
            return rec
        t_done = time.perf_counter()
        served = reply.queue_ms + reply.compute_ms
        wall = (t_done - t_send) * 1000.0
        self.estimate.observe(sent, wall - served if math.isfinite(served) else wall)
        self._server_time(plan, served)
        rec.update(prediction=int(reply.logits.argmax(1)[0]), decided_at="cloud",
                   latency_ms=round((t_done - t0) * 1000.0, 3), radio_uj=radio,
                   compute_uj=self._uj("cloud", edge_ms, plan.uj_on))
        return rec


def _pct(v, q):
    import numpy as np

    return float(np.percentile(np.asarray(v, dtype=float), q)) if len(v) else None


def adaptive_summary(records: list[dict], slo_ms: float) -> dict:
    """Latency against the target, accuracy, routes, plans, bytes and the edge's energy split, per input."""
    from collections import Counter

    n = len(records)
    lat = [r["latency_ms"] for r in records]
    labelled = [r for r in records if r.get("label", -1) >= 0]
    routes = Counter(r["decided_at"] for r in records)
    return {
        "inputs": n, "slo_ms": slo_ms,
        "within_slo": sum(v <= slo_ms for v in lat) / n if n else None,
        "latency_ms_p50": _pct(lat, 50), "latency_ms_p95": _pct(lat, 95), "latency_ms_p99": _pct(lat, 99),
        "accuracy": sum(r["prediction"] == r["label"] for r in labelled) / len(labelled) if labelled else None,
        "routes": {k: v / n for k, v in sorted(routes.items())},
        # answered locally because the cloud could not be reached (an exit's answer is never degraded)
        "degraded": sum(bool(r.get("degraded")) and r["decided_at"] == "local" for r in records) / n if n else None,
        "plans": {k: v / n for k, v in sorted(Counter(r.get("plan", "static") for r in records).items())},
        "payload_bytes_per_input": sum(r["payload_bytes"] for r in records) / n if n else None,
        "compute_uj": sum(r["compute_uj"] for r in records) / n if n else None,
        "radio_uj": sum(r["radio_uj"] for r in records) / n if n else None,
    }


def default_codecs(checkpoint, names) -> tuple[str, ...]:
    """``names`` without the learned codec when the checkpoint has none."""
    from ..codecs import LEARNED, codec_home

    return tuple(n for n in names if n != LEARNED or codec_home(checkpoint) is not None)


def run_adaptive_edge(checkpoint, inputs, options, adaptive: AdaptiveOptions, val_images: torch.Tensor, out=None,
                      resume: bool = False, policy=None, on_record=None) -> tuple[dict, list[dict]]:
    """``hybridexit edge --slo-ms``: every input one at a time through ``AdaptiveEdge``, records streamed to ``out``
    (``resume``: continue an interrupted file, runtime/resume.py), then ``adaptive_summary`` with the plans."""
    import contextlib
    import json

    from ..model.checkpoint import fingerprint, load_model
    from ..model.records import unreadable_record
    from .adaptive import plan_summary

    model, meta = load_model(checkpoint)
    classes = meta.get("data", {}).get("classes")
    codecs = codec_specs(default_codecs(checkpoint, adaptive.codecs), checkpoint)
    edge = AdaptiveEdge(model, policy or meta["policy"], fingerprint(checkpoint), options, adaptive, codecs,
                        val_images, classes)
    recs: list[dict] = []
    if resume:
        from .resume import read_done

        recs = read_done(out, inputs.labels, inputs.paths)
    with open(out, "a" if resume else "w") if out else contextlib.nullcontext() as f, edge:
        for i in range(len(recs), len(inputs.labels)):
            if i in inputs.errors:
                rec = unreadable_record(i, int(inputs.labels[i]), inputs.errors[i], classes)
            else:
                rec = edge.run_one(inputs.images[i:i + 1], int(inputs.labels[i]), i)
            if inputs.paths is not None:
                rec["path"] = inputs.paths[i]
            recs.append(rec)
            if f:
                f.write(json.dumps(rec) + "\n")
                f.flush()
            if on_record:
                on_record(rec)
    answered = [r for r in recs if r["decided_at"] != "unreadable"]
    summary = adaptive_summary(answered, adaptive.slo_ms)
    summary.update(inputs=len(recs), unreadable_inputs=len(recs) - len(answered), engine=edge.engine_name,
                   link=edge.link.name, probes=edge.probes, link_estimate=edge.estimate.snapshot(),
                   plans_available=plan_summary(edge.policy.plans, edge.link, edge.estimate, adaptive.quantile))
    if not inputs.labelled:
        summary["accuracy"] = None
    return summary, recs


def format_adaptive_summary(s: dict) -> str:
    """The adaptive edge's summary as a two-column table."""
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.2f} %"

    rows = [("inputs", str(s["inputs"])), ("latency target", f"{s['slo_ms']:g} ms"),
            ("within the target", pct(s["within_slo"])),
            ("latency p50 / p95 / p99", "n/a" if s["latency_ms_p50"] is None else
             f"{s['latency_ms_p50']:.1f} / {s['latency_ms_p95']:.1f} / {s['latency_ms_p99']:.1f} ms"),
            ("accuracy", pct(s["accuracy"])),
            ("answered", ", ".join(f"{k} {pct(v)}" for k, v in s["routes"].items())),
            ("degraded (cloud unreachable)", pct(s["degraded"])),
            ("plans used", ", ".join(f"{k} {pct(v)}" for k, v in s["plans"].items())),
            ("bytes sent per input", f"{s['payload_bytes_per_input']:.0f} B"),
            ("edge energy per input", f"{s['compute_uj'] + s['radio_uj']:.1f} uJ (computation {s['compute_uj']:.1f}, "
                                      f"radio {s['radio_uj']:.1f} on {s['link']})"),
            ("edge engine", s["engine"]), ("link probes", str(s["probes"]))]
    w = max(len(k) for k, _ in rows) + 2
    line = "-" * (w + 50)
    return "\n".join([line] + [f"{k:<{w}}{v}" for k, v in rows] + [line])
