"""Training: joint or separate optimization of a HybridNet, optional distillation, resumable checkpoints.

Joint (paper Eq. 5): loss = sum_k lambda_k CE(exit_k) + lambda_final CE(final), lambdas sum to 1.
Separate: the backbone (stem, blocks, final head) is trained alone for ``epochs``; then it is frozen and the
exits are trained for ``exit_epochs`` on its features. Exits do not interact, so training them together on a
frozen backbone is the same as training one at a time.
Cloud: fine-tune the cloud half (its float blocks and the final classifier) of a trained hybrid (``init``) on
a frozen edge: stem, quantized blocks and exits stay exactly as they are (weights and BatchNorm statistics), so the
exits' decisions and calibrated thresholds remain valid, and each step runs the edge without gradients.
With ``easy_weight`` < 1 the cloud concentrates on the samples it will actually see: a training sample that the
frozen exits would already decide (entropy below the init checkpoint's calibrated thresholds, on the augmented
image) has its loss weighted by ``easy_weight``, the others by 1 (after Han et al., "Learning to Weight Samples for
Dynamic Early-exiting Networks", ECCV 2022, here with the weights fixed by the deployed exit rule).

The loop is plain PyTorch: uint8 tensors in memory, augmentation on whole batches, channels-last, SGD with
momentum and a per-step cosine schedule (with linear warm-up). A checkpoint is written after every epoch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import checkpoint as ck
from .data import Dataset, augment, batches, get_split, normalize
from .errors import CheckpointError, ConfigError
from .exits import exits_here
from .hybrid import HybridNet
from .resnet import HybridConfig

MODES = ("joint", "separate", "cloud")
OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    exit_epochs: int = 0  # separate mode: epochs for the exits on the frozen backbone
    mode: str = "joint"
    exit_weights: tuple[float, ...] = ()  # one per exit then the final; default 0.6 shared by the exits
    batch_size: int = 128
    optimizer: str = "sgd"  # sgd: Nesterov momentum, L2 decay; adam: AdamW (decoupled decay), often better for binary weights
    lr: float = 0.1
    exit_lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.5
    label_smoothing: float = 0.0
    init: str | None = None
    teacher: str | None = None
    kd_alpha: float = 0.5
    kd_temperature: float = 4.0
    easy_weight: float = 1.0  # cloud mode: loss weight of samples the frozen exits decide (1: all samples alike)
    seed: int = 0
    val_size: int = 5000
    split_seed: int = 0
    channels_last: bool = True
    limit_train: int | None = None  # for smoke tests: use only the first N training images
    compile: bool = False  # torch.compile the training step (faster quantized steps on CPU; drops the last partial batch)

    def __post_init__(self):
        object.__setattr__(self, "exit_weights", tuple(float(w) for w in self.exit_weights))
        if self.mode not in MODES:
            raise ConfigError(f"mode={self.mode!r}: use one of {', '.join(MODES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer={self.optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
        if self.epochs < 0 or self.exit_epochs < 0 or self.batch_size < 1:
            raise ConfigError("epochs and exit_epochs must be >= 0 and batch_size >= 1")
        if self.exit_weights and (abs(sum(self.exit_weights) - 1) > 1e-6 or min(self.exit_weights) < 0):
            raise ConfigError(f"exit_weights {list(self.exit_weights)} must be non-negative and sum to 1")
        if self.mode == "cloud" and not self.init:
            raise ConfigError("mode 'cloud' fine-tunes the cloud half of a trained hybrid: give init (--init CKPT)")
        if not 0 <= self.easy_weight <= 1:
            raise ConfigError(f"easy_weight={self.easy_weight} must be in [0, 1]")
        if self.easy_weight != 1 and self.mode != "cloud":
            raise ConfigError("easy_weight weights samples by the frozen exits' decisions: it needs mode 'cloud'")

    def weights(self, num_exits: int) -> list[float]:
        if self.exit_weights:
            if len(self.exit_weights) != num_exits + 1:
                raise ConfigError(f"{len(self.exit_weights)} exit weights for {num_exits} exits + final: "
                                  f"give {num_exits + 1} (exits first, final last), summing to 1")
            return list(self.exit_weights)
        if num_exits == 0:
            return [1.0]
        return [0.6 / num_exits] * num_exits + [0.4]

    @property
    def total_epochs(self) -> int:
        return self.epochs + (self.exit_epochs if self.mode == "separate" else 0)

    def to_dict(self):
        d = dataclasses.asdict(self)
        d["exit_weights"] = list(self.exit_weights)
        return d


class ThreadTuner:
    """Re-picks the CPU thread count while training. On a shared machine, two OpenMP threads slow down several
    times when another process takes one of the cores, while one thread degrades gracefully; every ``every``
    steps the other setting is tried for ``probe`` steps and the faster one is kept. A probe that loses doubles
    the interval (up to ``max_every``), since probing two threads on a contended machine is itself expensive;
    a probe that wins resets it."""

    def __init__(self, max_threads: int, every: int = 60, probe: int = 6, max_every: int = 240):
        self.options = sorted({1, max_threads}, reverse=True)
        self.current, self.probe = self.options[0], probe
        self.base_every, self.every, self.max_every = every, every, max_every
        self.times: list[float] = []
        self.trial: int | None = None
        self.trial_times: list[float] = []
        torch.set_num_threads(self.current)

    @staticmethod
    def _median(xs):
        return sorted(xs)[len(xs) // 2]

    def record(self, seconds: float) -> None:
        if len(self.options) == 1:
            return
        if self.trial is not None:
            self.trial_times.append(seconds)
            if len(self.trial_times) >= self.probe:
                if self._median(self.trial_times[1:]) < 0.85 * self._median(self.times[-self.probe:]):
                    self.current, self.every = self.trial, self.base_every
                else:
                    self.every = min(2 * self.every, self.max_every)
                self.trial, self.trial_times, self.times = None, [], []
                torch.set_num_threads(self.current)
            return
        self.times.append(seconds)
        if len(self.times) >= self.every:
            self.trial = next(o for o in self.options if o != self.current)
            torch.set_num_threads(self.trial)


def device_default() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def _prep(images, ds: Dataset, device, channels_last: bool, train: bool, gen=None):
    if train:
        images = augment(images, gen)
    x = normalize(images.to(device, non_blocking=True), ds.mean, ds.std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@torch.no_grad()
def evaluate_outputs(model: HybridNet, split, ds: Dataset, device=None, batch_size=500, channels_last=True):
    """Accuracy of every output (exits then final) over a split, running the whole network (no exiting)."""
    device = device or next(model.parameters()).device
    model.eval()
    correct, n = None, 0
    for images, labels in batches(split, batch_size):
        outs = model(_prep(images, ds, device, channels_last, False))
        c = torch.stack([(o.argmax(1).cpu() == labels).sum() for o in outs])
        correct = c if correct is None else correct + c
        n += len(labels)
    return [float(v) / max(n, 1) for v in correct]


def _frozen_prefix(model: HybridNet, x, n_blocks: int):
    """The stem and the first ``n_blocks`` blocks without gradients: (output, {exit key: features})."""
    feats = {}
    with torch.no_grad():
        h = model.stem(x)
        for i, block in enumerate(model.blocks[:n_blocks]):
            h = block(h)
            if str(2 * (i + 1)) in model.exits:
                feats[str(2 * (i + 1))] = h
    return h, feats


def _frozen_exit_outputs(model: HybridNet, x):
    """Separate optimization, phase 2: backbone frozen (eval, no grad), exits trained on its features."""
    _, feats = _frozen_prefix(model, x, max(model.cfg.exits) // 2)
    return [head(feats[key]) for key, head in model.exits.items()]


def _frozen_edge_outputs(model: HybridNet, cloud: nn.Module, x, thresholds=()):
    """Cloud mode: the edge half frozen (eval, no grad), ``cloud`` (its blocks and final head) trained on its output.

    Also returns which samples reach the cloud, those no exit decides under ``thresholds``; None without thresholds
    (no exit head is evaluated then)."""
    h, feats = _frozen_prefix(model, x, model.cfg.edge_blocks)
    reach = None
    if thresholds:
        with torch.no_grad():
            decided = [exits_here(head(feats[key]), t)[0] for (key, head), t in zip(model.exits.items(), thresholds)]
        reach = ~torch.stack(decided).any(0)
    return [cloud(h)], reach


def _per_sample_loss(logits, y, t_logp, tcfg: TrainConfig):
    """Cross-entropy, mixed with distillation from the teacher's log-probabilities ``t_logp`` when given."""
    ce = F.cross_entropy(logits, y, label_smoothing=tcfg.label_smoothing, reduction="none")
    if t_logp is None:
        return ce
    T = tcfg.kd_temperature
    kd = F.kl_div(F.log_softmax(logits / T, 1), t_logp, reduction="none", log_target=True).sum(1) * T**2
    return (1 - tcfg.kd_alpha) * ce + tcfg.kd_alpha * kd


