"""Strategy advice: pick one of the four classic transfer-learning strategies from measured evidence.

The strategies cross dataset size with similarity to the pretraining data:

- small and similar: keep the base frozen and train a new classifier on the last features;
- small and different: cut the base earlier and train a classifier on an earlier tap;
- large and similar: fine-tune the top blocks;
- large and different: fine-tune the whole network.

``recommend`` contains the rules and is a pure function of an ``Evidence`` record, so the rules can be
tested on constructed evidence. ``gather_evidence`` measures that record for a feature store. It
counts the training images per class and measures how confidently the backbone's own ImageNet
classifier recognizes a sample of the images (the similarity signal, see ``stages.similarity``).
It also reads the tap profile of the stage-two results: whether an earlier tap beats the last one.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.backbones import PRE_LOGITS
from pipeline.settings import DATA_ROOT
from pipeline.store import FeatureStore

logger = logging.getLogger(__name__)

# NOTE: both thresholds are rules of thumb, not measured boundaries. A median of 1,000 training
# images per class is where fine-tuning commonly starts to pay off over a frozen base.
LARGE_IMAGES_PER_CLASS = 1000
# Mean max-softmax of the ImageNet classifier at or above which the images count as similar to
# ImageNet. EfficientNet-Lite0 gave 0.73 on a 64-image sample of hymenoptera_data (ants and bees
# are ImageNet classes) and 0.11 on the embedded 8x8 digits; 0.4 lies between the two.
SIMILAR_CONFIDENCE = 0.4
# Val accuracy by which an earlier tap must beat the last tap to count as better, in accuracy units.
TAP_MARGIN = 0.02


class Strategy(str, Enum):
    FROZEN_BASE = "frozen-base"
    CUT_EARLIER = "cut-earlier"
    FINETUNE_TOP = "finetune-top"
    FINETUNE_ALL = "finetune-all"


SUMMARIES = {
    Strategy.FROZEN_BASE: "keep the backbone frozen and train a new classifier on the last features",
    Strategy.CUT_EARLIER: "cut the backbone earlier and train a classifier on an earlier tap",
    Strategy.FINETUNE_TOP: "fine-tune the top blocks of the backbone with a new classifier",
    Strategy.FINETUNE_ALL: "fine-tune the whole backbone with a new classifier",
}


SIMILARITY_WORDS = {
    "similar": "similar to the pretraining data",
    "different": "different from the pretraining data",
    "unknown": "similarity to the pretraining data not measured",
}


@dataclass(frozen=True)
class Evidence:
    """The measurements the advice is based on; None marks a measurement that is not available."""

    store: str  # store folder
    data: str  # dataset source, for the commands of the next steps
    backbone: str
    images_per_class: dict[str, int]  # class name -> training images (view 0 only)
    confidence: float | None = None  # mean max-softmax of the backbone's ImageNet classifier
    entropy: float | None = None  # mean softmax entropy divided by log(number of ImageNet classes)
    confidence_images: int = 0  # images the confidence was measured on
    confidence_note: str = ""  # why the confidence is missing, when it is
    top_categories: list[tuple[str, int]] = field(default_factory=list)  # most frequent ImageNet predictions
    tap_scores: dict[str, float] = field(default_factory=dict)  # tap -> best val accuracy, shallow to deep
    finetune_scores: dict[str, float] = field(default_factory=dict)  # finetune:last-N and such -> val accuracy


@dataclass
class Advice:
    """A recommended strategy with its reasons and the commands that would confirm it."""

    strategy: Strategy
    size: str  # "small" or "large"
    similarity: str  # "similar", "different", or "unknown" when no signal was measured
    reasons: list[str]
    next_steps: list[str]
    evidence: Evidence

    def to_dict(self) -> dict[str, Any]:
        payload = asdict(self)
        payload["strategy"] = self.strategy.value
        return payload


def _similarity_from_confidence(evidence: Evidence, reasons: list[str]) -> str | None:
    if evidence.confidence is None:
        reasons.append(f"similarity from the pretrained classifier: not measured ({evidence.confidence_note or 'no value'})")
        return None
    verdict = "similar" if evidence.confidence >= SIMILAR_CONFIDENCE else "different"
    top = ", ".join(f"{name} ({count})" for name, count in evidence.top_categories[:3])
    reasons.append(
        f"the backbone's ImageNet classifier has mean max-softmax {evidence.confidence:.2f} on "
        f"{evidence.confidence_images} images ({'at or above' if verdict == 'similar' else 'below'} "
        f"{SIMILAR_CONFIDENCE}), so the images look {'similar to' if verdict == 'similar' else 'different from'} ImageNet"
        + (f"; its most frequent predictions are {top}" if top else "")
    )
    return verdict


def _similarity_from_taps(evidence: Evidence, reasons: list[str]) -> tuple[str | None, str | None]:
    """Return (verdict, best earlier tap) from the tap profile; the verdict is None without a clear winner."""
    if len(evidence.tap_scores) < 2:
        reasons.append(
            f"tap profile: not available, because stage-two results exist for {len(evidence.tap_scores)} "
            "of the store's taps and the profile needs at least two"
        )
        return None, None
    *earlier, last = list(evidence.tap_scores)
    best_earlier = max(earlier, key=lambda tap: evidence.tap_scores[tap])
    best_score, last_score = evidence.tap_scores[best_earlier], evidence.tap_scores[last]
    comparison = f"({best_score:.3f} vs {last_score:.3f} val accuracy)"
    if best_score - last_score >= TAP_MARGIN:
        reasons.append(
            f"the earlier tap {best_earlier} beats the last tap {last} by at least {TAP_MARGIN} {comparison}, "
            "so the last features are too specific to the pretraining task"
        )
        return "different", best_earlier
    if last_score - best_score >= TAP_MARGIN:
        reasons.append(
            f"the last tap {last} beats every earlier tap by at least {TAP_MARGIN}, the best being {best_earlier} "
            f"{comparison}, so the last features transfer"
        )
        return "similar", best_earlier
    reasons.append(
        f"the best earlier tap {best_earlier} and the last tap {last} are within {TAP_MARGIN} of each other "
        f"{comparison}, so the tap profile does not decide the similarity"
    )
    return None, best_earlier


def recommend(evidence: Evidence) -> Advice:
    """Pick a strategy from the evidence, with the reasons and the commands to run next."""
    reasons: list[str] = []

    # size: the median class decides, so one large class does not make a dataset large
    counts = list(evidence.images_per_class.values())
    median = float(np.median(counts)) if counts else 0.0
    size = "large" if median >= LARGE_IMAGES_PER_CLASS else "small"
    reasons.append(
        f"{len(counts)} classes with a median of {median:.0f} training images per class "
        f"(min {min(counts, default=0)}): {size}, because the threshold is {LARGE_IMAGES_PER_CLASS}"
    )

    # similarity: the tap profile is measured on this dataset's own labels, so it wins a conflict
    from_confidence = _similarity_from_confidence(evidence, reasons)
    from_taps, best_earlier = _similarity_from_taps(evidence, reasons)
    if from_taps is not None and from_confidence is not None and from_taps != from_confidence:
        reasons.append(
            f"the two similarity signals disagree; the tap profile ({from_taps}) wins, because it is "
            "measured on this dataset's labels"
        )
    similarity = from_taps or from_confidence or "unknown"
    if similarity == "unknown":
        reasons.append("no similarity signal was measured, so the advice assumes similar data (the cheapest strategy)")

    # fine-tuning results already measured are reported, but the rules above decide
    if evidence.finetune_scores and evidence.tap_scores:
        best_head = max(evidence.tap_scores.values())
        for label, score in evidence.finetune_scores.items():
            reasons.append(f"{label} reached {score:.3f} val accuracy ({score - best_head:+.3f} against the best head)")

    if size == "small":
        strategy = Strategy.CUT_EARLIER if similarity == "different" else Strategy.FROZEN_BASE
    else:
        strategy = Strategy.FINETUNE_ALL if similarity == "different" else Strategy.FINETUNE_TOP
    next_steps = plan_next_steps(strategy, evidence, best_earlier)
    return Advice(strategy, size, similarity, reasons, next_steps, evidence)


def plan_next_steps(strategy: Strategy, evidence: Evidence, best_earlier: str | None) -> list[str]:
    """List the commands that would confirm the strategy against its neighbours."""
    store, data, backbone = evidence.store, evidence.data, evidence.backbone
    steps = []
    if len(evidence.tap_scores) < 2:
        steps.append(
            f"featcache extract --data {data} --backbone {backbone} --taps <two or more taps, see 'featcache taps "
            f"{backbone}'>,{PRE_LOGITS}   # then 'featcache heads' and 'featcache advise' on the new store"
        )
    if strategy is Strategy.FROZEN_BASE:
        steps.append(f"featcache heads --store {store} --head-taps {PRE_LOGITS}   # the frozen-base result")
        steps.append(f"featcache finetune --store {store} --unfreeze 1   # fine-tuning should not beat it by much")
    elif strategy is Strategy.CUT_EARLIER:
        tap = best_earlier or "<an earlier tap>"
        steps.append(
            f"featcache extract --data {data} --backbone {backbone} --taps {tap} --pooling grid2   "
            "# keep coarse layout of the earlier tap, then 'featcache heads' on the new store"
        )
        steps.append(f"featcache extract --data {data} --backbone {backbone} --taps {tap} --pooling gem3")
        steps.append(f"featcache finetune --store {store} --unfreeze all   # the fine-tuning reference")
    elif strategy is Strategy.FINETUNE_TOP:
        steps.append(f"featcache finetune --store {store} --unfreeze 2   # compare with the heads on {PRE_LOGITS}")
        steps.append(f"featcache finetune --store {store} --unfreeze all   # should not beat the top blocks by much")
    else:
        steps.append(f"featcache finetune --store {store} --unfreeze all")
        steps.append(f"featcache finetune --store {store} --unfreeze 2   # the cheaper alternative")
        steps.append(f"featcache finetune --store {store} --from-scratch   # does pretraining still help?")
    return steps


def read_tap_scores(results_file: Path, taps_in_depth_order: list[str]) -> dict[str, float]:
    """Return the best val accuracy of each tap in a stage-two results file, shallow to deep."""
    if not results_file.is_file():
        return {}
    rows = json.loads(results_file.read_text()).get("results", [])
    best: dict[str, float] = {}
    for row in rows:
        tap, score = row.get("tap"), row.get("val_accuracy")
        if tap in taps_in_depth_order and score is not None:
            best[tap] = max(best.get(tap, 0.0), float(score))
    return {tap: best[tap] for tap in taps_in_depth_order if tap in best}


def read_finetune_scores(finetune_file: Path) -> dict[str, float]:
    """Return the val accuracy of each fine-tuning run in a finetune.json file."""
    if not finetune_file.is_file():
        return {}
    rows = json.loads(finetune_file.read_text()).get("results", [])
    return {row["tap"]: float(row["val_accuracy"]) for row in rows if "tap" in row and "val_accuracy" in row}


def format_advice(advice: Advice) -> str:
    """Render the advice as readable text for the terminal."""
    lines = [
        f"Strategy: {advice.strategy.value}: {SUMMARIES[advice.strategy]}",
        f"Dataset: {advice.size}, {SIMILARITY_WORDS[advice.similarity]}",
        "Reasons:",
        *(f"  - {reason}" for reason in advice.reasons),
        "Next, to confirm:",
        *(f"  {step}" for step in advice.next_steps),
    ]
    return "\n".join(lines)


def gather_evidence(
    store_folder: str | Path, results_root: Path = DATA_ROOT / "results", sample_size: int = 64, device: str = "auto",
    offline: bool = False,
) -> Evidence:
    """Measure the evidence for a store: class sizes, classifier confidence and the tap profile."""
    from stages.finetune import FINETUNE_FILE
    from stages.similarity import measure_confidence, tap_depth_order

    store = FeatureStore(store_folder)
    settings = json.loads((store.folder / "settings.json").read_text())
    if "train" not in store.splits():
        raise ValueError(f"Store {store.name} has no train split: advice needs training images to count.")
    first_tap = next(iter(store.taps))
    _, labels = store.load("train", first_tap, view=0)
    counts = np.bincount(labels, minlength=len(store.class_names))
    images_per_class = {name: int(count) for name, count in zip(store.class_names, counts)}

    confidence = measure_confidence(store, settings, results_root / store.name, sample_size, device, offline)
    order = tap_depth_order(settings, list(store.taps), offline)
    tap_scores = read_tap_scores(results_root / store.name / "results.json", order)
    if not tap_scores:
        logger.warning("No stage-two results for %s under %s: run 'featcache heads --store %s' first.",
                       store.name, results_root, store.folder)
    return Evidence(
        store=str(store.folder),
        data=settings["dataset"]["source"],
        backbone=settings["backbone"],
        images_per_class=images_per_class,
        confidence=confidence.get("mean_max_softmax"),
        entropy=confidence.get("mean_normalized_entropy"),
        confidence_images=int(confidence.get("images", 0)),
        confidence_note=confidence.get("note", ""),
        top_categories=[tuple(item) for item in confidence.get("top_categories", [])],
        tap_scores=tap_scores,
        finetune_scores=read_finetune_scores(results_root / store.name / FINETUNE_FILE),
    )


def run_advice(
    store_folder: str | Path, results_root: Path = DATA_ROOT / "results", sample_size: int = 64, device: str = "auto",
    offline: bool = False,
) -> Advice:
    """Gather the evidence of a store, recommend a strategy, and save the advice next to its results."""
    evidence = gather_evidence(store_folder, results_root, sample_size, device, offline)
    advice = recommend(evidence)
    folder = results_root / Path(evidence.store).name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "advice.json").write_text(json.dumps(advice.to_dict(), indent=2))
    return advice
