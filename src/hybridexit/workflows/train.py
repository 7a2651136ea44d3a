"""Training: one loop, fed by one objective per mode; optional distillation; resumable checkpoints.

A run is a list of phases. A phase says which parameters move (its own optimizer), which modules are in train mode
(the others stay in eval: weights and BatchNorm statistics frozen), how a batch's outputs are computed, and which
outputs (exits then final) it trains and logs. ``_train_epoch`` runs any phase; ``run_schedule``, the one loop over
epochs (a checkpoint after each, exact resume from the last one), walks the phases of ``train`` and the learned
codec's stages (``train_codec``: each stage a phase on cached edge features, its state saved the same way).

Joint (paper Eq. 5), one phase: loss = sum_k lambda_k CE(exit_k) + lambda_final CE(final), lambdas sum to 1.
Separate, two phases: the backbone (stem, blocks, final head) is trained alone for ``epochs``; then it is frozen and
the exits are trained for ``exit_epochs`` on its features. Exits do not interact, so training them together on a
frozen backbone is the same as training one at a time.
Two-stage training (ReActNet; ``stage1_epochs`` > 0, joint or separate mode): the schedule's first phase is
preceded by ``stage1_epochs`` of the same phase with binary (quantized) activations and the latent float weights
as they are (``quant.set_float_weights``), its own optimizer and cosine; the binary-weight phase then starts from
those weights. It is one schedule: a run resumes across the stage boundary like any other (log phase
``<phase>-stage1``, whose ``val_acc`` is that of the float-weight network it trains).
Cloud, one phase: fine-tune the cloud half (its float blocks and the final classifier) of a trained hybrid
(``init``) on a frozen edge: stem, quantized blocks and exits stay exactly as they are (weights and BatchNorm
statistics), so the exits' decisions and calibrated thresholds remain valid, and each step runs the edge without
gradients. With ``easy_weight`` < 1 the cloud concentrates on the samples it will actually see: a training sample
that the frozen exits would already decide (entropy below the init checkpoint's calibrated thresholds, on the
augmented image) has its loss weighted by ``easy_weight``, the others by 1 (after Han et al., "Learning to Weight
Samples for Dynamic Early-exiting Networks", ECCV 2022, here with the weights fixed by the deployed exit rule).

The loop is plain PyTorch: uint8 tensors in memory, augmentation on whole batches, channels-last, SGD with
momentum (or AdamW) and a per-step cosine schedule (with linear warm-up) per phase. A checkpoint is written after
every epoch, with the optimizer and RNG state needed to resume it exactly.

The fast path (issue 40; each switch off by default): ``device_data`` keeps the training split on the training
device and draws each epoch's shuffle and crops at once (``data.device_feed``: the host path's draws, so on the CPU
the run is bit-identical to the host path), with fused optimizer steps on CUDA; ``bf16`` runs the float layers
under bf16 autocast while quantized convs keep computing in FP32 (``model.quant``: sign and the +-1 products stay
exact); ``compile`` compiles the forward. ``train(deadline=...)`` stops at an epoch boundary before a wall-clock
deadline (bounded GPU calls that resume).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..data.augment import augmentation_for, augmenter, crop_pad, random_resized_crop
from ..data.datasets import Dataset, Split, batches, get_split, image_ids
from ..data.device_feed import DeviceFeed
from ..device import pick_device
from ..errors import CheckpointError, ConfigError
from ..model import checkpoint as ck
from ..model.backbones.base import InputQuant
from ..model.exits import exits_here
from ..model.hybrid import HybridNet
from ..model.policy import read_policy
from ..model.quant import ChannelShift, RPReLU, set_float_weights
from ..model.resnet import HybridConfig
from ..threads import ThreadTuner
from .evaluate import evaluate_outputs

MODES = ("joint", "separate", "cloud")
OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    exit_epochs: int = 0  # separate mode: epochs for the exits on the frozen backbone
    stage1_epochs: int = 0  # two-stage training: epochs with float weights (binary activations) before ``epochs``
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
    device_data: bool = False  # training split resident on the device, batches and crops made there (fast path)
    bf16: bool = False  # bf16 autocast for the float layers; quantized convs stay FP32 (fast path; changes numerics)

    def __post_init__(self):
        object.__setattr__(self, "exit_weights", tuple(float(w) for w in self.exit_weights))
        if self.mode not in MODES:
            raise ConfigError(f"mode={self.mode!r}: use one of {', '.join(MODES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer={self.optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
        if self.epochs < 0 or self.exit_epochs < 0 or self.stage1_epochs < 0 or self.batch_size < 1:
            raise ConfigError("epochs, exit_epochs and stage1_epochs must be >= 0 and batch_size >= 1")
        if self.stage1_epochs and self.mode == "cloud":
            raise ConfigError("stage1_epochs (two-stage training of the edge) does not apply to mode 'cloud', "
                              "which keeps the edge frozen")
        if self.total_epochs == 0:
            raise ConfigError("nothing to train: give --epochs N (or, in separate mode, --exit-epochs N to train only "
                              "the exits of --init)")
        if self.exit_weights and (abs(sum(self.exit_weights) - 1) > 1e-6 or min(self.exit_weights) < 0):
            raise ConfigError(f"exit_weights {list(self.exit_weights)} must be non-negative and sum to 1")
        if self.mode == "cloud" and not self.init:
            raise ConfigError("mode 'cloud' fine-tunes the cloud half of a trained hybrid: give init (--init CKPT)")
        if not 0 <= self.easy_weight <= 1:
            raise ConfigError(f"easy_weight={self.easy_weight} must be in [0, 1]")
        if self.easy_weight != 1 and self.mode != "cloud":
            raise ConfigError("easy_weight weights samples by the frozen exits' decisions: it needs mode 'cloud'")
        self._check_ranges()

    def _check_ranges(self):
        """Numeric ranges, checked here so a recipe file is held to the same limits as the command line."""
        def need(ok: bool, what: str):
            if not (ok and all(math.isfinite(float(v)) for v in (self.lr, self.exit_lr, self.weight_decay))):
                raise ConfigError(f"{what} (check the recipe file or the command line)")
        need(self.lr >= 0 and self.exit_lr >= 0, f"lr={self.lr} and exit_lr={self.exit_lr} must be >= 0")
        need(self.weight_decay >= 0, f"weight_decay={self.weight_decay} must be >= 0")
        need(0 <= self.momentum < 1, f"momentum={self.momentum} must be in [0, 1)")
        need(self.warmup_epochs >= 0, f"warmup_epochs={self.warmup_epochs} must be >= 0")
        need(0 <= self.label_smoothing < 1, f"label_smoothing={self.label_smoothing} must be in [0, 1)")
        need(0 <= self.kd_alpha <= 1 and self.kd_temperature > 0,
             f"kd_alpha={self.kd_alpha} must be in [0, 1] and kd_temperature={self.kd_temperature} > 0")
        need(self.val_size >= 0, f"val_size={self.val_size} must be >= 0")

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
        return self.stage1_epochs + self.epochs + (self.exit_epochs if self.mode == "separate" else 0)

    def to_dict(self):
        d = dataclasses.asdict(self)
        d["exit_weights"] = list(self.exit_weights)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Rebuild from ``to_dict()``, also one written by an older version: a field it lacks takes its default."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown training config keys {unknown}; known: {sorted(known)}")
        return cls(**d)


def _lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def _prep(images, ds: Dataset, device, channels_last: bool, train: bool, gen=None):
    """Raw uint8 images (augmented when training: the standard augmentation for their size) on the device: the
    network normalizes them itself."""
    if train:
        images = augmenter(images.shape[-1])(images, gen)
    return images.to(device, non_blocking=True)


def _frozen_prefix(model: HybridNet, x, n_blocks: int):
    """The network's walk up to block ``n_blocks`` without gradients: (output, [features at each exit passed])."""
    with torch.no_grad():
        return model.forward_intermediates(x, stop_block=n_blocks, exit_logits=False)