def _cloud_thresholds(tcfg: TrainConfig, net_cfg) -> tuple[float, ...]:
    """The init checkpoint's calibrated exit thresholds, which decide the samples ``easy_weight`` applies to."""
    if tcfg.mode != "cloud" or tcfg.easy_weight == 1:
        return ()
    t = tuple(ck.read_config(tcfg.init)["network"].get("thresholds") or ())
    if len(t) != len(net_cfg.exits):
        raise ConfigError(f"easy_weight needs the exits' calibrated thresholds in --init {tcfg.init}: "
                          f"found {len(t)} for {len(net_cfg.exits)} exits (run hybridexit calibrate on it first)")
    return t


def _optimizer_state(opt) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors = {f"{i}.{k}": v for i, st in sd["state"].items() for k, v in st.items() if torch.is_tensor(v)}
    return tensors, {"param_groups": sd["param_groups"]}


def _restore_optimizer(opt, tensors: dict, meta: dict) -> None:
    state: dict = {}
    for key, v in tensors.items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def build_model(net_cfg: HybridConfig, tcfg: TrainConfig) -> HybridNet:
    model = HybridNet(net_cfg)
    if tcfg.init:
        src = ck.read_tensors(tcfg.init)
        # a float checkpoint initializes a hybrid: same parameter names; exits not in the source start fresh
        own = model.state_dict()
        shared = {k: v for k, v in src.items() if k in own}
        bad = [k for k, v in shared.items() if v.shape != own[k].shape]
        if bad or not shared:
            raise CheckpointError(f"--init {tcfg.init} does not fit {net_cfg.name}: "
                                  f"{'shape mismatch in ' + ', '.join(bad[:3]) if bad else 'no tensor in common'}")
        ck.load_state_strict(model, shared, f"--init {tcfg.init}", allow_missing=("exits.",))
    return model


