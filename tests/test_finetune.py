"""Tests of the fine-tuning baseline with a tiny random timm backbone on small image folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.backbones import build_backbone
from pipeline.datasets import DatasetSettings, load_dataset
from pipeline.settings import SettingsError
from stages.finetune import (
    FinetuneSettings,
    leaderboard_rows,
    prepare_trainable,
    resolve_blocks,
    run_finetune,
    split_indices,
)

ROW_KEYS = ("tap", "head", "train_accuracy", "val_accuracy", "eval_split", "accuracy", "balanced_accuracy")


def trainable_names(model: nn.Module) -> set[str]:
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def test_resolve_blocks_efficientnet():
    model = build_backbone("test_efficientnet", weights="random").model
    blocks, head = resolve_blocks(model)
    assert len(blocks) == len(model.blocks)
    assert head[0] is model.conv_head


def test_resolve_blocks_resnet():
    model = build_backbone("test_resnet", weights="random").model
    blocks, head = resolve_blocks(model)
    assert blocks[-1] is model.layer4
    assert head == []


def test_resolve_blocks_unknown_architecture():
    with pytest.raises(SettingsError, match="Use '--unfreeze all'"):
        resolve_blocks(nn.Sequential(nn.Linear(2, 2)))


def test_prepare_trainable_last_block_only():
    backbone = build_backbone("test_efficientnet", weights="random")
    last = len(backbone.model.blocks) - 1
    prepare_trainable(backbone, FinetuneSettings(unfreeze="1"), class_count=3)
    names = trainable_names(backbone.model)
    assert any(name.startswith(f"blocks.{last}.") for name in names)
    assert not any(name.startswith(f"blocks.{last - 1}.") for name in names)
    assert any(name.startswith("conv_head") for name in names)
    assert "classifier.weight" in names
    assert not any(name.startswith("conv_stem") for name in names)


def test_prepare_trainable_replaces_classifier():
    backbone = build_backbone("test_resnet", weights="random")
    prepare_trainable(backbone, FinetuneSettings(unfreeze="2"), class_count=3)
    assert backbone.model.fc.out_features == 3
    assert any(name.startswith("layer3.") for name in trainable_names(backbone.model))
    assert not any(name.startswith("layer2.") for name in trainable_names(backbone.model))


def test_prepare_trainable_all_layers():
    backbone = build_backbone("test_efficientnet", weights="random")
    _, groups = prepare_trainable(backbone, FinetuneSettings(unfreeze="all"), class_count=3)
    assert trainable_names(backbone.model) == {name for name, _ in backbone.model.named_parameters()}
    assert groups[1]["lr"] == pytest.approx(1e-4)


def test_prepare_trainable_rejects_too_many_blocks():
    backbone = build_backbone("test_resnet", weights="random")
    with pytest.raises(SettingsError, match="has 4 blocks"):
        prepare_trainable(backbone, FinetuneSettings(unfreeze="5"), class_count=3)


@pytest.mark.parametrize(("overrides", "message"), [({"unfreeze": "0"}, "unfreeze='0'"), ({"unfreeze": "top"}, "unfreeze='top'"),
                                                    ({"augment": "rotate"}, "augment='rotate'"), ({"epochs": 0}, "epochs=0"),
                                                    ({"lr": -1.0}, "lr=-1.0 is invalid"), ({"lr": 0.0}, "lr=0.0"),
                                                    ({"weight_decay": -0.1}, "weight_decay=-0.1")])
def test_settings_reject_invalid_values(overrides, message):
    with pytest.raises(SettingsError, match=message):
        FinetuneSettings(**overrides).validate()


@pytest.mark.parametrize(("overrides", "label"), [({}, "finetune:last-1"), ({"unfreeze": "3"}, "finetune:last-3"),
                                                  ({"unfreeze": "all"}, "finetune:all"), ({"from_scratch": True}, "finetune:scratch")])
def test_settings_label(overrides, label):
    assert FinetuneSettings(**overrides).label() == label


def test_split_indices_with_val_and_no_test(colour_folder):
    dataset = load_dataset(DatasetSettings(source=str(colour_folder)))
    indices, select_split, eval_split, notes = split_indices(dataset, seed=0)
    assert len(indices["train"]) == 18
    assert select_split == "val"
    assert eval_split == "val"
    assert indices["eval"] == indices["select"]
    assert len(notes) == 1


@pytest.mark.slow
def test_run_finetune_writes_results_row(colour_folder, tmp_path):
    settings = FinetuneSettings(
        dataset=DatasetSettings(source=str(colour_folder)), backbone="test_efficientnet", weights="random",
        unfreeze="1", epochs=2, patience=1, batch_size=8, workers=0, device="cpu", output_root=str(tmp_path),
    )
    row = run_finetune(settings)
    folder = tmp_path / "colours-test_efficientnet-finetune"
    for key in ROW_KEYS:
        assert key in row
    assert row["tap"] == "finetune:last-1"
    assert row["head"] == "finetune"
    assert row["eval_split"] == "val"
    assert 0.0 <= row["accuracy"] <= 1.0
    assert Path(row["model_file"]).is_file()
    saved = json.loads((folder / "finetune.json").read_text())["results"]
    assert [item["tap"] for item in saved] == ["finetune:last-1"]
    assert leaderboard_rows(folder)[0]["head"] == "finetune"


@pytest.mark.slow
def test_run_finetune_reuses_store_split(colour_folder, tmp_path):
    from pipeline.settings import ExtractSettings, HeadSettings
    from stages.extract import run_extraction
    from stages.train_heads import run_heads

    extraction = run_extraction(ExtractSettings(
        dataset=DatasetSettings(source=str(colour_folder)), backbone="test_efficientnet", weights="random",
        workers=0, device="cpu", output_root=str(tmp_path / "features"),
    ))
    run_heads(HeadSettings(store=str(extraction.folder), heads=("logreg",), controls=(), output_root=str(tmp_path / "results")))
    row = run_finetune(FinetuneSettings(
        store=str(extraction.folder), unfreeze="all", epochs=1, batch_size=8, workers=0, device="cpu",
        output_root=str(tmp_path / "results"),
    ))
    rows = leaderboard_rows(tmp_path / "results" / extraction.folder.name)
    assert sorted(row["head"] for row in rows) == ["finetune", "logreg"]
    assert len({row["eval_split"] for row in rows}) == 1

    # the row records the store's dataset and backbone, not the defaults of the settings
    assert row["settings"]["dataset"]["source"] == str(colour_folder)
    assert row["settings"]["backbone"] == "test_efficientnet"
    assert row["ci_low"] <= row["accuracy"] <= row["ci_high"]
    assert row["metrics"]["balanced_accuracy"] == pytest.approx(row["balanced_accuracy"])

    # the combined leaderboard that `featcache finetune` prints
    from stages.train_heads import format_table

    table = format_table(rows).splitlines()
    assert len(table) == 4
    assert any(" finetune " in line for line in table[2:])


@pytest.mark.slow
def test_run_finetune_is_reproducible_for_a_seed(colour_folder, tmp_path):
    settings = dict(
        dataset=DatasetSettings(source=str(colour_folder)), backbone="test_resnet", weights="random",
        unfreeze="1", epochs=1, batch_size=9, workers=0, device="cpu",
    )
    first = run_finetune(FinetuneSettings(**settings, output_root=str(tmp_path / "a")))
    second = run_finetune(FinetuneSettings(**settings, output_root=str(tmp_path / "b")))
    weights_a = torch.load(first["model_file"], weights_only=True)
    weights_b = torch.load(second["model_file"], weights_only=True)
    assert torch.equal(weights_a["fc.weight"], weights_b["fc.weight"])


@pytest.mark.parametrize(
    ("arguments", "message"),
    [([], "finetune needs --store STORE"), (["--data", "digits", "--unfreeze", "top"], "unfreeze='top' is invalid"),
     (["--store", "data/features/missing"], "No feature store at data/features/missing")],
)
def test_cli_finetune_rejects_bad_input(in_tmp, caplog, arguments, message):
    from pipeline.cli import main

    assert main(["finetune", *arguments]) == 2
    assert message in caplog.text


def test_results_file_fails_before_training(colour_folder, tmp_path):
    occupied = tmp_path / "occupied"
    occupied.write_text("not a folder\n")
    settings = FinetuneSettings(dataset=DatasetSettings(source=str(colour_folder)), backbone="test_efficientnet",
                                weights="random", epochs=1, workers=0, device="cpu", output_root=str(occupied))
    with pytest.raises(SettingsError, match="Cannot write results to .*occupied.*--results"):
        run_finetune(settings)
    assert occupied.read_text() == "not a folder\n"
