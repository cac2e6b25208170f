"""Pooling: reduce a tap's output to one feature vector per image.

Feature maps (N, C, H, W) and token sequences (N, L, D) are reduced over their spatial or token
axis; vectors (N, D) pass through unchanged.
"""

from __future__ import annotations

from typing import Callable

import torch

from pipeline.settings import SettingsError

Pooling = Callable[[torch.Tensor], torch.Tensor]


def _average(value: torch.Tensor) -> torch.Tensor:
    if value.ndim == 4:
        return value.mean(dim=(2, 3))  # (N, C)
    return value.mean(dim=1)  # (N, D)


def _maximum(value: torch.Tensor) -> torch.Tensor:
    if value.ndim == 4:
        return value.amax(dim=(2, 3))  # (N, C)
    return value.amax(dim=1)  # (N, D)


POOLINGS: dict[str, Pooling] = {"avg": _average, "max": _maximum}


def pool(value: torch.Tensor, pooling: str) -> torch.Tensor:
    """Apply the named pooling to a (N, ...) tap output and return a (N, D) tensor."""
    if value.ndim == 2:
        return value
    if value.ndim not in (3, 4):
        raise ValueError(f"Cannot pool a tap output of shape {tuple(value.shape)}: expected 2, 3 or 4 dimensions.")
    if pooling not in POOLINGS:
        raise SettingsError(f"pooling={pooling!r} is invalid: use one of {sorted(POOLINGS)}.")
    return POOLINGS[pooling](value)