def train(out_dir, net_cfg: HybridConfig, tcfg: TrainConfig, ds: Dataset, resume: bool = False,
          device=None, progress: bool = True, stop_after_epochs: int | None = None) -> dict:
    """Train and checkpoint into ``out_dir`` after every epoch. Returns the final checkpoint's config dict.

    ``resume=True`` continues from the last complete checkpoint in ``out_dir`` (configs must match).
    ``stop_after_epochs`` stops early (for tests and time-boxed runs); resuming later finishes the schedule.
    """
    out_dir = Path(out_dir)
    device = torch.device(device) if device else device_default()
    if tcfg.mode == "separate" and tcfg.exit_epochs and not net_cfg.exits:
        raise ConfigError("separate optimization with exit_epochs > 0 needs at least one exit")
    weights = tcfg.weights(len(net_cfg.exits))
    train_split = get_split(ds, "train", tcfg.val_size, tcfg.split_seed).limit(tcfg.limit_train)
    val_split = get_split(ds, "val", tcfg.val_size, tcfg.split_seed)
    data_meta = {"name": ds.name, "checksum": ds.checksum, "mean": list(ds.mean), "std": list(ds.std),
                 "classes": ds.classes, "val_size": tcfg.val_size, "split_seed": tcfg.split_seed}

    torch.manual_seed(tcfg.seed)
    model = build_model(net_cfg, tcfg).to(device)
    if tcfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    teacher = None
    if tcfg.teacher:
        teacher, _ = ck.load_model(tcfg.teacher)
        teacher = teacher.to(device).eval()
        if tcfg.channels_last:
            teacher = teacher.to(memory_format=torch.channels_last)

    drop_last = tcfg.compile and len(train_split) >= tcfg.batch_size  # one static batch shape: no recompiles
    steps_per_epoch = (len(train_split) // tcfg.batch_size if drop_last
                       else math.ceil(len(train_split) / tcfg.batch_size))
    fwd = torch.compile(model) if tcfg.compile else model
    gen = torch.Generator().manual_seed(tcfg.seed)
    start_epoch, history, wall = 0, [], 0.0

    def make_opt(params, lr):
        decay = [p for p in params if p.dim() > 1]
        no_decay = [p for p in params if p.dim() <= 1]
        groups = [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if tcfg.optimizer == "adam":
            return torch.optim.AdamW(groups, lr=lr)
        return torch.optim.SGD(groups, lr=lr, momentum=tcfg.momentum, nesterov=True)

    cloud = model.cloud_modules() if tcfg.mode == "cloud" else None
    if tcfg.mode == "separate":
        phase1_params = list(model.backbone_parameters())
    else:
        phase1_params = list((cloud if cloud is not None else model).parameters())
    opt1 = make_opt(phase1_params, tcfg.lr)
    opt2 = make_opt(list(model.exits.parameters()), tcfg.exit_lr) if tcfg.mode == "separate" and net_cfg.exits else None

    cloud_thresholds = ()  # easy_weight's exit thresholds: on resume, those the run began with
    if resume and (out_dir / ck.STATE_JSON).exists():
        meta = ck.read_config(out_dir)
        if (HybridConfig.from_dict(meta["network"]).replace(thresholds=()) != net_cfg.replace(thresholds=())
                or TrainConfig(**meta["train"]).to_dict() != tcfg.to_dict()):
            raise CheckpointError(f"cannot resume {out_dir}: its network/training config differs from the one requested")
        if meta["data"]["checksum"] != ds.checksum:
            raise CheckpointError(f"cannot resume {out_dir}: it was trained on different data (checksum differs)")
        ck.load_state_strict(model, ck.read_tensors(out_dir), str(out_dir))
        st = json.loads((out_dir / ck.STATE_JSON).read_text())
        tensors = ck.read_tensors(out_dir, ck.STATE_FILE)
        for j, opt in enumerate((opt1, opt2)):
            if opt is not None and f"opt{j}" in st:
                _restore_optimizer(opt, {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(f"opt{j}/")},
                                   st[f"opt{j}"])
        gen.set_state(tensors["rng/generator"])
        torch.set_rng_state(tensors["rng/torch"])
        start_epoch, history, wall = st["epoch"], st["history"], st["wall_s"]
        cloud_thresholds = tuple(meta.get("easy_thresholds", ()))
    elif out_dir.exists() and (out_dir / ck.CONFIG_FILE).exists() and not resume:
        raise CheckpointError(f"{out_dir} already holds a checkpoint: pass --resume to continue it or choose another --out")
    cloud_thresholds = cloud_thresholds or _cloud_thresholds(tcfg, net_cfg)

    tuner = ThreadTuner(torch.get_num_threads()) if device.type == "cpu" else None
    end_epoch = tcfg.total_epochs if stop_after_epochs is None else min(tcfg.total_epochs, start_epoch + stop_after_epochs)
    meta = None
    for epoch in range(start_epoch, end_epoch):
        t0 = time.time()
        separate_exits = tcfg.mode == "separate" and epoch >= tcfg.epochs
        opt = opt2 if separate_exits else opt1
        phase_epoch = epoch - tcfg.epochs if separate_exits else epoch
        phase_total = (tcfg.exit_epochs if separate_exits else tcfg.epochs) * steps_per_epoch
        base_lr = tcfg.exit_lr if separate_exits else tcfg.lr
        model.train()
        if separate_exits:
            model.eval()
            model.exits.train()
        elif cloud is not None:
            model.eval()
            cloud.train()
        sums, n_seen, n_reach = torch.zeros(len(net_cfg.exits) + 1), 0, 0
        # the outputs trained in this phase, in the order the step returns them (the others log no train accuracy)
        k = len(net_cfg.exits)
        sel = list(range(k)) if separate_exits else list(range(k + 1)) if tcfg.mode == "joint" else [k]
        bar = tqdm(batches(train_split, tcfg.batch_size, shuffle=True, generator=gen), total=steps_per_epoch,
                   desc=f"epoch {epoch + 1}/{tcfg.total_epochs}{' (exits)' if separate_exits else ''}",
                   disable=not progress, leave=False)
        for step, (images, labels) in enumerate(bar):
            if drop_last and len(labels) < tcfg.batch_size:
                break
            t_step = time.perf_counter()
            gstep = phase_epoch * steps_per_epoch + step
            lr = _lr_at(gstep, phase_total, int(tcfg.warmup_epochs * steps_per_epoch), base_lr)
            for g in opt.param_groups:
                g["lr"] = lr
            x = _prep(images, ds, device, tcfg.channels_last, True, gen)
            y = labels.to(device)
            sample_w = None
            if separate_exits:
                outs, w = _frozen_exit_outputs(model, x), [1.0] * len(net_cfg.exits)
            elif cloud is not None:
                (outs, reach), w = _frozen_edge_outputs(model, cloud, x, cloud_thresholds), [1.0]
                if reach is not None:
                    n_reach += int(reach.sum())
                    sample_w = torch.where(reach, 1.0, tcfg.easy_weight)
            elif tcfg.mode == "separate":
                outs, w = [fwd(x)[-1]], [1.0]
            else:
                outs, w = fwd(x), weights
            t_logp = None
            if teacher is not None:  # every phase distills: the backbone, the cloud, and separate mode's exits
                with torch.no_grad():
                    t_logp = F.log_softmax(teacher(x)[-1] / tcfg.kd_temperature, 1)
            per_sample = [_per_sample_loss(o, y, t_logp, tcfg) for o in outs]
            if sample_w is None:
                losses = [ls.mean() for ls in per_sample]
            else:  # weighted mean: the loss scale (and so the learning rate) does not depend on easy_weight
                losses = [(ls * sample_w).sum() / sample_w.sum().clamp_min(1e-12) for ls in per_sample]
            loss = sum(wi * li for wi, li in zip(w, losses))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                for o, j in zip(outs, sel):
                    sums[j] += float((o.argmax(1) == y).sum())
            n_seen += len(labels)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.3g}", threads=torch.get_num_threads())
            if tuner is not None:
                tuner.record(time.perf_counter() - t_step)
        val_acc = evaluate_outputs(model, val_split, ds, device, channels_last=tcfg.channels_last)
        wall += time.time() - t0
        phase = "exits" if separate_exits else {"separate": "backbone"}.get(tcfg.mode, tcfg.mode)
        rec = {"epoch": epoch + 1, "phase": phase,
               "train_acc": [float(s) / max(n_seen, 1) if j in sel else None for j, s in enumerate(sums)],
               "val_acc": val_acc,
               **({"cloud_share": n_reach / max(n_seen, 1)} if cloud_thresholds else {}),
               "epoch_s": round(time.time() - t0, 1), "wall_s": round(wall, 1)}
        history.append(rec)
        meta = {"network": net_cfg.to_dict(), "train": tcfg.to_dict(), "data": data_meta,
                "epochs_done": epoch + 1, "val_acc": val_acc, "train_wall_s": round(wall, 1),
                "device": str(device), "torch": torch.__version__,
                **({"easy_thresholds": list(cloud_thresholds)} if cloud_thresholds else {})}
        opt_files, opt_tensors = {}, {}
        for j, o in enumerate((opt1, opt2)):
            if o is not None:
                t, m = _optimizer_state(o)
                opt_files[f"opt{j}"] = m
                opt_tensors.update({f"opt{j}/{k}": v for k, v in t.items()})
        opt_tensors["rng/generator"] = gen.get_state()
        opt_tensors["rng/torch"] = torch.get_rng_state()
        state_json = {"epoch": epoch + 1, "history": history, "wall_s": wall, **opt_files}
        log = "".join(json.dumps(r) + "\n" for r in history).encode()
        meta_full = dict(meta, format=ck.FORMAT)
        ck.write_checkpoint(out_dir, {ck.CONFIG_FILE: meta_full, ck.STATE_JSON: state_json, ck.LOG_FILE: log},
                            {ck.MODEL_FILE: model.state_dict(), ck.STATE_FILE: opt_tensors})
        if progress:
            tqdm.write(json.dumps(rec))
    return meta if meta is not None else ck.read_config(out_dir)
