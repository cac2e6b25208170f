"""Tests of the strategy rules on constructed evidence, and of reading the tap profile."""

from __future__ import annotations

import json

import pytest

from stages.advise import (
    LARGE_IMAGES_PER_CLASS,
    SIMILAR_CONFIDENCE,
    TAP_MARGIN,
    Evidence,
    Strategy,
    format_advice,
    read_finetune_scores,
    read_tap_scores,
    recommend,
)

SMALL = {"a": 120, "b": 100, "c": 110}
LARGE = {"a": 2000, "b": 1500, "c": 1800}
HIGH = SIMILAR_CONFIDENCE + 0.3
LOW = SIMILAR_CONFIDENCE - 0.2
LATE_PROFILE = {"blocks.3": 0.80, "blocks.5": 0.86, "pre_logits": 0.91}
TIED_PROFILE = {"blocks.3": 0.80, "blocks.5": 0.90, "pre_logits": 0.89}
EARLY_PROFILE = {"blocks.3": 0.95, "blocks.5": 0.93, "pre_logits": 0.85}


def evidence(images_per_class, confidence=None, tap_scores=None, **extra) -> Evidence:
    return Evidence(
        store="data/features/s", data="folder", backbone="efficientnet_lite0", images_per_class=images_per_class,
        confidence=confidence, confidence_images=64 if confidence is not None else 0,
        tap_scores=tap_scores or {}, **extra,
    )


@pytest.mark.parametrize(
    ("images", "confidence", "taps", "strategy"),
    [
        (SMALL, HIGH, LATE_PROFILE, Strategy.FROZEN_BASE),
        (SMALL, LOW, EARLY_PROFILE, Strategy.CUT_EARLIER),
        (LARGE, HIGH, LATE_PROFILE, Strategy.FINETUNE_TOP),
        (LARGE, LOW, EARLY_PROFILE, Strategy.FINETUNE_ALL),
    ],
)
def test_recommend_four_quadrants(images, confidence, taps, strategy):
    assert recommend(evidence(images, confidence, taps)).strategy is strategy


def test_recommend_small_similar_reports_size_and_similarity():
    advice = recommend(evidence(SMALL, HIGH, LATE_PROFILE))
    assert advice.size == "small"
    assert advice.similarity == "similar"


def test_recommend_size_uses_median_class():
    skewed = {"a": 50_000, "b": 100, "c": 90}
    assert recommend(evidence(skewed, HIGH, LATE_PROFILE)).size == "small"


def test_recommend_size_threshold_is_inclusive():
    at_threshold = {"a": LARGE_IMAGES_PER_CLASS, "b": LARGE_IMAGES_PER_CLASS}
    assert recommend(evidence(at_threshold, HIGH)).size == "large"


def test_recommend_low_confidence_alone_means_different():
    advice = recommend(evidence(SMALL, LOW))
    assert advice.similarity == "different"
    assert advice.strategy is Strategy.CUT_EARLIER


def test_recommend_earlier_tap_alone_means_different():
    advice = recommend(evidence(SMALL, None, EARLY_PROFILE, confidence_note="random weights"))
    assert advice.similarity == "different"
    assert any("random weights" in reason for reason in advice.reasons)


def test_recommend_tap_profile_wins_conflict():
    advice = recommend(evidence(SMALL, LOW, LATE_PROFILE))
    assert advice.similarity == "similar"
    assert advice.strategy is Strategy.FROZEN_BASE
    assert any("disagree" in reason for reason in advice.reasons)


def test_recommend_gain_below_margin_is_not_better():
    profile = {"blocks.5": 0.90 + TAP_MARGIN / 2, "pre_logits": 0.90}
    assert recommend(evidence(SMALL, None, profile)).similarity == "unknown"


def test_recommend_tied_profile_defers_to_confidence():
    low = recommend(evidence(SMALL, LOW, TIED_PROFILE))
    high = recommend(evidence(SMALL, HIGH, TIED_PROFILE))
    assert low.strategy is Strategy.CUT_EARLIER
    assert high.strategy is Strategy.FROZEN_BASE
    assert any("does not decide" in reason for reason in low.reasons)


def test_recommend_last_tap_margin_means_similar():
    profile = {"blocks.5": 0.90, "pre_logits": 0.90 + TAP_MARGIN + 1e-9}
    assert recommend(evidence(SMALL, None, profile)).similarity == "similar"


