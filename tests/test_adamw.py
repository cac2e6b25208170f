"""The written-out AdamW follows torch.optim.AdamW step by step."""

from __future__ import annotations

import torch
from torch import nn

from stages.adamw import AdamW


def _train(optimizer_class, steps: int = 20) -> list[torch.Tensor]:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    optimizer = optimizer_class(module.parameters(), lr=3e-2, weight_decay=1e-2)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        features = torch.randn(16, 6, generator=generator)
        labels = torch.randint(0, 3, (16,), generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(module(features), labels).backward()
        optimizer.step()
    return [parameter.detach().clone() for parameter in module.parameters()]


def test_adamw_matches_torch_optim():
    ours, reference = _train(AdamW), _train(torch.optim.AdamW)
    for mine, theirs in zip(ours, reference):
        assert torch.allclose(mine, theirs, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours[0], _train(AdamW, steps=0)[0])  # the steps moved the weights
