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


def _written_out(parameters, grads, lrs, weight_decays, steps):
    """Apply ``adamw_step`` head by head, the update that ``StackedAdamW`` must equal."""
    from stages.adamw import adamw_step

    moments = [(torch.zeros_like(parameter), torch.zeros_like(parameter)) for parameter in parameters]
    for step in range(1, steps + 1):
        for parameter, grad, (exp_avg, exp_avg_sq) in zip(parameters, grads, moments):
            for head, (lr, weight_decay) in enumerate(zip(lrs, weight_decays)):
                adamw_step(parameter[head], grad[head], exp_avg[head], exp_avg_sq[head], lr, weight_decay, step)
    return parameters


def test_stacked_update_with_transposed_gradients():
    from stages.adamw import StackedAdamW

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 7, 5, generator=generator)
    bias = torch.randn(3, 5, generator=generator)
    # a gradient laid out (3, 5, 7) and seen transposed, as autograd returns for an einsum
    grad_weight = torch.randn(3, 5, 7, generator=generator).transpose(1, 2)
    grad_bias = torch.randn(3, 5, generator=generator)
    assert not grad_weight.is_contiguous()
    lrs, weight_decays = [1e-3, 1e-2, 3e-2], [0.0, 1e-4, 1e-2]

    expected = _written_out([weight.clone(), bias.clone()], [grad_weight, grad_bias], lrs, weight_decays, steps=4)
    parameters = [weight.clone(), bias.clone()]
    optimizer = StackedAdamW(parameters, lrs, weight_decays)
    for _ in range(4):
        optimizer.step([grad_weight, grad_bias])
    for mine, theirs in zip(parameters, expected):
        assert torch.allclose(mine, theirs, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(parameters[0], weight)
    # heads with different learning rates moved by different amounts
    moved = [float((parameters[0][head] - weight[head]).abs().mean()) for head in range(3)]
    assert moved[0] < moved[1] < moved[2]


def test_update_of_transposed_parameter():
    from stages.adamw import adamw_step, adamw_update

    generator = torch.Generator().manual_seed(1)
    parameter = torch.randn(6, 4, generator=generator).T  # a transposed view, updated in place
    grad = torch.randn(4, 6, generator=generator)
    exp_avg, exp_avg_sq = torch.zeros(4, 6), torch.zeros(4, 6)
    reference = parameter.clone()
    adamw_step(reference, grad, torch.zeros(4, 6), torch.zeros(4, 6), 1e-2, 1e-2, 1)
    adamw_update([parameter], [grad], [exp_avg], [exp_avg_sq], 1e-2, 1e-2, 1)
    assert torch.allclose(parameter, reference, rtol=1e-5, atol=1e-7)


def test_stopped_heads_leave_others_unchanged():
    from stages.adamw import StackedAdamW, adamw_step

    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(3, 4, 2, generator=generator)
    grads = [torch.randn(3, 4, 2, generator=generator) for _ in range(4)]
    lrs, weight_decays = [1e-2, 2e-2, 3e-2], [1e-2, 0.0, 1e-3]

    # the written-out updates of head 2 alone, over all four steps
    expected = weight[2:].clone()
    exp_avg, exp_avg_sq = torch.zeros_like(expected), torch.zeros_like(expected)
    for step, grad in enumerate(grads, start=1):
        adamw_step(expected[0], grad[2], exp_avg[0], exp_avg_sq[0], lrs[2], weight_decays[2], step)

    optimizer = StackedAdamW([weight.clone()], lrs, weight_decays)
    optimizer.step([grads[0]])
    # heads 0 and 1 stop; head 2 goes on with its own moments and step count
    (kept,) = optimizer.keep([2])
    assert kept.shape == (1, 4, 2)
    for grad in grads[1:]:
        optimizer.step([grad[2:]])
    assert torch.allclose(optimizer.parameters[0], expected, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(optimizer.parameters[0], weight[2:])
