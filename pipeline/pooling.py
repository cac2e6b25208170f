"""Pooling: reduce a tap's output to one feature vector per image.

Feature maps (N, C, H, W) and token sequences (N, L, D) are reduced over their spatial or token
axis; vectors (N, D) pass through unchanged. The pooling names are:

- ``avg``: global average;
- ``max``: global maximum;
- ``gem`` or ``gem<p>`` (``gem3``, ``gem2.5``): generalized mean (GeM) with exponent p, default 3,
  ``(mean(clamp(x, eps) ** p)) ** (1 / p)``. p = 1 is the average and large p nears the maximum;
- ``grid<k>`` (``grid2``, ``grid3``): the averages of a k x k grid of cells, concatenated in
  channel-major order into C * k * k values, so an earlier tap keeps coarse spatial layout;
- ``flatten``: every value of the map, C * H * W, only for small maps: a map with more values
  than ``max_flatten_dim`` raises an error instead of filling the store.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from pipeline.settings import SettingsError

DEFAULT_GEM_EXPONENT = 3.0
# Lower bound of activations before the power in GeM. It keeps a fractional power defined for the
# negative values that SiLU and similar activations produce.
GEM_EPSILON = 1e-6
# Largest flattened feature that "flatten" writes by default, in values per image.
DEFAULT_MAX_FLATTEN_DIM = 16384
MAX_GRID_SIZE = 8

_GEM = re.compile(r"^gem(\d+(\.\d+)?)?$")
_GRID = re.compile(r"^grid(\d+)$")
ALLOWED = "avg, max, gem, gem<p> (such as gem3), grid<k> (such as grid2), flatten"


@dataclass(frozen=True)
class PoolingSpec:
    """A parsed pooling name."""

    kind: str  # "avg", "max", "gem", "grid" or "flatten"
    exponent: float = DEFAULT_GEM_EXPONENT  # p of "gem"
    grid_size: int = 1  # k of "grid"


def parse_pooling(name: str) -> PoolingSpec:
    """Parse a pooling name, raising SettingsError with the allowed names when it is invalid."""
    if name in ("avg", "max", "flatten"):
        return PoolingSpec(name)
    gem = _GEM.match(name)
    if gem:
        exponent = float(gem.group(1)) if gem.group(1) else DEFAULT_GEM_EXPONENT
        if exponent <= 0:
            raise SettingsError(f"pooling={name!r} is invalid: the GeM exponent must be positive, such as gem3.")
        return PoolingSpec("gem", exponent=exponent)
    grid = _GRID.match(name)
    if grid:
        size = int(grid.group(1))
        if not 1 <= size <= MAX_GRID_SIZE:
            raise SettingsError(f"pooling={name!r} is invalid: use a grid size from 1 to {MAX_GRID_SIZE}, such as grid2.")
        return PoolingSpec("grid", grid_size=size)
    raise SettingsError(f"pooling={name!r} is invalid: use one of {ALLOWED}.")


def _reduce_axes(value: torch.Tensor) -> tuple[int, ...]:
    return (2, 3) if value.ndim == 4 else (1,)


def _generalized_mean(value: torch.Tensor, exponent: float) -> torch.Tensor:
    powered = value.float().clamp(min=GEM_EPSILON).pow(exponent)
    return powered.mean(dim=_reduce_axes(value)).pow(1.0 / exponent)  # (N, C) or (N, D)


def _grid_average(value: torch.Tensor, size: int, name: str) -> torch.Tensor:
    if value.ndim != 4:
        raise SettingsError(
            f"pooling={name!r} needs a feature map (N, C, H, W), but the tap output has shape "
            f"{tuple(value.shape)}: use avg, max or gem for token sequences."
        )
    # NOTE: a map smaller than the grid repeats its cells, because adaptive pooling overlaps them.
    import torch.nn.functional as F

    cells = F.adaptive_avg_pool2d(value, size)  # (N, C, k, k)
    return cells.flatten(start_dim=1)  # (N, C * k * k)


def _flatten(value: torch.Tensor, max_flatten_dim: int) -> torch.Tensor:
    dimension = int(math.prod(value.shape[1:]))
    if dimension > max_flatten_dim:
        raise SettingsError(
            f"pooling='flatten' would store {dimension} values per image for a tap output of shape "
            f"{tuple(value.shape[1:])}, above the limit of {max_flatten_dim}: tap an earlier, smaller map, "
            "use grid<k> pooling, or raise --max-flatten-dim."
        )
    return value.flatten(start_dim=1)  # (N, C * H * W)


def pool(value: torch.Tensor, pooling: str, max_flatten_dim: int = DEFAULT_MAX_FLATTEN_DIM) -> torch.Tensor:
    """Apply the named pooling to a (N, ...) tap output and return a (N, D) tensor."""
    if value.ndim == 2:
        return value
    if value.ndim not in (3, 4):
        raise ValueError(f"Cannot pool a tap output of shape {tuple(value.shape)}: expected 2, 3 or 4 dimensions.")
    spec = parse_pooling(pooling)
    if spec.kind == "avg":
        return value.mean(dim=_reduce_axes(value))
    if spec.kind == "max":
        return value.amax(dim=_reduce_axes(value))
    if spec.kind == "gem":
        return _generalized_mean(value, spec.exponent)
    if spec.kind == "grid":
        return _grid_average(value, spec.grid_size, pooling)
    return _flatten(value, max_flatten_dim)