def _exit_heads(model: HybridNet) -> list[nn.Module]:
    return [model.exits[model.cfg.exit_key(j)] for j in range(len(model.cfg.exits))]


def _frozen_exit_outputs(model: HybridNet, x):
    """Separate optimization, phase 2: backbone frozen (eval, no grad), exits trained on its features."""
    _, feats = _frozen_prefix(model, x, model.cfg.exit_block(len(model.cfg.exits) - 1) + 1)
    return [head(f) for head, f in zip(_exit_heads(model), feats)]


def _frozen_edge_outputs(model: HybridNet, cloud: nn.Module, x, thresholds=()):
    """Cloud mode: the edge half frozen (eval, no grad), ``cloud`` (its blocks and final head) trained on its output.

    Also returns which samples reach the cloud, those no exit decides under ``thresholds``; None without thresholds
    (no exit head is evaluated then)."""
    h, feats = _frozen_prefix(model, x, model.cfg.edge_blocks)
    reach = None
    if thresholds:
        with torch.no_grad():
            decided = [exits_here(head(f), t)[0] for head, f, t in zip(_exit_heads(model), feats, thresholds)]
        reach = ~torch.stack(decided).any(0)
    return [cloud(h)], reach


# ---- objectives: one phase per stretch of the schedule ------------------------------------------------------------

