"""Shared fixtures: a tiny CIFAR-10-format dataset written as the official archive layout."""

import io
import pickle
import tarfile

import numpy as np
import pytest


def _batch(n, seed, label_key="labels", classes=10):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    # class-dependent mean colour so a tiny network can learn something
    base = (labels[:, None] * 25 % 256).astype(np.uint8)
    data = np.clip(base + rng.integers(0, 40, (n, 3072)), 0, 255).astype(np.uint8)
    return {"batch_label": "x", label_key: labels.tolist(), "data": data, "filenames": [f"{i}.png" for i in range(n)]}


def write_tiny_cifar10(root, n_per_batch=40, as_archive=False):
    files = {f"data_batch_{i}": _batch(n_per_batch, i) for i in range(1, 6)}
    files["test_batch"] = _batch(n_per_batch, 99)
    files["batches.meta"] = {"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072}
    blobs = {k: pickle.dumps(v, protocol=2) for k, v in files.items()}
    root.mkdir(parents=True, exist_ok=True)
    if as_archive:
        with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
            for name, blob in blobs.items():
                info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    else:
        d = root / "cifar-10-batches-py"
        d.mkdir(parents=True)
        for name, blob in blobs.items():
            (d / name).write_bytes(blob)
    return root


@pytest.fixture
def tiny_cifar(tmp_path):
    return write_tiny_cifar10(tmp_path / "data")


def random_inputs(n, seed=0):
    """``n`` random uint8 CIFAR-sized images with random labels, as the edge runtime's ``Inputs``."""
    import torch

    from hybridexit.data import Inputs

    g = torch.Generator().manual_seed(seed)
    return Inputs(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                  torch.randint(0, 10, (n,), generator=g))


def write_tiny_checkpoint(path, exits=(4,), thresholds=(0.5,), seed=0):
    """An untrained ResNet-8 hybrid (4 binary edge layers, exits at ``exits``) saved as a checkpoint with class
    names and an exit policy: enough to serve, run the edge and exercise every command in seconds."""
    import torch

    from hybridexit.model.checkpoint import save_model
    from hybridexit.model.hybrid import HybridNet
    from hybridexit.model.policy import ExitPolicy, write_policy
    from hybridexit.model.resnet import HybridConfig

    torch.manual_seed(seed)
    model = HybridNet(HybridConfig(depth=8, num_classes=10, edge_layers=4, edge_bits=1, exits=tuple(exits))).eval()
    save_model(path, model, {"data": {"name": "cifar10", "classes": [f"class{i}" for i in range(10)]}})
    write_policy(path, ExitPolicy(tuple(thresholds)))
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small tensors, in-thread servers and clients on a shared CPU: one torch thread each is faster than contending
    for several. A module opts in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def ds(tiny_cifar):
    """The tiny CIFAR-10 of ``tiny_cifar``, loaded (it is not the official content: the warning is expected)."""
    import warnings

    from hybridexit.data import load_cifar

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_cifar("cifar10", tiny_cifar, download_ok=False)