def test_recommend_gain_at_margin_is_better():
    profile = {"blocks.5": 0.90 + TAP_MARGIN + 1e-9, "pre_logits": 0.90}
    assert recommend(evidence(SMALL, None, profile)).similarity == "different"


def test_recommend_without_signals_assumes_similar():
    advice = recommend(evidence(SMALL))
    assert advice.similarity == "unknown"
    assert advice.strategy is Strategy.FROZEN_BASE
    assert any("assumes similar" in reason for reason in advice.reasons)


def test_recommend_without_profile_suggests_taps():
    advice = recommend(evidence(SMALL, HIGH, {"pre_logits": 0.9}))
    assert any(step.startswith("featcache extract") and "--taps" in step for step in advice.next_steps)


def test_recommend_cut_earlier_names_best_tap():
    advice = recommend(evidence(SMALL, LOW, EARLY_PROFILE))
    assert any("--taps blocks.3 --pooling grid2" in step for step in advice.next_steps)


def test_recommend_finetune_all_compares_from_scratch():
    advice = recommend(evidence(LARGE, LOW, EARLY_PROFILE))
    assert any("--unfreeze all" in step for step in advice.next_steps)
    assert any("--from-scratch" in step for step in advice.next_steps)


def test_recommend_reasons_quote_measurements():
    advice = recommend(evidence(SMALL, 0.734, EARLY_PROFILE, top_categories=[("ant", 30)]))
    text = format_advice(advice)
    assert "0.73" in text
    assert "blocks.3" in text
    assert "ant (30)" in text
    assert "median of 110" in text


def test_advice_to_dict_is_json_ready():
    payload = recommend(evidence(SMALL, HIGH, LATE_PROFILE)).to_dict()
    assert json.loads(json.dumps(payload))["strategy"] == "frozen-base"


def test_read_tap_scores_depth_order(tmp_path):
    rows = [
        {"tap": "pre_logits", "head": "logreg", "val_accuracy": 0.8},
        {"tap": "pre_logits", "head": "mlp", "val_accuracy": 0.9},
        {"tap": "blocks.3", "head": "logreg", "val_accuracy": 0.7},
        {"tap": "finetune:last-1", "head": "finetune", "val_accuracy": 0.99},
    ]
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"results": rows}))
    scores = read_tap_scores(path, ["blocks.3", "blocks.5", "pre_logits"])
    assert list(scores) == ["blocks.3", "pre_logits"]
    assert scores["pre_logits"] == 0.9


def test_recommend_reports_finetune_gain():
    advice = recommend(evidence(SMALL, HIGH, LATE_PROFILE, finetune_scores={"finetune:last-1": 0.96}))
    assert advice.strategy is Strategy.FROZEN_BASE
    assert any("finetune:last-1 reached 0.960" in reason and "+0.050" in reason for reason in advice.reasons)


def test_read_finetune_scores(tmp_path):
    rows = [{"tap": "finetune:last-1", "head": "finetune", "val_accuracy": 0.9},
            {"tap": "finetune:all", "head": "finetune", "val_accuracy": 0.95}]
    (tmp_path / "finetune.json").write_text(json.dumps({"results": rows}))
    assert read_finetune_scores(tmp_path / "finetune.json") == {"finetune:last-1": 0.9, "finetune:all": 0.95}


def test_read_tap_scores_missing_file(tmp_path):
    assert read_tap_scores(tmp_path / "results.json", ["pre_logits"]) == {}


def test_cli_advise_missing_store(in_tmp, caplog):
    from pipeline.cli import main

    assert main(["advise", "data/features/missing"]) == 2
    assert "No feature store at data/features/missing" in caplog.text


@pytest.mark.slow
def test_cli_advise_store_with_random_weights(in_tmp, colour_folder, capsys):
    from pipeline.cli import main

    assert main(["extract", "--data", str(colour_folder), "--backbone", "test_efficientnet", "--weights", "random",
                 "--taps", "blocks.1,pre_logits", "--workers", "0", "--name", "colours"]) == 0
    assert main(["heads", "--store", "data/features/colours", "--heads", "logreg"]) == 0
    capsys.readouterr()
    assert main(["advise", "data/features/colours", "--offline"]) == 0
    output = capsys.readouterr().out
    assert output.startswith("Strategy: ")
    assert "random weights" in output
    assert (in_tmp / "data" / "results" / "colours" / "advice.json").is_file()
