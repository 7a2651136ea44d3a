import pytest

from hybridexit import ConfigError, HybridConfig
from hybridexit.model.energy import EnergyTable, energy_report, summary_table


def test_fp32_resnet32_matches_hand_count():
    r = energy_report(HybridConfig(depth=32))
    assert r.fp32_macs == 68_862_592  # stem 0.44 M + 3 stages x 22.4-23.6 M + classifier
    assert r.fp32_uj == pytest.approx(317, rel=0.03)
    assert r.edge_uj + r.cloud_uj == pytest.approx(r.fp32_uj, rel=1e-9)


def test_paper_configuration_20e_binary():
    r = energy_report(HybridConfig(depth=32, edge_layers=20, edge_bits=1, exits=(20,)))
    assert r.edge_macs_by_bits[1] == 46_006_272
    assert r.edge_uj == pytest.approx(11.3, rel=0.03)
    assert r.cloud_uj == pytest.approx(103, rel=0.03)
    d = r.to_dict([0.65])
    assert d["expected_uj"] == pytest.approx(47, rel=0.03)
    assert d["reduction"] == pytest.approx(6.7, rel=0.03)


def test_kbit_mac_energy_scales_with_bits_and_table_overrides():
    e1 = energy_report(HybridConfig(edge_layers=20, edge_bits=1)).edge_uj
    e4 = energy_report(HybridConfig(edge_layers=20, edge_bits=4)).edge_uj
    stem = 442_368 * 4.6e-6
    assert (e4 - stem) == pytest.approx(4 * (e1 - stem), rel=0.01)
    cheap = energy_report(HybridConfig(edge_layers=20, edge_bits=1), EnergyTable(mac1_pj=0.1))
    assert cheap.edge_uj < e1


def test_multi_exit_expected_energy():
    r = energy_report(HybridConfig(edge_layers=20, edge_bits=1, exits=(10, 20)))
    assert r.exit_path_uj[0] < r.exit_path_uj[1] == pytest.approx(r.edge_uj)
    exp = r.expected_uj([0.3, 0.2])
    assert exp == pytest.approx(0.3 * r.exit_path_uj[0] + 0.2 * r.exit_path_uj[1] + 0.5 * (r.edge_uj + r.cloud_uj))
    with pytest.raises(ConfigError):
        r.expected_uj([0.7, 0.5])
    with pytest.raises(ConfigError):
        r.expected_uj([0.5])
    with pytest.raises(ConfigError):
        r.expected_uj([-0.1, 0.2])


def test_summary_table_lists_every_conv():
    r = energy_report(HybridConfig(depth=20, edge_layers=6, edge_bits=2, exits=(6,)))
    text = summary_table(r)
    assert text.count(".conv") == 18 and "exit:0" in text and "cloud" in text


def test_energy_comes_from_structure_not_module_names():
    """Renaming the stem and the block list (same modules, other attribute names) changes no energy figure."""
    from hybridexit.model.hybrid import HybridNet

    class Renamed(HybridNet):
        stem = property(lambda self: self._modules["first_conv" if "first_conv" in self._modules else "stem"])
        blocks = property(lambda self: self._modules["tower" if "tower" in self._modules else "blocks"])

        def __init__(self, cfg):
            super().__init__(cfg)
            self.first_conv = self._modules.pop("stem")
            self.tower = self._modules.pop("blocks")

    cfg = HybridConfig(depth=32, edge_layers=16, edge_bits=2, exits=(10, 16))
    a, b = energy_report(HybridNet(cfg)), energy_report(Renamed(cfg))
    assert {r.name.split(".")[0] for r in b.layers} >= {"first_conv", "tower"}  # the names really differ
    for key in ("fp32_uj", "edge_uj", "cloud_uj", "expected_uj", "edge_macs_by_bits", "cloud_macs", "exit_path_uj"):
        assert a.to_dict([0.3, 0.2])[key] == b.to_dict([0.3, 0.2])[key], key
    assert [(r.placement, r.bits, r.macs) for r in a.layers] == [(r.placement, r.bits, r.macs) for r in b.layers]