Outputs = Callable[[torch.Tensor], tuple[list[torch.Tensor], torch.Tensor | None]]


@dataclass
class Phase:
    """What a stretch of ``epochs`` epochs trains, and how."""

    name: str  # the log's "phase": joint, backbone, exits or cloud
    epochs: int
    lr: float  # base learning rate of its cosine schedule
    params: list[nn.Parameter]  # what its optimizer moves
    trained: list[int]  # the outputs it trains (0..K-1 exits, K final), in the order ``outputs`` returns them
    loss_weights: list[float]  # one per trained output
    outputs: Outputs  # x -> (logits of the trained outputs, mask of the samples that reach the cloud or None)
    only_train: nn.Module | None = None  # None: the whole model in train mode; else only this, the rest in eval
    counts_cloud: bool = False  # log the share of training samples that reach the cloud (``outputs`` gives the mask)
    float_weights: bool = False  # two-stage training, stage 1: quantized convs use their latent float weights

    def set_modes(self, model: nn.Module) -> None:
        model.train()
        set_float_weights(model, self.float_weights)
        if self.only_train is not None:
            model.eval()
            self.only_train.train()


def _joint_phases(model: HybridNet, fwd: nn.Module, tcfg: TrainConfig) -> list[Phase]:
    """Every exit and the final classifier together, weighted by the lambdas."""
    k = len(model.cfg.exits)
    return [Phase("joint", tcfg.epochs, tcfg.lr, list(model.parameters()), list(range(k + 1)),
                  tcfg.weights(k), lambda x: (fwd(x), None))]


def _separate_phases(model: HybridNet, fwd: nn.Module, tcfg: TrainConfig) -> list[Phase]:
    """The backbone alone (exits untouched), then the exits alone on the frozen backbone (eval mode, no grad)."""
    k = len(model.cfg.exits)
    backbone = Phase("backbone", tcfg.epochs, tcfg.lr, list(model.backbone_parameters()), [k], [1.0],
                     lambda x: ([fwd(x)[-1]], None))
    if not k:
        return [backbone]
    return [backbone, Phase("exits", tcfg.exit_epochs, tcfg.exit_lr, list(model.exits.parameters()), list(range(k)),
                            [1.0] * k, lambda x: (_frozen_exit_outputs(model, x), None), only_train=model.exits)]


