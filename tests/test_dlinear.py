"""DLinear: size, decomposition, and that it can represent simple series exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.forecasting.dlinear import DLinear, MovingAverage
from core.forecasting.windows import make_windows

torch.set_num_threads(1)


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_match_the_reference_study():
    assert _num_params(DLinear(120, 3, 3, individual=True, decomposition=False)) == 1089
    assert _num_params(DLinear(120, 3, 3, individual=True, decomposition=True)) == 2178
    assert _num_params(DLinear(120, 3, 3, individual=False, decomposition=True)) == 726


def test_output_shape():
    model = DLinear(24, 5, 3)
    assert model(torch.randn(7, 24, 3)).shape == (7, 5, 3)


def test_moving_average_replicates_edges():
    ramp = torch.arange(20.0).reshape(1, 20, 1)
    trend = MovingAverage(5)(ramp)[0, :, 0]
    assert trend.shape == (20,)
    torch.testing.assert_close(trend[2:-2], ramp[0, 2:-2, 0])  # exact inside
    assert trend[0] == pytest.approx((0 + 0 + 0 + 1 + 2) / 5)  # left pad repeats the first value
    const = torch.full((1, 10, 2), 3.0)
    torch.testing.assert_close(MovingAverage(25)(const), const)


def test_even_kernel_is_rejected():
    with pytest.raises(ValueError, match="kernel_size"):
        DLinear(24, 3, 1, kernel_size=4)


def test_individual_heads_are_independent_per_channel():
    torch.manual_seed(0)
    model = DLinear(16, 2, 2, individual=True)
    x = torch.randn(4, 16, 2)
    x2 = x.clone()
    x2[..., 1] += 5.0  # change channel 1 only
    torch.testing.assert_close(model(x)[..., 0], model(x2)[..., 0])


def _fit(series: np.ndarray, seq_len: int, horizon: int, steps: int = 400) -> float:
    """Full-batch Adam on the first 70 % of windows; MSE on the rest."""
    torch.manual_seed(0)
    X, Y, _ = make_windows(series.astype(np.float32), seq_len, horizon)
    cut = int(0.7 * len(X))
    X, Y = torch.from_numpy(X), torch.from_numpy(Y)
    model = DLinear(seq_len, horizon, series.shape[1], kernel_size=7)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(X[:cut]), Y[:cut])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(model(X[cut:]), Y[cut:]))


def test_fits_a_clean_sine_almost_exactly():
    t = np.arange(600)
    series = np.stack([np.sin(2 * np.pi * t / 24), np.cos(2 * np.pi * t / 37)], axis=1)
    assert _fit(series, seq_len=48, horizon=4) < 1e-3  # signal variance is 0.5


def test_extrapolates_a_linear_ramp_almost_exactly():
    series = (np.arange(400) / 400.0)[:, None]  # test part lies beyond the train range
    assert _fit(series, seq_len=24, horizon=3, steps=600) < 1e-4
