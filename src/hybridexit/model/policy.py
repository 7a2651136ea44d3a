"""The exit policy: calibration output stored beside a checkpoint's weights, not inside its architecture.

``exit_policy.json`` in a checkpoint directory holds the thresholds (one entropy threshold per exit), optional
per-exit softmax temperatures (the exit rule reads the entropy of ``softmax(logits / T)``), how they were chosen
(``chosen_by``: method, split, target and value, number of samples, data checksum, validation-split id) and the
guarantee they carry, if any (``guarantee``: e.g. a Learn-then-Test risk bound). Writing a new policy keeps the
previous ones in ``history`` so nothing calibration replaces is lost.

Checkpoints written before this record existed kept their thresholds in ``config.json`` (``network.thresholds``,
with the last calibration result under ``calibration``); ``read_policy`` migrates them on read.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError, ConfigError

POLICY_FILE = "exit_policy.json"
POLICY_FORMAT = 1


@dataclass(frozen=True)
class ExitPolicy:
    thresholds: tuple[float, ...]
    temperatures: tuple[float, ...] = ()  # empty: 1.0 for every exit
    chosen_by: dict = field(default_factory=dict)
    guarantee: dict | None = None

    def __post_init__(self):
        object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))
        object.__setattr__(self, "temperatures", tuple(float(t) for t in self.temperatures))
        check_thresholds(self.thresholds)
        if self.temperatures and len(self.temperatures) != len(self.thresholds):
            raise ConfigError(f"{len(self.temperatures)} temperatures for {len(self.thresholds)} thresholds: "
                              f"give one per exit")
        if any(not (math.isfinite(t) and t > 0) for t in self.temperatures):
            raise ConfigError(f"temperatures {list(self.temperatures)} must be finite and > 0")

    @property
    def temperatures_or_ones(self) -> tuple[float, ...]:
        return self.temperatures or (1.0,) * len(self.thresholds)

    def to_dict(self) -> dict:
        return {"thresholds": list(self.thresholds), "temperatures": list(self.temperatures),
                "chosen_by": dict(self.chosen_by), "guarantee": self.guarantee}

    @classmethod
    def from_dict(cls, d: dict) -> "ExitPolicy":
        if not isinstance(d, dict) or "thresholds" not in d:
            raise ConfigError("an exit policy is an object with at least 'thresholds'")
        return cls(tuple(d["thresholds"]), tuple(d.get("temperatures") or ()), dict(d.get("chosen_by") or {}),
                   d.get("guarantee"))


def check_thresholds(thresholds) -> tuple[float, ...]:
    """Entropy thresholds are numbers >= 0 (0: nothing exits; inf: everything that reaches the exit stops)."""
    t = tuple(float(v) for v in thresholds)
    bad = [v for v in t if math.isnan(v) or v < 0]
    if bad:
        raise ConfigError(f"thresholds {list(t)}: each must be a number >= 0 (an entropy in nats; 0 = never exit)")
    return t


def _file(ckpt) -> Path:
    return Path(ckpt) / POLICY_FILE


def _migrated(ckpt) -> ExitPolicy | None:
    """The policy of a checkpoint written before exit_policy.json existed (thresholds in config.json)."""
    f = Path(ckpt) / "config.json"
    try:
        meta = json.loads(f.read_text()) if f.is_file() else {}
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: invalid JSON ({e})") from None
    net = meta.get("network") if isinstance(meta, dict) else None
    thr = (net.get("thresholds") if isinstance(net, dict) else None) or []
    if not thr:
        return None
    cal = dict(meta.get("calibration") or {})
    chosen = {"method": "target" if "target" in cal else "unknown", "migrated_from": "config.json"}
    for k in ("split", "n", "target", "value"):
        if k in cal:
            chosen[k] = cal[k]
    chosen["data_checksum"] = meta.get("data", {}).get("checksum")
    return ExitPolicy(tuple(thr), (), chosen, None)


def read_policy(ckpt) -> ExitPolicy | None:
    """The checkpoint's current exit policy (migrated from config.json for old checkpoints), or None."""
    f = _file(ckpt)
    if not f.is_file():
        return _migrated(ckpt)
    return _record(f)[0]


def _record(f: Path) -> tuple[ExitPolicy, dict]:
    """The current policy of a policy record file, and the whole record."""
    try:
        d = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: invalid JSON ({e}); restore it from git or recalibrate") from None
    if not isinstance(d, dict) or d.get("format") != POLICY_FORMAT or "current" not in d:
        raise CheckpointError(f"{f}: not an exit policy record (format {POLICY_FORMAT} with 'current' expected)")
    try:
        return ExitPolicy.from_dict(d["current"]), d
    except ConfigError as e:
        raise CheckpointError(f"{f}: {e}") from None


def read_policy_file(path, fingerprint: str | None = None) -> ExitPolicy:
    """An exit policy kept apart from any checkpoint (``calibrate --policy-out FILE``; or a checkpoint's own
    exit_policy.json), for ``--policy FILE``. A file written for another checkpoint (its recorded weights'
    fingerprint differs from ``fingerprint``) is refused."""
    f = Path(path)
    if not f.is_file():
        raise CheckpointError(f"policy file {f} not found (write one with calibrate ... --policy-out {f})")
    policy, d = _record(f)
    made_for = (d.get("checkpoint") or {}).get("fingerprint")
    if fingerprint and made_for and made_for != fingerprint:
        raise ConfigError(f"{f} was calibrated for the checkpoint {d['checkpoint'].get('path')} (fingerprint "
                          f"{made_for}), not this one ({fingerprint}): calibrate this checkpoint instead")
    return policy


def write_policy_file(path, policy: ExitPolicy, checkpoint: str, fingerprint: str) -> None:
    """Write ``policy`` to its own file (the format of exit_policy.json, naming the checkpoint and its weights'
    fingerprint), leaving the checkpoint's policy as it is."""
    body = {"format": POLICY_FORMAT, "current": policy.to_dict(), "history": [],
            "checkpoint": {"path": str(checkpoint), "fingerprint": fingerprint}}
    f = Path(path)
    tmp = f.with_name(f.name + ".tmp")
    tmp.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
    tmp.replace(f)


def policy_history(ckpt) -> list[dict]:
    f = _file(ckpt)
    return list(json.loads(f.read_text()).get("history", [])) if f.is_file() else []


def write_policy(ckpt, policy: ExitPolicy) -> ExitPolicy | None:
    """Make ``policy`` the checkpoint's current one; the previous one (if any) goes to the history. Returns it."""
    previous = read_policy(ckpt)
    history = policy_history(ckpt)
    if previous is not None and previous != policy:  # (a migrated policy written as it is has no history)
        history.append(previous.to_dict())
    body = {"format": POLICY_FORMAT, "current": policy.to_dict(), "history": history}
    f = _file(ckpt)
    tmp = f.with_name(f.name + ".tmp")
    tmp.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
    tmp.replace(f)
    return previous
