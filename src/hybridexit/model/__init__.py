"""The network: quantizers, the CIFAR ResNet blocks and the hybrid configuration, exit heads and the exit rule, the
one walk over the network (``HybridNet``, ``EdgeNet``, ``CloudNet``), per-layer operation and energy counts, typed
per-input decisions, the exit policy file beside the weights, and checkpoint folders.

May import: errors, device, threads, data.
"""
