"""hybridexit-edge: the edge half of a hybridexit checkpoint without PyTorch (numpy, safetensors, the standard
library's HTTP client and a small native library: the main package's kernels, built at install time)."""

__version__ = "0.1.0"
