import pytest
import torch

from hybridexit.calibration.temperature import expected_calibration_error, fit_temperature, fit_temperatures, nll
from hybridexit.errors import ConfigError


def _calibrated(n=6000, c=10, seed=0):
    """Logits z and labels drawn from softmax(z): the model z is calibrated by construction."""
    g = torch.Generator().manual_seed(seed)
    z = 2.0 * torch.randn(n, c, generator=g, dtype=torch.float64)
    y = torch.multinomial(torch.softmax(z, 1), 1, generator=g).squeeze(1)
    return z, y


@pytest.mark.parametrize("scale", [0.5, 1.0, 3.0])
def test_fit_recovers_the_overconfidence_factor(scale):
    z, y = _calibrated()
    t = fit_temperature(z * scale, y)  # logits scaled by s: the right temperature is s
    assert t == pytest.approx(scale, rel=0.08)
    assert nll(z * scale, y, t) <= nll(z * scale, y, 1.0) + 1e-9
    assert expected_calibration_error(z * scale, y, t) < 0.03


def test_fit_is_the_minimum_of_the_nll():
    z, y = _calibrated(seed=1)
    t = fit_temperature(z * 2.0, y)
    for other in (t * 0.9, t * 1.1):
        assert nll(z * 2.0, y, t) < nll(z * 2.0, y, other)


def test_one_temperature_per_exit():
    z, y = _calibrated(seed=2)
    ts = fit_temperatures(torch.stack([z * 0.5, z * 3.0], 1), y)
    assert len(ts) == 2 and ts[0] < 1 < ts[1]


def test_bad_shapes_refused():
    with pytest.raises(ConfigError):
        fit_temperature(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ConfigError):
        fit_temperatures(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long))