def _cloud_phases(model: HybridNet, tcfg: TrainConfig, thresholds: tuple[float, ...]) -> list[Phase]:
    """The cloud half (its blocks and final head) on the frozen edge (eval mode, no grad). With ``thresholds``,
    the samples no exit decides under them keep weight 1, the others get ``easy_weight``."""
    cloud = model.cloud_modules()
    return [Phase("cloud", tcfg.epochs, tcfg.lr, list(cloud.parameters()), [len(model.cfg.exits)], [1.0],
                  lambda x: _frozen_edge_outputs(model, cloud, x, thresholds), only_train=cloud,
                  counts_cloud=bool(thresholds))]


def _phases(model: HybridNet, fwd: nn.Module, tcfg: TrainConfig, thresholds: tuple[float, ...]) -> list[Phase]:
    if tcfg.mode == "separate":
        phases = _separate_phases(model, fwd, tcfg)
    elif tcfg.mode == "cloud":
        phases = _cloud_phases(model, tcfg, thresholds)
    else:
        phases = _joint_phases(model, fwd, tcfg)
    if tcfg.stage1_epochs:  # two-stage training: the first phase, first with float weights (its own optimizer)
        first = phases[0]
        phases.insert(0, dataclasses.replace(first, name=f"{first.name}-stage1", epochs=tcfg.stage1_epochs,
                                             float_weights=True))
    return phases


def _phase_at(phases: list[Phase], epoch: int) -> tuple[int, int]:
    """(index of the phase that global ``epoch`` belongs to, the epoch within that phase)."""
    for i, phase in enumerate(phases):
        if epoch < phase.epochs:
            return i, epoch
        epoch -= phase.epochs
    raise ConfigError(f"epoch {epoch} is past the schedule")


