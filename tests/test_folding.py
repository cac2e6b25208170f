"""Tests of batch-norm folding: which pairs fold, that features stay the same, and the guards."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pipeline import folding
from pipeline.backbones import build_backbone
from pipeline.folding import NormActivation, find_pairs, fold_backbone, fold_batchnorm
from pipeline.taps import TapExtractor


def _trained_norm(channels: int, seed: int) -> nn.BatchNorm2d:
    """A batch norm with non-trivial statistics and affine parameters, as after training."""
    generator = torch.Generator().manual_seed(seed)
    norm = nn.BatchNorm2d(channels)
    with torch.no_grad():
        norm.running_mean.copy_(torch.randn(channels, generator=generator))
        norm.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
        norm.weight.copy_(torch.randn(channels, generator=generator))
        norm.bias.copy_(torch.randn(channels, generator=generator))
    return norm


class ConvNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.norm = _trained_norm(4, 0)
        self.depthwise = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=True)
        self.norm2 = _trained_norm(4, 1)

    def forward(self, x):
        return torch.relu(self.norm2(self.depthwise(self.norm(self.conv(x)))))


class SharedConvOutput(nn.Module):
    """The convolution's raw output also feeds a sum, so folding the norm into it would change that sum."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.norm = _trained_norm(3, 2)

    def forward(self, x):
        y = self.conv(x)
        return self.norm(y) + y


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.norm = _trained_norm(3, 3)

    def forward(self, x):
        if x.sum() > 0:  # torch.fx cannot trace a branch on a tensor's value
            return self.norm(self.conv(x))
        return x


def _input(seed: int = 0, size: int = 16) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_folds_conv_norm_pairs_and_keeps_outputs():
    model = ConvNorm().eval()
    expected = model(_input())
    report = fold_batchnorm(model)
    assert report.folded == [("conv", "norm"), ("depthwise", "norm2")]
    assert isinstance(model.norm, nn.Identity) and isinstance(model.norm2, nn.Identity)
    assert model.conv.bias is not None
    assert torch.allclose(model(_input()), expected, atol=1e-5)


def test_conv_with_second_user_not_folded():
    model = SharedConvOutput().eval()
    assert find_pairs(model) == []
    expected = model(_input())
    assert fold_batchnorm(model).folded == []
    assert torch.equal(model(_input()), expected)


def test_kept_conv_keeps_its_raw_output():
    model = ConvNorm().eval()
    raw = model.conv(_input())
    report = fold_batchnorm(model, keep={"conv"})
    assert report.folded == [("depthwise", "norm2")]
    assert torch.equal(model.conv(_input()), raw)


def test_untraceable_model_is_unchanged_with_a_reason():
    model = DataDependent().eval()
    before = copy.deepcopy(model.state_dict())
    report = fold_batchnorm(model)
    assert report.folded == []
    assert "cannot trace" in report.reason
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())


def test_training_mode_model_is_not_folded():
    report = fold_batchnorm(ConvNorm().train())
    assert report.folded == []
    assert "training" in report.reason


def test_lite0_features_unchanged_by_folding():
    backbone = build_backbone("efficientnet_lite0")
    taps = ["blocks.3", "bn2", "pre_logits"]
    images = _input(4, 224)
    with torch.inference_mode():
        before = TapExtractor(backbone, taps)(images)
    report = fold_backbone(backbone, taps, _input(5, 224))
    # stem, head, and every block's convolutions: 49 pairs in EfficientNet-Lite0
    assert len(report.folded) == 49
    assert isinstance(backbone.model.bn2, NormActivation)  # the tap on the head's norm still resolves
    with torch.inference_mode():
        after = TapExtractor(backbone, taps)(images)
    for tap in taps:
        relative = torch.linalg.vector_norm(after[tap] - before[tap]) / torch.linalg.vector_norm(before[tap])
        assert float(relative) < 1e-5, tap


def test_torchvision_resnet_features_unchanged_by_folding():
    backbone = build_backbone("resnet18", "random")
    images = _input(6, 64)
    with torch.inference_mode():
        before = TapExtractor(backbone, ["layer3", "pre_logits"])(images)
    report = fold_backbone(backbone, ["layer3", "pre_logits"], _input(7, 64))
    assert len(report.folded) == 20  # stem, 16 block convolutions, 3 downsample convolutions
    with torch.inference_mode():
        after = TapExtractor(backbone, ["layer3", "pre_logits"])(images)
    for tap in before:
        assert torch.allclose(after[tap], before[tap], rtol=1e-4, atol=1e-5), tap


def test_fold_backbone_restores_the_model_when_taps_move(monkeypatch):
    backbone = build_backbone("test_efficientnet", "random")
    state = {name: value.clone() for name, value in backbone.model.state_dict().items()}
    images = _input(8, 64)
    with torch.inference_mode():
        before = TapExtractor(backbone, ["pre_logits"])(images)

    def wrong_fold(conv, norm):  # a wrong fold: it scales the weights and drops the batch norm's shift
        with torch.no_grad():
            conv.weight.mul_(2.0)

    monkeypatch.setattr(folding, "fold_pair", wrong_fold)
    report = fold_backbone(backbone, ["pre_logits"], _input(9, 64))
    assert report.folded == []
    assert "changed tap pre_logits" in report.reason
    restored = backbone.model.state_dict()
    assert restored.keys() == state.keys()  # every batch norm is back, and no bias was added
    assert all(torch.equal(restored[name], value) for name, value in state.items())
    with torch.inference_mode():
        assert torch.equal(TapExtractor(backbone, ["pre_logits"])(images)["pre_logits"], before["pre_logits"])


@pytest.mark.parametrize("fold", [True, False])
def test_fold_setting_enters_cache_key(fold, colour_folder, in_tmp):
    from pipeline.settings import DatasetSettings, ExtractSettings
    from pipeline.store import FeatureStore
    from stages.extract import run_extraction

    settings = ExtractSettings(
        dataset=DatasetSettings(str(colour_folder)), backbone="test_efficientnet", weights="random",
        workers=0, device="cpu", fold_batchnorm=fold,
    )
    store = FeatureStore(run_extraction(settings).folder)
    assert store.manifest["key_fields"]["fold_batchnorm"] is fold


def test_folded_store_matches_unfolded_store(colour_folder, in_tmp):
    from pipeline.settings import DatasetSettings, ExtractSettings
    from pipeline.store import FeatureStore
    from stages.extract import run_extraction

    def extract(**options):
        settings = ExtractSettings(
            dataset=DatasetSettings(str(colour_folder)), backbone="test_efficientnet", weights="random",
            workers=0, device="cpu", taps=("blocks.2", "pre_logits"), **options,
        )
        return FeatureStore(run_extraction(settings).folder)

    folded = extract()
    plain = extract(fold_batchnorm=False, channels_last=False)
    assert folded.key != plain.key
    for tap in ("blocks.2", "pre_logits"):
        assert torch.allclose(torch.from_numpy(folded.features(tap)), torch.from_numpy(plain.features(tap)), rtol=1e-4, atol=1e-5)
