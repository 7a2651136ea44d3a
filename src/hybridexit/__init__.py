"""hybridexit: conditionally deep hybrid networks across edge and cloud (Long, Chakraborty, Roy, 2020)."""

from .errors import CheckpointError, ConfigError, DatasetError, HybridExitError, InputShapeError
from .model.checkpoint import fingerprint, load_model, save_model
from .model.hybrid import CLOUD, CloudNet, Decisions, EdgeNet, HybridNet, conditional_inference
from .model.resnet import HybridConfig

__version__ = "0.1.0"
__all__ = [
    "CLOUD", "CheckpointError", "CloudNet", "ConfigError", "DatasetError", "Decisions", "EdgeNet",
    "HybridConfig", "HybridExitError", "HybridNet", "InputShapeError", "conditional_inference", "fingerprint",
    "load_model", "save_model",
]