def _make_optimizer(params: list[nn.Parameter], lr: float, tcfg: TrainConfig, fused: bool = False
                    ) -> torch.optim.Optimizer:
    """Weight decay on weights (dim > 1) only, not on biases and BatchNorm parameters. ``fused``: one fused
    kernel per step (the fast path on CUDA)."""
    decay = [p for p in params if p.dim() > 1]
    no_decay = [p for p in params if p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw = {"fused": True} if fused else {}
    if tcfg.optimizer == "adam":
        return torch.optim.AdamW(groups, lr=lr, **kw)
    return torch.optim.SGD(groups, lr=lr, momentum=tcfg.momentum, nesterov=True, **kw)


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
    policy = read_policy(tcfg.init)
    t = policy.thresholds if policy is not None else ()
    if len(t) != len(net_cfg.exits):
        raise ConfigError(f"easy_weight needs the exits' calibrated thresholds in --init {tcfg.init}: "
                          f"found {len(t)} for {len(net_cfg.exits)} exits (run hybridexit calibrate on it first)")
    return t


# ---- the loop -----------------------------------------------------------------------------------------------------

@dataclass
class _Loop:
    """What every epoch of a run shares."""

    model: HybridNet
    tcfg: TrainConfig
    ds: Dataset
    device: torch.device
    split: Split  # the training split (never the validation images)
    steps_per_epoch: int
    drop_last: bool  # torch.compile: one static batch shape, no recompiles
    gen: torch.Generator  # shuffling and augmentation
    teacher: nn.Module | None
    tuner: ThreadTuner | None
    progress: bool
    feed: DeviceFeed | None = None  # the fast path's device-resident training split (None: batches from the host)

    def epoch_batches(self):
        """The epoch's (augmented uint8 images, labels) batches on the device, from the host or the device feed."""
        if self.feed is not None:
            yield from self.feed.epoch(self.tcfg.batch_size, self.gen, self.drop_last)
            return
        for images, labels in batches(self.split, self.tcfg.batch_size, shuffle=True, generator=self.gen):
            if self.drop_last and len(labels) < self.tcfg.batch_size:
                return
            yield _prep(images, self.ds, self.device, self.tcfg.channels_last, True, self.gen), labels.to(self.device)


def _step(loop: _Loop, phase: Phase, opt, x, y):
    """One optimizer step of ``phase`` on a batch: (the trained outputs' logits, cloud mask or None, loss)."""
    tcfg = loop.tcfg
    with torch.autocast(loop.device.type, torch.bfloat16, enabled=tcfg.bf16):  # forward only; quantized convs FP32
        outs, reach = phase.outputs(x)
        sample_w = None if reach is None else torch.where(reach, 1.0, tcfg.easy_weight)
        t_logp = None
        if loop.teacher is not None:  # every phase distills: the backbone, the cloud, and separate mode's exits
            with torch.no_grad():
                t_logp = F.log_softmax(loop.teacher(x)[-1].float() / tcfg.kd_temperature, 1)
        per_sample = [_per_sample_loss(o.float(), y, t_logp, tcfg) for o in outs]
        if sample_w is None:
            losses = [ls.mean() for ls in per_sample]
        else:  # weighted mean: the loss scale (and so the learning rate) does not depend on easy_weight
            losses = [(ls * sample_w).sum() / sample_w.sum().clamp_min(1e-12) for ls in per_sample]
        loss = sum(wi * li for wi, li in zip(phase.loss_weights, losses))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return outs, reach, loss


def _train_epoch(loop: _Loop, phase: Phase, opt, phase_epoch: int, desc: str, num_outputs: int) -> dict:
    """One pass over the training split. Returns the log fields: train accuracy of each output (None for the
    outputs this phase does not train) and, when the cloud's samples are known, the share that reaches it."""
    tcfg = loop.tcfg
    phase.set_modes(loop.model)
    # counts stay on the device (read once, after the epoch: no host sync per step)
    sums, n_seen, n_reach = torch.zeros(num_outputs, device=loop.device), 0, torch.zeros((), device=loop.device)
    bar = tqdm(loop.epoch_batches(), total=loop.steps_per_epoch, desc=desc, disable=not loop.progress, leave=False)
    for step, (x, y) in enumerate(bar):
        t_step = time.perf_counter()
        lr = _lr_at(phase_epoch * loop.steps_per_epoch + step, phase.epochs * loop.steps_per_epoch,
                    int(tcfg.warmup_epochs * loop.steps_per_epoch), phase.lr)
        for g in opt.param_groups:
            g["lr"] = lr
        outs, reach, loss = _step(loop, phase, opt, x, y)
        with torch.no_grad():
            for o, j in zip(outs, phase.trained):
                sums[j] += (o.argmax(1) == y).sum()
        if reach is not None:
            n_reach += reach.sum()
        n_seen += len(y)
        if loop.progress and (step % 20 == 0 or loop.tuner is not None):  # loss.item() waits for the step
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.3g}", threads=torch.get_num_threads())
        if loop.tuner is not None:
            loop.tuner.record(time.perf_counter() - t_step)
    rec = {"train_acc": [float(s) / max(n_seen, 1) if j in phase.trained else None for j, s in enumerate(sums.cpu())]}
    return {**rec, "cloud_share": float(n_reach) / max(n_seen, 1)} if phase.counts_cloud else rec


# ---- checkpoint, optimizer state and resume -----------------------------------------------------------------------

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


def schedule_state(opts: list, gen: torch.Generator, epochs_done: int, history: list[dict],
                   wall: float) -> tuple[dict, dict]:
    """What resuming a schedule needs, as (JSON, tensors) for ``ck.STATE_JSON`` / ``ck.STATE_FILE``: each phase's
    optimizer state (``opt<i>``), both RNG states (the run's generator and torch's), the epochs done, the log so far."""
    opt_files, opt_tensors = {}, {}
    for j, o in enumerate(opts):
        t, m = _optimizer_state(o)
        opt_files[f"opt{j}"] = m
        opt_tensors.update({f"opt{j}/{k}": v for k, v in t.items()})
    opt_tensors["rng/generator"] = gen.get_state()
    opt_tensors["rng/torch"] = torch.get_rng_state()
    return {"epoch": epochs_done, "history": history, "wall_s": wall, **opt_files}, opt_tensors


