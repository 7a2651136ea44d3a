"""One-off migration of checkpoints written before the exit policy and the content-hashed validation split.

For each checkpoint directory given: the thresholds in config.json's network become ``exit_policy.json`` (with
how they were chosen, from the config's ``calibration`` record); the network config loses ``thresholds`` and gains
the mean/std of its data; ``val_split.safetensors`` records the validation images by content, derived from the copy
of the data the checkpoint was trained on (its data checksum must match, else the checkpoint is refused).
Idempotent: a migrated checkpoint is left as it is (``--rewrite-val`` rewrites only its validation record).
Usage: python scripts/migrate_checkpoints.py --data-dir data [--rewrite-val] CKPT...
"""

import argparse
import json
import sys
from pathlib import Path

from hybridexit.data import get_split, image_ids, load_cifar
from hybridexit.model import checkpoint as ck
from hybridexit.model.policy import POLICY_FILE, read_policy, write_policy


def migrate(path: Path, data_dir: str, rewrite_val: bool = False) -> str:
    meta = ck.read_config(path)
    done = (path / ck.VAL_FILE).exists() and "thresholds" not in meta["network"] and "mean" in meta["network"]
    if done and not rewrite_val:
        return "already migrated"
    d = meta["data"]
    ds = load_cifar(d["name"], data_dir)
    if d["checksum"] != ds.checksum:
        raise SystemExit(f"{path}: trained on another copy of {d['name']} (checksum differs): cannot derive its split")
    val = get_split(ds, "val", d["val_size"], d["split_seed"])
    if done:  # only the validation record, e.g. written before it hashed labels too
        ck.write_checkpoint(path, {}, {ck.VAL_FILE: {"val_ids": image_ids(val.images, val.labels)}})
        return "validation record rewritten"
    policy = read_policy(path) if not (path / POLICY_FILE).exists() else None
    if policy is not None:
        write_policy(path, policy)
    meta["network"] = ck.network_config(meta).to_dict()
    meta["data"]["content_checksum"] = ds.content
    ck.write_checkpoint(path, {ck.CONFIG_FILE: meta}, {ck.VAL_FILE: {"val_ids": image_ids(val.images, val.labels)}})
    return f"migrated (policy: {list(policy.thresholds) if policy else 'none'})"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="data")
    p.add_argument("--rewrite-val", action="store_true", help="rewrite the validation record of migrated checkpoints")
    p.add_argument("checkpoints", nargs="+")
    a = p.parse_args()
    for c in a.checkpoints:
        print(json.dumps({"checkpoint": c, "result": migrate(Path(c), a.data_dir, a.rewrite_val)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
