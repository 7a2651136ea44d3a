"""The edge-cloud runtime: the binary wire format (``wire``), the cloud server (``server``: the CloudNet of a
checkpoint behind HTTP with dynamic batching) and the edge client (``client``: EdgeNet and the exits locally,
only the samples that did not exit go over the network), the online exit audit, tokens, and the server process
(``hybridexit serve`` / ``edge`` are ``cli.serving``).

May import: errors, device, threads, data, model, calibration, codecs, engines.
"""

from .wire import PROTOCOL_VERSION, WireError, decode, encode

__all__ = ["PROTOCOL_VERSION", "WireError", "decode", "encode"]