def restore_schedule(folder: Path, opts: list, gen: torch.Generator) -> tuple[int, list[dict], float]:
    """Optimizer and RNG states from ``schedule_state``'s files in ``folder``; (epochs done, log so far, wall s)."""
    st = json.loads((Path(folder) / ck.STATE_JSON).read_text())
    tensors = ck.read_tensors(folder, ck.STATE_FILE)
    for j, opt in enumerate(opts):
        if f"opt{j}" in st:
            _restore_optimizer(opt, {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(f"opt{j}/")},
                               st[f"opt{j}"])
    gen.set_state(tensors["rng/generator"])
    torch.set_rng_state(tensors["rng/torch"])
    return st["epoch"], st["history"], st["wall_s"]


def _write_checkpoint(out_dir: Path, model: HybridNet, opts: list, gen: torch.Generator, meta: dict,
                      history: list[dict], wall: float, val_ids: torch.Tensor) -> None:
    """Weights, config and the validation images' ids, plus what resuming needs (``schedule_state``)."""
    state_json, opt_tensors = schedule_state(opts, gen, meta["epochs_done"], history, wall)
    log = "".join(json.dumps(r) + "\n" for r in history).encode()
    ck.write_checkpoint(out_dir, {ck.CONFIG_FILE: dict(meta, format=ck.FORMAT), ck.STATE_JSON: state_json, ck.LOG_FILE: log},
                        {ck.MODEL_FILE: model.state_dict(), ck.STATE_FILE: opt_tensors, ck.VAL_FILE: {"val_ids": val_ids}})


def _saved_run(out_dir: Path, resume: bool, net_cfg: HybridConfig, tcfg: TrainConfig, ds: Dataset) -> dict | None:
    """The config of the run to resume in ``out_dir`` (None: start afresh), refusing one that differs."""
    if not (resume and (out_dir / ck.STATE_JSON).exists()):
        if (out_dir / ck.CONFIG_FILE).exists() and not resume:
            raise CheckpointError(f"{out_dir} already holds a checkpoint: pass --resume to continue it or choose another --out")
        return None
    meta = ck.read_config(out_dir)
    try:
        same_train = TrainConfig.from_dict(meta["train"]).to_dict() == tcfg.to_dict()
    except ConfigError as e:
        raise CheckpointError(f"cannot resume {out_dir}: {e}") from None
    if ck.network_config(meta) != net_cfg or not same_train:
        raise CheckpointError(f"cannot resume {out_dir}: its network/training config differs from the one requested")
    if meta["data"]["checksum"] != ds.checksum:
        raise CheckpointError(f"cannot resume {out_dir}: it was trained on different data (checksum differs)")
    return meta


def _restore_run(out_dir: Path, model: HybridNet, opts: list, gen: torch.Generator) -> tuple[int, list[dict], float]:
    """Load weights, optimizer and RNG states from ``out_dir``; (epochs done, log so far, wall seconds so far)."""
    ck.load_state_strict(model, ck.read_tensors(out_dir), str(out_dir))
    return restore_schedule(out_dir, opts, gen)


def _train_val(out_dir: Path, ds: Dataset, tcfg: TrainConfig, resume: bool):
    """(train split, validation split, validation image ids). A run records its validation images by content;
    a resumed run finds them again by that record (so a copy of the data in another order gives the same split)."""
    train_split = get_split(ds, "train", tcfg.val_size, tcfg.split_seed)
    val = get_split(ds, "val", tcfg.val_size, tcfg.split_seed)
    ids = image_ids(val.images, val.labels)
    recorded = ck.read_val_ids(out_dir) if resume and (out_dir / ck.VAL_FILE).exists() else None
    if recorded is not None and not torch.equal(recorded, ids):  # another copy of the data: find them by content
        ids, train_split, val = recorded, get_split(ds, "train", val_ids=recorded), get_split(ds, "val", val_ids=recorded)
    return train_split.limit(tcfg.limit_train), val, ids


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
        # so do the modules of recipe options (RSign, RPReLU) that the source lacks: they start as the identity; and
        # the BatchNorm in front of each quantizer of a non-CIFAR backbone (model.backbones.base.InputQuant)
        options = tuple(f"{name}." for name, m in model.named_modules()
                        if isinstance(m, (ChannelShift, RPReLU, InputQuant)))
        ck.load_state_strict(model, shared, f"--init {tcfg.init}", allow_missing=("exits.", *options))
    return model


