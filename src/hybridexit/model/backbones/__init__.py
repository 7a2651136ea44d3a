"""The backbone registry: every network a hybrid can be built from, by name (``BACKBONES``; ``get_backbone``).

A backbone describes itself (``base``): a float stem, an ordered list of blocks with their shapes and convolutions,
and a head; ``HybridNet`` (``model.hybrid``) builds the hybrid from that description. Adding a backbone is one
module here with a class like ``resnet.ImageNetResNet`` and one line in ``BACKBONES`` (docs/backbones.md).
"""

from __future__ import annotations

import re
from pathlib import Path

from ...errors import ConfigError
from .base import BlockSpec, ConvSpec
from .cifar import CifarResNet
from .mobilenet import MobileNetV2
from .resnet import ImageNetResNet

CIFAR_DEPTHS = (20, 32, 44, 56, 110)
BACKBONES = {
    **{f"cifar_resnet{d}": (lambda d=d: CifarResNet(d)) for d in CIFAR_DEPTHS},
    "resnet18": lambda: ImageNetResNet("resnet18", False, (2, 2, 2, 2)),
    "resnet34": lambda: ImageNetResNet("resnet34", False, (3, 4, 6, 3)),
    "resnet50": lambda: ImageNetResNet("resnet50", True, (3, 4, 6, 3)),
    "resnet18_cifar": lambda: ImageNetResNet("resnet18_cifar", False, (2, 2, 2, 2), small_stem=True),
    "mobilenetv2": MobileNetV2,
}
CIFAR_FAMILY = "cifar_resnet"  # any cifar_resnet<6n+2> is that family at that depth

__all__ = ["BACKBONES", "BlockSpec", "ConvSpec", "get_backbone", "is_backbone", "load_torchvision",
           "read_state_dict"]


def is_backbone(name: str) -> bool:
    return name in BACKBONES or re.fullmatch(CIFAR_FAMILY + r"\d+", str(name)) is not None


def get_backbone(name: str):
    """The backbone named ``name`` (a key of ``BACKBONES``, or cifar_resnet<6n+2> at any depth)."""
    if name in BACKBONES:
        return BACKBONES[name]()
    m = re.fullmatch(CIFAR_FAMILY + r"(\d+)", str(name))
    if m:
        return CifarResNet(int(m[1]))
    raise ConfigError(f"unknown backbone {name!r}: use one of {', '.join(BACKBONES)}")


def read_state_dict(path) -> dict:
    """Tensors of a weights file: safetensors, or a PyTorch .pt/.pth read with ``weights_only=True`` (tensors
    only; nothing else is unpickled). A torchvision checkpoint holding ``{"state_dict": ...}`` is unwrapped."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (any unreadable file is the same user error)
        raise ConfigError(f"{path} is not a readable weights file (safetensors or a torch state dict): {e}") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConfigError(f"{path} does not hold a state dict (name -> tensor)")
    return sd


def load_torchvision(model, state_dict: dict, head: bool = True) -> list[str]:
    """Load a torchvision state dict (torchvision's key names) into ``model`` (a ``HybridNet`` of the same backbone).

    Keys are renamed by the backbone (``from_torchvision``) and loaded strictly, except for what the hybrid adds:
    its exit heads and the BatchNorm in front of each quantizer (``q<N>.bn``) keep their initialization, and with
    ``head=False`` the classifier (another number of classes) too. Returns the model's keys left as initialized."""
    bb = get_backbone(model.cfg.backbone_name)
    if bb.from_torchvision is None:
        raise ConfigError(f"the {bb.name} backbone has no torchvision counterpart to load weights from")
    sd = bb.from_torchvision(state_dict)
    if not head:
        sd = {k: v for k, v in sd.items() if not k.startswith("head.") or _in_body(model, k)}
    own = model.state_dict()
    for k, v in sd.items():
        if k not in own:
            raise ConfigError(f"{k!r} has no place in this {bb.name} hybrid")
        if tuple(own[k].shape) != tuple(v.shape):
            hint = " (another number of classes: load with head=False)" if k.startswith("head.") else ""
            raise ConfigError(f"{k!r}: shape {tuple(v.shape)} in the file, {tuple(own[k].shape)} here{hint}")
    left = sorted(set(own) - set(sd))
    unexpected = [k for k in left if not _added_by_hybrid(k, head)]
    if unexpected:
        raise ConfigError(f"the state dict lacks {len(unexpected)} of the {bb.name}'s tensors (e.g. {unexpected[0]!r})")
    model.load_state_dict(sd, strict=False)
    return left


def _in_body(model, key: str) -> bool:
    """Head keys that are not the classifier (MobileNetV2's last 1x1 conv lives in the head)."""
    return not re.match(r"head\.(fc|classifier)\.", key)


def _added_by_hybrid(key: str, head: bool) -> bool:
    return (key.startswith("exits.") or re.search(r"\.q\d*\.(\d+\.)?bn\.", key) is not None
            or (not head and re.match(r"head\.(fc|classifier)\.", key) is not None))
