"""Communication energy: transmit energy per link, the edge's total, and where the hybrid beats sending the image."""

import json

import pytest

from hybridexit.cli import main
from hybridexit.codecs import links
from hybridexit.errors import ConfigError
from hybridexit.model.energy import energy_report
from hybridexit.model.resnet import HybridConfig

CFG = HybridConfig(depth=8, num_classes=10, edge_layers=4, edge_bits=1, exits=(4,))


def test_named_links_and_overrides():
    assert links.link("wifi").transmit_uj(100) == pytest.approx(100 * 8 * 0.283)
    assert links.link("Wi-Fi").name == "wifi"
    assert links.link("lte", uj_per_bit=1.0).transmit_uj(2) == 16.0
    assert links.link("satellite", uj_per_bit=5.0).uj_per_bit == 5.0
    with pytest.raises(ConfigError):
        links.link("satellite")
    with pytest.raises(ConfigError):
        links.Link("x", -1.0)
    assert all(lk.source for lk in links.LINKS.values())


def test_transmit_report_adds_up():
    report = energy_report(CFG)
    lk = links.link("ble")
    t = links.transmit_report(report, [0.25], 500, lk, codec_edge_macs=1000, codec_cloud_macs=2000)
    stay = 0.75
    edge = 0.25 * report.exit_path_uj[0] + stay * (report.edge_uj + 1000 * report.table.mac32_pj / 1e6)
    assert t["edge_compute_uj"] == pytest.approx(edge)
    assert t["transmit_uj"] == pytest.approx(stay * 500 * 8 * 0.153)
    assert t["edge_total_uj"] == pytest.approx(edge + t["transmit_uj"])
    assert t["cloud_compute_uj"] == pytest.approx(stay * (report.cloud_uj + 2000 * report.table.mac32_pj / 1e6))
    assert t["expected_total_uj"] == pytest.approx(t["edge_total_uj"] + t["cloud_compute_uj"])
    assert t["send_image"]["edge_uj"] == pytest.approx(3072 * 8 * 0.153)
    everyone_exits = links.transmit_report(report, [1.0], 500, lk)
    assert everyone_exits["transmit_uj"] == 0 and everyone_exits["edge_total_uj"] == pytest.approx(report.exit_path_uj[0])


def test_break_even_exit_rate_is_where_the_edge_spends_what_the_image_costs():
    report = energy_report(CFG)
    lk = links.link("wifi")
    x = links.break_even_exit_rate(report, 4000, lk, image_bytes=3072)
    assert 0 < x < 1
    at = links.transmit_report(report, [x], 4000, lk, image_bytes=3072)
    assert at["edge_total_uj"] == pytest.approx(at["send_image"]["edge_uj"])
    assert links.transmit_report(report, [x + 0.01], 4000, lk)["edge_saves_vs_image"]
    assert links.break_even_exit_rate(report, 100, lk, image_bytes=3072) == 0.0  # offloading everything already pays
    assert links.break_even_exit_rate(report, 4000, links.link("wifi", 1e-9), image_bytes=3072) is None


def test_energy_command_reports_the_link(capsys):
    main(["energy", "--depth", "8", "--edge-layers", "4", "--edge-bits", "1", "--exits", "4", "--exit-rate", "0.5",
          "--link", "lte", "--bytes-per-offloaded", "800", "--image-bytes", "500", "--json"])
    d = json.loads(capsys.readouterr().out)
    t = d["link"]
    assert t["link"] == "lte" and t["bytes_per_offloaded"] == 800 and t["send_image"]["bytes"] == 500
    assert t["transmit_uj"] == pytest.approx(0.5 * 800 * 8 * 0.438)
    main(["energy", "--depth", "8", "--edge-layers", "4", "--edge-bits", "1", "--exits", "4", "--exit-rate", "0.5",
          "--link", "wifi"])
    out = capsys.readouterr().out
    assert "sending the image instead" in out and "exit rate of" in out