def _load_teacher(tcfg: TrainConfig, device) -> HybridNet | None:
    if not tcfg.teacher:
        return None
    teacher, _ = ck.load_model(tcfg.teacher)
    teacher = teacher.to(device).eval()
    return teacher.to(memory_format=torch.channels_last) if tcfg.channels_last else teacher


def _epoch_estimate(history: list[dict], ran_here: int) -> float:
    """Seconds the next epoch may take: the longest epoch of this call (the first includes start-up and any
    compilation), else the run's last epoch (perhaps on another device)."""
    if ran_here:
        return max(r["epoch_s"] for r in history[-ran_here:])
    return history[-1]["epoch_s"]


def train(out_dir, net_cfg: HybridConfig, tcfg: TrainConfig, ds: Dataset, resume: bool = False,
          device=None, progress: bool = True, stop_after_epochs: int | None = None,
          deadline: float | None = None) -> dict:
    """Train and checkpoint into ``out_dir`` after every epoch. Returns the final checkpoint's config dict.

    ``resume=True`` continues from the last complete checkpoint in ``out_dir`` (configs must match).
    ``stop_after_epochs`` stops early (for tests and time-boxed runs); resuming later finishes the schedule.
    ``deadline`` (a ``time.time()``) stops before an epoch that would end after it, judged by the longest epoch
    so far (the first epoch of a fresh run always runs).
    """
    out_dir = Path(out_dir)
    device = pick_device(device or None)
    if tcfg.mode == "separate" and tcfg.exit_epochs and not net_cfg.exits:
        raise ConfigError("separate optimization with exit_epochs > 0 needs at least one exit")
    if tcfg.stage1_epochs and (net_cfg.edge_bits == 32 or net_cfg.edge_layers == 0):
        raise ConfigError("stage1_epochs trains a quantized edge with float weights first: this network has no "
                          "quantized layers (give --edge-layers and --edge-bits below 32)")
    tcfg.weights(len(net_cfg.exits))  # refuse a wrong number of lambdas before any work
    if ds.val_ids is not None and tcfg.val_size != TrainConfig.val_size:
        raise ConfigError(f"val_size applies to CIFAR: {ds.name} fixes its own validation split ({ds.layout})")
    # preprocessing travels with the model: the data's image size and normalization statistics
    net_cfg = net_cfg.replace(mean=tuple(ds.mean), std=tuple(ds.std), image_size=ds.image_size)
    train_split, val_split, val_ids = _train_val(out_dir, ds, tcfg, resume)
    data_meta = {**ds.record(), "augmentation": augmentation_for(ds.image_size),
                 "val_size": len(val_split) if ds.val_ids is not None else tcfg.val_size, "split_seed": tcfg.split_seed}

    torch.manual_seed(tcfg.seed)
    model = build_model(net_cfg, tcfg).to(device)
    if tcfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    drop_last = tcfg.compile and len(train_split) >= tcfg.batch_size  # one static batch shape: no recompiles
    loop = _Loop(model, tcfg, ds, device, train_split,
                 len(train_split) // tcfg.batch_size if drop_last else math.ceil(len(train_split) / tcfg.batch_size),
                 drop_last, torch.Generator().manual_seed(tcfg.seed), _load_teacher(tcfg, device),
                 ThreadTuner(torch.get_num_threads()) if device.type == "cpu" else None, progress,
                 DeviceFeed(train_split.images, train_split.labels, device, crop_pad(ds.image_size) or 4,
                            None if crop_pad(ds.image_size) else random_resized_crop) if tcfg.device_data else None)

    saved = _saved_run(out_dir, resume, net_cfg, tcfg, ds)
    # easy_weight's exit thresholds: on resume, those the run began with
    thresholds = tuple(saved.get("easy_thresholds", ())) if saved else ()
    thresholds = thresholds or _cloud_thresholds(tcfg, net_cfg)
    phases = _phases(model, torch.compile(model) if tcfg.compile else model, tcfg, thresholds)
    opts = [_make_optimizer(p.params, p.lr, tcfg, fused=tcfg.device_data and device.type == "cuda") for p in phases]
    start_epoch, history, wall = _restore_run(out_dir, model, opts, loop.gen) if saved else (0, [], 0.0)

    end_epoch = tcfg.total_epochs if stop_after_epochs is None else min(tcfg.total_epochs, start_epoch + stop_after_epochs)

    def run_epoch(i: int, phase_epoch: int, epoch: int) -> dict:
        desc = f"epoch {epoch + 1}/{tcfg.total_epochs}{' (exits)' if phases[i].name == 'exits' else ''}"
        fields = _train_epoch(loop, phases[i], opts[i], phase_epoch, desc, len(net_cfg.exits) + 1)
        return {"train_acc": fields["train_acc"], "val_acc": evaluate_outputs(model, val_split, device=device),
                **({"float_weights": True} if phases[i].float_weights else {}),
                **({"cloud_share": fields["cloud_share"]} if "cloud_share" in fields else {})}

    written: list[dict] = []

    def save(epochs_done: int, history: list[dict], wall: float) -> None:
        meta = {"network": net_cfg.to_dict(), "train": tcfg.to_dict(), "data": data_meta,
                "epochs_done": epochs_done, "val_acc": history[-1]["val_acc"], "train_wall_s": round(wall, 1),
                "device": str(device), "torch": torch.__version__,
                **({"easy_thresholds": list(thresholds)} if thresholds else {})}
        _write_checkpoint(out_dir, model, opts, loop.gen, meta, history, wall, val_ids)
        written[:] = [meta]

    run_schedule(phases, start_epoch, end_epoch, history, wall, run_epoch, save, deadline, progress)
    return written[0] if written else ck.read_config(out_dir)


