"""DLinear (Zeng et al., "Are Transformers Effective for Time Series Forecasting?", AAAI 2023).

The history is split into a trend (moving average with edge-replicated padding) and a seasonal
remainder; one linear map seq_len -> horizon per part (per channel when `individual`) forecasts
each, and the two forecasts are summed. Input (B, L, C) -> output (B, H, C).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class MovingAverage(nn.Module):
    """Moving average over time of (B, L, C), same length out: both ends are padded with
    (k - 1) // 2 copies of the edge value so the trend is not dragged towards zero there."""

    def __init__(self, kernel_size: int) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
        self.kernel_size = kernel_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = (self.kernel_size - 1) // 2
        x = x.transpose(1, 2)  # (B, C, L): pooling runs over the last axis
        x = F.pad(x, (pad, pad), mode="replicate")
        return F.avg_pool1d(x, self.kernel_size, stride=1).transpose(1, 2)


class ChannelLinear(nn.Module):
    """Linear(seq_len, horizon) along time, one per channel (individual) or shared by all."""

    def __init__(self, seq_len: int, horizon: int, num_channels: int, individual: bool) -> None:
        super().__init__()
        heads = num_channels if individual else 1
        bound = 1 / math.sqrt(seq_len)  # nn.Linear's default initialisation
        self.weight = nn.Parameter(torch.empty(heads, horizon, seq_len).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(heads, horizon).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, L, C) x (C|1, H, L) -> (B, H, C); a shared head broadcasts over channels.
        weight = self.weight.expand(x.shape[-1], -1, -1)
        return torch.einsum("blc,chl->bhc", x, weight) + self.bias.expand(x.shape[-1], -1).T


class DLinear(nn.Module):
    """(B, seq_len, C) -> (B, horizon, C). decomposition=False is a single linear per channel."""

    def __init__(
        self,
        seq_len: int,
        horizon: int,
        num_channels: int,
        individual: bool = True,
        kernel_size: int = 25,
        decomposition: bool = True,
    ) -> None:
        super().__init__()
        # Constructor arguments, kept so a saved state dict can be rebuilt into the same model.
        self.hparams = dict(seq_len=seq_len, horizon=horizon, num_channels=num_channels,
                            individual=individual, kernel_size=kernel_size, decomposition=decomposition)
        self.decomposition = decomposition
        self.moving_average = MovingAverage(kernel_size) if decomposition else None
        self.seasonal = ChannelLinear(seq_len, horizon, num_channels, individual)
        self.trend = ChannelLinear(seq_len, horizon, num_channels, individual) if decomposition else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.decomposition:
            return self.seasonal(x)
        trend = self.moving_average(x)
        return self.seasonal(x - trend) + self.trend(trend)
