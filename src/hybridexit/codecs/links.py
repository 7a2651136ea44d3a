"""Communication energy: what the edge spends to transmit one byte over a named link.

The model is linear in the bytes sent: ``energy = bytes x 8 x uJ_per_bit`` for the edge's radio, the marginal
energy per transmitted bit. Fixed costs (radio wake-up, the LTE "tail", connection set-up) are left out: they
depend on traffic timing, not on the codec, and would be paid by "send the image" as well. Sources and what each
figure means: docs/codecs.md ("Communication energy"). Every figure can be overridden (``Link(name, uj_per_bit)``
or ``link("lte", uj_per_bit=...)``; CLI ``--uj-per-bit``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class Link:
    name: str
    uj_per_bit: float  # microjoules per transmitted bit at the edge
    source: str = "user-supplied"

    def __post_init__(self):
        if not self.uj_per_bit >= 0:
            raise ConfigError(f"link {self.name}: energy per bit must be a non-negative number, got {self.uj_per_bit}")

    def transmit_uj(self, n_bytes: float) -> float:
        return float(n_bytes) * 8 * self.uj_per_bit


LINKS = {
    "ble": Link("ble", 0.153, "Siekkinen et al., 'How low energy is Bluetooth Low Energy?', IEEE WCNC workshops "
                              "2012: measured energy per transferred bit of BLE"),
    "wifi": Link("wifi", 0.283, "Huang et al., 'A close examination of performance and power characteristics of "
                                "4G LTE networks', MobiSys 2012: Wi-Fi uplink power slope 283.17 mW per Mbps"),
    "lte": Link("lte", 0.438, "Huang et al., MobiSys 2012: LTE uplink power slope 438.39 mW per Mbps"),
    "5g": Link("5g", 0.438, "assumption, no checked measurement: LTE's figure (Huang et al. 2012); Narayanan et "
                            "al., SIGCOMM 2021, find 5G less efficient than LTE at low bit rates, more at high ones"),
}


def link(name: str, uj_per_bit: float | None = None) -> Link:
    """The named link, or its figure replaced by ``uj_per_bit``."""
    key = name.lower().replace("-", "")
    if key not in LINKS:
        if uj_per_bit is None:
            raise ConfigError(f"unknown link {name!r}: use one of {', '.join(LINKS)} or give its energy per bit")
        return Link(name, uj_per_bit)
    base = LINKS[key]
    return base if uj_per_bit is None else Link(base.name, uj_per_bit, "user-supplied")


RAW_IMAGE_BYTES = 3 * 32 * 32  # a CIFAR image as uint8 (``raw_image_bytes`` of a 32x32 RGB network)


def raw_image_bytes(cfg) -> int:
    """Bytes of one raw uint8 input image of the network ``cfg`` (a ``HybridConfig``): channels x side^2."""
    return int(cfg.in_channels * cfg.image_size * cfg.image_size)


def codec_uj(macs: int, table) -> float:
    """Energy of a codec's float multiply-accumulates (a learned reduction or expansion), at 32 bits."""
    return macs * table.mac32_pj / 1e6


def transmit_report(report, exit_rates, bytes_per_offloaded: float, lk: Link, codec_edge_macs: int = 0,
                    codec_cloud_macs: int = 0, image_bytes: float | None = None) -> dict:
    """Per image, at these exit rates: the edge's compute and transmit energy, the cloud's compute, the total,
    and the same for sending the image to the float network instead (the edge only transmits then).

    ``report``: ``energy.energy_report`` of the hybrid; ``bytes_per_offloaded``: the frame each offloaded sample
    costs; the codec's MACs are paid by offloaded samples only (encoding happens after the exits); ``image_bytes``:
    the raw image (default: the network's own input size, ``raw_image_bytes``)."""
    image_bytes = raw_image_bytes(report.config) if image_bytes is None else image_bytes
    rates = report.check_rates(exit_rates)
    stay = 1.0 - sum(rates)
    t = report.table
    edge = sum(r * e for r, e in zip(rates, report.exit_path_uj)) + stay * (report.edge_uj + codec_uj(codec_edge_macs, t))
    tx = stay * lk.transmit_uj(bytes_per_offloaded)
    cloud = stay * (report.cloud_uj + codec_uj(codec_cloud_macs, t))
    img_tx = lk.transmit_uj(image_bytes)
    return {
        "link": lk.name, "uj_per_bit": lk.uj_per_bit, "exit_rate": rates, "bytes_per_offloaded": bytes_per_offloaded,
        "edge_compute_uj": edge, "transmit_uj": tx, "edge_total_uj": edge + tx, "cloud_compute_uj": cloud,
        "expected_total_uj": edge + tx + cloud,
        "send_image": {"bytes": image_bytes, "edge_uj": img_tx, "cloud_uj": report.fp32_uj,
                       "total_uj": img_tx + report.fp32_uj},
        "edge_saves_vs_image": edge + tx < img_tx,
        "break_even_exit_rate": break_even_exit_rate(report, bytes_per_offloaded, lk, image_bytes, codec_edge_macs),
    }


def break_even_exit_rate(report, bytes_per_offloaded: float, lk: Link, image_bytes: float | None = None,
                         codec_edge_macs: int = 0) -> float | None:
    """Smallest fraction of samples exiting (at the last exit) for which the edge spends no more energy per image
    (compute + transmit) than transmitting the image itself: 0.0 when offloading every sample already does,
    None when even exiting every sample does not (the edge's compute alone costs more than sending the image).
    ``image_bytes``: default the network's raw input (``raw_image_bytes``)."""
    image_bytes = raw_image_bytes(report.config) if image_bytes is None else image_bytes
    exit_cost = report.exit_path_uj[-1] if report.exit_path_uj else report.edge_uj
    full = report.edge_uj + codec_uj(codec_edge_macs, report.table) + lk.transmit_uj(bytes_per_offloaded)
    img = lk.transmit_uj(image_bytes)
    if full <= img:
        return 0.0
    if exit_cost >= img:
        return None
    return (full - img) / (full - exit_cost)