# ---- the schedule: the one loop over epochs, for every run (the modes' phases above, the codec's stages) -----------

def run_schedule(phases: list, start_epoch: int, end_epoch: int, history: list[dict], wall: float,
                 run_epoch: Callable[[int, int, int], dict], save: Callable[[int, list[dict], float], None],
                 deadline: float | None = None, progress: bool = False) -> float:
    """The one training loop. Each global epoch from ``start_epoch`` to ``end_epoch`` belongs to a phase
    (``_phase_at``: a phase has a ``name`` and its ``epochs``); ``run_epoch(phase index, epoch within the phase,
    global epoch)`` trains one epoch of it and validates, returning the log fields; the record (epoch, phase, the
    fields, epoch and wall seconds) joins ``history`` and ``save(epochs done, history, wall)`` writes the checkpoint a
    resumed run starts from. A phase may count its own epochs (a codec stage does: its field ``epoch``).
    ``deadline`` (a ``time.time()``) stops before an epoch that would end after it, judged by the longest epoch so
    far (the first epoch of a fresh run always runs). Returns the wall seconds."""
    for epoch in range(start_epoch, end_epoch):
        if deadline is not None and history and time.time() + _epoch_estimate(history, epoch - start_epoch) > deadline:
            break
        t0 = time.time()
        i, phase_epoch = _phase_at(phases, epoch)
        fields = run_epoch(i, phase_epoch, epoch)
        wall += time.time() - t0
        rec = {"epoch": epoch + 1, "phase": phases[i].name, **fields, "epoch_s": round(time.time() - t0, 1),
               "wall_s": round(wall, 1)}
        history.append(rec)
        save(epoch + 1, history, wall)
        if progress:
            tqdm.write(json.dumps(rec))
    return wall
