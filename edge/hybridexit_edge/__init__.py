"""hybridexit-edge: the edge half of a hybridexit checkpoint without PyTorch or numpy: the standard library (HTTP,
TLS, JSON, zip) and a small native library, the main package's kernels built at install time."""

__version__ = "0.1.0"
