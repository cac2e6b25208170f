"""Tests of the pooling names: avg, max, gem<p>, grid<k> and flatten."""

from __future__ import annotations

import pytest
import torch

from pipeline.pooling import PoolingSpec, parse_pooling, pool
from pipeline.settings import SettingsError


def feature_map() -> torch.Tensor:
    return torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4) / 10.0  # (N, C, H, W)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("avg", PoolingSpec("avg")),
        ("max", PoolingSpec("max")),
        ("flatten", PoolingSpec("flatten")),
        ("gem", PoolingSpec("gem", exponent=3.0)),
        ("gem4", PoolingSpec("gem", exponent=4.0)),
        ("gem2.5", PoolingSpec("gem", exponent=2.5)),
        ("grid2", PoolingSpec("grid", grid_size=2)),
        ("grid3", PoolingSpec("grid", grid_size=3)),
    ],
)
def test_parse_pooling_valid_names(name, expected):
    assert parse_pooling(name) == expected


@pytest.mark.parametrize("name", ["mean", "gem0", "gemx", "grid0", "grid9", "grid", ""])
def test_parse_pooling_invalid_names(name):
    with pytest.raises(SettingsError, match="pooling="):
        parse_pooling(name)


def test_pool_avg_and_max_of_map():
    value = feature_map()
    assert torch.allclose(pool(value, "avg"), value.mean(dim=(2, 3)))
    assert torch.equal(pool(value, "max"), value.amax(dim=(2, 3)))


def test_pool_gem_one_equals_average_of_positive_map():
    value = feature_map() + 1.0
    assert torch.allclose(pool(value, "gem1"), value.mean(dim=(2, 3)), atol=1e-5)


def test_pool_gem_three_matches_formula():
    value = feature_map()
    expected = value.clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3)
    assert torch.allclose(pool(value, "gem3"), expected, atol=1e-6)


def test_pool_gem_lies_between_average_and_max():
    value = feature_map() + 0.5
    gem = pool(value, "gem3")
    assert bool((gem >= value.mean(dim=(2, 3)) - 1e-6).all())
    assert bool((gem <= value.amax(dim=(2, 3)) + 1e-6).all())


def test_pool_gem_clamps_negative_activations():
    value = -torch.ones(1, 2, 3, 3)
    assert torch.allclose(pool(value, "gem3"), torch.full((1, 2), 1e-6), atol=1e-9)


def test_pool_grid2_returns_quadrant_averages():
    value = feature_map()
    pooled = pool(value, "grid2")
    assert pooled.shape == (2, 3 * 4)
    # channel 0 of image 0: top-left quadrant is rows 0-1, columns 0-1
    assert torch.isclose(pooled[0, 0], value[0, 0, :2, :2].mean())
    # channel 0, bottom-right quadrant comes fourth in channel-major order
    assert torch.isclose(pooled[0, 3], value[0, 0, 2:, 2:].mean())
    # channel 1 starts after the four cells of channel 0
    assert torch.isclose(pooled[0, 4], value[0, 1, :2, :2].mean())


def test_pool_grid1_equals_average():
    value = feature_map()
    assert torch.allclose(pool(value, "grid1"), value.mean(dim=(2, 3)))


def test_pool_grid_rejects_token_sequences():
    with pytest.raises(SettingsError, match="needs a feature map"):
        pool(torch.zeros(2, 5, 8), "grid2")


def test_pool_flatten_keeps_every_value():
    value = feature_map()
    pooled = pool(value, "flatten")
    assert pooled.shape == (2, 48)
    assert torch.equal(pooled[1], value[1].reshape(-1))


def test_pool_flatten_rejects_large_map():
    with pytest.raises(SettingsError, match="48 values per image .* above the limit of 47"):
        pool(feature_map(), "flatten", max_flatten_dim=47)


def test_pool_flatten_accepts_map_at_limit():
    assert pool(feature_map(), "flatten", max_flatten_dim=48).shape == (2, 48)


def test_pool_token_sequence_gem_and_max():
    tokens = torch.rand(2, 5, 8) + 0.1  # (N, L, D)
    assert pool(tokens, "gem3").shape == (2, 8)
    assert torch.equal(pool(tokens, "max"), tokens.amax(dim=1))


def test_pool_vectors_pass_through():
    vectors = torch.rand(3, 7)
    assert torch.equal(pool(vectors, "grid2"), vectors)
