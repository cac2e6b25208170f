"""The featcache command line, run in-process as a user would."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import build_parser, main
from pipeline.settings import DatasetSettings, ExtractSettings, SettingsError


def test_extract_then_heads(in_tmp, colour_folder, capsys):
    code = main(["extract", "--data", str(colour_folder), "--workers", "0", "--batch-size", "9", "--offline"])
    assert code == 0
    store_folder = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert (store_folder / "manifest.json").is_file()

    code = main(["heads", "--heads", "logreg,linear"])
    assert code == 0
    table = capsys.readouterr().out
    assert "pre_logits  logreg" in table
    assert "pre_logits  linear" in table

    results_folder = in_tmp / "data" / "results" / store_folder.name
    rows = json.loads((results_folder / "results.json").read_text())["results"]
    pretrained = [row for row in rows if row["tap"] == "pre_logits"]
    assert {row["head"] for row in pretrained} == {"logreg", "linear"}
    assert all(row["eval_split"] == "val" for row in pretrained)
    assert all(row["accuracy"] > 0.9 for row in pretrained)
    assert (results_folder / "leaderboard.csv").is_file()
    head_files = {row["head"]: results_folder / row["head_file"] for row in pretrained}
    assert head_files["logreg"].suffix == ".joblib"
    assert head_files["logreg"].is_file()
    assert head_files["linear"].suffix == ".pt"
    assert head_files["linear"].is_file()


def test_heads_without_store_is_an_error(in_tmp, caplog):
    assert main(["heads"]) == 2
    assert "featcache extract" in caplog.text


def test_taps_lists_blocks_and_pre_logits(capsys):
    assert main(["taps", "efficientnet_lite0"]) == 0
    output = capsys.readouterr().out
    assert "blocks.3" in output
    assert "pre_logits" in output
    assert "1280" in output


def test_unknown_tap_names_the_command(in_tmp, colour_folder, caplog):
    code = main(["extract", "--data", str(colour_folder), "--taps", "blocks.99", "--workers", "0", "--offline"])
    assert code == 2
    assert "featcache taps" in caplog.text


def test_unknown_backbone_is_an_error(in_tmp, colour_folder, caplog):
    assert main(["extract", "--data", str(colour_folder), "--backbone", "no_such_net", "--offline"]) == 2
    assert "no_such_net" in caplog.text


def test_missing_torchvision_weights_name_the_file(in_tmp, colour_folder, caplog, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(in_tmp / "torch-home"))
    code = main(["extract", "--data", str(colour_folder), "--backbone", "resnet18", "--offline"])
    assert code == 2
    assert "resnet18" in caplog.text
    assert str(in_tmp / "torch-home" / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in caplog.text
    assert "place it at" in caplog.text


def test_missing_timm_weights_name_the_cache(in_tmp, colour_folder, caplog, monkeypatch):
    code = main(["extract", "--data", str(colour_folder), "--backbone", "resnet10t", "--offline"])
    assert code == 2
    assert "resnet10t" in caplog.text
    assert "--checkpoint" in caplog.text


def test_random_weights_need_no_download(in_tmp, colour_folder, capsys):
    code = main(
        ["extract", "--data", str(colour_folder), "--backbone", "resnet18", "--weights", "random",
         "--taps", "layer2,pre_logits", "--workers", "0", "--offline"]
    )
    assert code == 0
    store_folder = Path(capsys.readouterr().out.strip().splitlines()[-1])
    manifest = json.loads((store_folder / "manifest.json").read_text())
    assert manifest["taps"] == {"layer2": 128, "pre_logits": 512}
    assert manifest["provenance"]["weights"] == "random"


def test_local_checkpoint_is_loaded(in_tmp, colour_folder, capsys):
    import torch
    import torchvision

    torch.manual_seed(3)
    model = torchvision.models.resnet18(num_classes=1000)
    checkpoint = in_tmp / "my-resnet18.pth"
    torch.save(model.state_dict(), checkpoint)
    code = main(["extract", "--data", str(colour_folder), "--backbone", "resnet18", "--checkpoint", str(checkpoint),
                 "--workers", "0", "--offline"])
    assert code == 0
    store_folder = Path(capsys.readouterr().out.strip().splitlines()[-1])
    manifest = json.loads((store_folder / "manifest.json").read_text())
    assert manifest["provenance"]["weights"] == str(checkpoint)


def test_invalid_dtype_rejected_by_parser(in_tmp, colour_folder):
    with pytest.raises(SystemExit):
        main(["extract", "--data", str(colour_folder), "--offline", "--dtype", "float64"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["extract", "--batch-size", "-1"], "argument --batch-size: -1 is invalid: use 0 or more"),
        (["extract", "--workers", "-1"], "argument --workers: -1 is invalid: use 0 or more"),
        (["extract", "--shard-size", "0"], "argument --shard-size: 0 is invalid: use 1 or more"),
        (["heads", "--cv-max-train", "-5"], "argument --cv-max-train: -5 is invalid: use 0 or more"),
        (["heads", "--cv-folds", "1"], "argument --cv-folds: 1 is invalid: use 2 or more"),
        (["heads", "--seeds", "two"], "argument --seeds: 'two' is invalid: use an integer"),
    ],
)
def test_invalid_counts_name_the_option(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_invalid_batch_size_rejected_by_settings(colour_folder):
    with pytest.raises(SettingsError, match="batch_size=-1"):
        ExtractSettings(dataset=DatasetSettings(str(colour_folder)), batch_size=-1).validate()


def test_heads_on_missing_folder_names_it(in_tmp, caplog):
    assert main(["heads", "--store", str(in_tmp / "nothing")]) == 2
    assert "the folder does not exist" in caplog.text


def test_other_libraries_log_warnings_only():
    probe = (
        "import logging; from pipeline.cli import configure_logging; configure_logging(False); "
        "print(logging.getLogger('torch._subclasses').getEffectiveLevel(), logging.getLogger('stages.extract').getEffectiveLevel())"
    )
    completed = subprocess.run([sys.executable, "-c", probe], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                               text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.split() == [str(logging.WARNING), str(logging.INFO)]


def test_unknown_tap_leaves_no_store(in_tmp, colour_folder):
    assert main(["extract", "--data", str(colour_folder), "--taps", "blocks.99", "--workers", "0", "--offline"]) == 2
    features = in_tmp / "data" / "features"
    assert not features.exists() or not any(features.glob("*/manifest.json"))


@pytest.mark.parametrize("argv", [["-v", "extract"], ["extract", "-v"], ["heads", "--verbose"]])
def test_verbose_before_or_after_subcommand(argv):
    assert build_parser().parse_args(argv).verbose is True


def test_verbose_off_by_default():
    assert build_parser().parse_args(["extract"]).verbose is False


def test_settings_errors_name_the_option(in_tmp, colour_folder, caplog):
    assert main(["extract", "--data", str(colour_folder), "--val-fraction", "1.5"]) == 2
    assert "--val-fraction=1.5 is invalid" in caplog.text
    caplog.clear()
    assert main(["heads", "--overfit-gap", "-1"]) == 2
    assert "--overfit-gap=-1.0 is invalid" in caplog.text


def test_option_names_only_for_known_options():
    from pipeline.cli import with_option_names

    options = {"--val-fraction", "--seeds"}
    assert with_option_names("val_fraction=1.5 is invalid", options) == "--val-fraction=1.5 is invalid"
    assert with_option_names("cv_max_train=-1 is invalid", options) == "cv_max_train=-1 is invalid"
    assert with_option_names("--seeds=0 and seeds=0", options) == "--seeds=0 and --seeds=0"


def test_help_of_off_switch_has_no_default(capsys):
    with pytest.raises(SystemExit):
        main(["extract", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--no-draft decode JPEGs at full size (no draft mode) --virtual-view" in text
    assert "(default: on)" in text  # the on/off pairs still state theirs
