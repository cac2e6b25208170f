"""Tests of the device options of stage one: defaults, mixed precision, channels-last and compile."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline import devices
from pipeline.cli import build_parser, extract_settings_from, main
from pipeline.settings import DatasetSettings, ExtractSettings, SettingsError


@pytest.mark.parametrize(("cores", "workers"), [(1, 0), (2, 0), (3, 2), (4, 3), (64, devices.MAX_WORKERS)])
def test_default_workers_by_cores(monkeypatch, cores, workers):
    monkeypatch.setattr(devices, "available_cpus", lambda: cores)
    assert devices.default_workers() == workers


def test_default_batch_size_by_device():
    assert devices.default_batch_size(torch.device("cpu")) == devices.CPU_BATCH_SIZE
    assert devices.default_batch_size(torch.device("cuda")) == devices.GPU_BATCH_SIZE


def test_fp16_on_cpu_rejected():
    with pytest.raises(SettingsError, match="amp='fp16' needs a CUDA device"):
        devices.check_amp("fp16", torch.device("cpu"))


def test_unknown_amp_rejected_by_settings():
    with pytest.raises(SettingsError, match="amp='fp8' is invalid"):
        ExtractSettings(amp="fp8").validate()


def test_negative_batch_size_rejected():
    with pytest.raises(SettingsError, match="batch_size=-1"):
        ExtractSettings(batch_size=-1).validate()


def test_bf16_autocast_on_cpu_runs_linear_in_bf16():
    layer = nn.Linear(4, 2)
    with devices.autocast_context("bf16", torch.device("cpu")):
        output = layer(torch.ones(1, 4))
    assert output.dtype == torch.bfloat16


def test_no_amp_keeps_float32():
    layer = nn.Linear(4, 2)
    with devices.autocast_context("none", torch.device("cpu")):
        output = layer(torch.ones(1, 4))
    assert output.dtype == torch.float32


def test_channels_last_model_and_batch():
    model = nn.Sequential(nn.Conv2d(3, 8, 3))
    devices.prepare_model(model, torch.device("cpu"), channels_last=True, compile_model=False)
    batch = devices.to_device(torch.zeros(2, 3, 8, 8), torch.device("cpu"), channels_last=True)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert batch.is_contiguous(memory_format=torch.channels_last)


def test_cli_accepts_gpu_options():
    args = build_parser().parse_args(["extract", "--amp", "bf16", "--channels-last", "--compile", "--no-draft"])
    settings = extract_settings_from(args)
    assert settings.amp == "bf16"
    assert settings.channels_last
    assert settings.compile
    assert not settings.draft


def test_cli_defaults_for_workers_and_batch_size():
    settings = extract_settings_from(build_parser().parse_args(["extract"]))
    assert settings.workers == devices.default_workers()
    assert settings.batch_size == 0
    assert settings.draft


def test_cli_rejects_unknown_amp(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["extract", "--amp", "fp8"])
    assert "invalid choice: 'fp8'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a CUDA GPU")
def test_cuda_without_gpu_exits_with_error(colour_folder, in_tmp, caplog):
    code = main(["extract", "--data", str(colour_folder), "--backbone", "test_efficientnet", "--weights", "random", "--device", "cuda"])
    assert code == 2
    assert "no CUDA GPU is available" in caplog.text


def _extract(folder, **options):
    from stages.extract import run_extraction

    options = {"device": "cpu", **options}
    settings = ExtractSettings(
        dataset=DatasetSettings(str(folder)), backbone="test_efficientnet", weights="random", workers=0, **options
    )
    return run_extraction(settings)


def test_amp_enters_cache_key(colour_folder, in_tmp):
    from pipeline.store import FeatureStore

    plain = FeatureStore(_extract(colour_folder).folder)
    mixed = FeatureStore(_extract(colour_folder, amp="bf16").folder)
    assert plain.key != mixed.key
    assert mixed.manifest["key_fields"]["amp"] == "bf16"
    assert plain.folder != mixed.folder


def test_draft_enters_cache_key(colour_folder, in_tmp):
    from pipeline.store import FeatureStore

    drafted = FeatureStore(_extract(colour_folder).folder)
    full = FeatureStore(_extract(colour_folder, draft=False).folder)
    assert drafted.key != full.key
    assert full.manifest["key_fields"]["draft"] is False


def test_bf16_features_close_to_float32(colour_folder, in_tmp):
    from pipeline.store import FeatureStore

    plain = FeatureStore(_extract(colour_folder).folder).features("pre_logits")
    mixed = FeatureStore(_extract(colour_folder, amp="bf16").folder).features("pre_logits")
    cosine = torch.nn.functional.cosine_similarity(torch.from_numpy(plain), torch.from_numpy(mixed), dim=1)
    assert mixed.dtype == plain.dtype
    assert float(cosine.min()) > 0.99


def test_channels_last_features_match_default(colour_folder, in_tmp):
    from pipeline.store import FeatureStore

    plain = FeatureStore(_extract(colour_folder, channels_last=False).folder).features("pre_logits")
    channels_last = FeatureStore(_extract(colour_folder, channels_last=True).folder).features("pre_logits")
    assert torch.allclose(torch.from_numpy(plain), torch.from_numpy(channels_last), atol=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a CUDA GPU")
def test_cuda_error_keeps_store_on_force(colour_folder, in_tmp):
    from pipeline.store import FeatureStore

    folder = _extract(colour_folder).folder
    with pytest.raises(SettingsError, match="no CUDA GPU is available"):
        _extract(colour_folder, device="cuda", force=True)
    assert len(FeatureStore(folder)) == 27
