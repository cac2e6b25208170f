"""Reports of stage two: Markdown and CSV leaderboards, a JSON of all results, and PNG plots."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from pipeline.store import write_json_atomic

logger = logging.getLogger(__name__)

LEADERBOARD_COLUMNS = (
    "rank", "tap", "head", "control", "selected", "select_split", "select_accuracy", "train_accuracy", "eval_split",
    "accuracy", "ci_low", "ci_high", "seeds", "balanced_accuracy", "macro_f1", "top5_accuracy", "log_loss",
)
DIGEST_FILE = "report-digest.txt"


def ranked(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return the results sorted by selection accuracy, best first, each with its rank and flat metric columns.

    The ranking uses the selection split (val, or cross-validation inside train), never the
    evaluation split: choosing the best tap and head by test accuracy would select on test.
    """
    rows = []
    order = sorted(results, key=lambda item: (-item["select_accuracy"], item["tap"], item["head"]))
    for rank, result in enumerate(order, start=1):
        # fine-tuning rows written before they carried metrics have only their balanced accuracy
        metrics = result.get("metrics") or {"balanced_accuracy": result.get("balanced_accuracy", "")}
        rows.append({
            **result,
            "rank": rank,
            "control": result.get("control") or "",
            "balanced_accuracy": metrics["balanced_accuracy"],
            "macro_f1": metrics.get("macro_f1", ""),
            "top5_accuracy": metrics.get("top5_accuracy", ""),
            "log_loss": metrics.get("log_loss", ""),
        })
    return rows


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def format_table(results: list[dict[str, Any]]) -> str:
    """Render the leaderboard as an aligned text table for the terminal."""
    header = ["rank", "tap", "head", "control", "selected", "select acc", "train acc", "eval split", "accuracy (95% CI)", "balanced acc"]
    def accuracy(row: dict[str, Any]) -> str:
        interval = f" [{row['ci_low']:.3f}, {row['ci_high']:.3f}]" if "ci_low" in row else ""
        return f"{row['accuracy']:.3f}{interval}"

    lines = [
        [str(row["rank"]), row["tap"], row["head"], row["control"], format_value(row["selected"]),
         f"{row['select_accuracy']:.3f}", f"{row['train_accuracy']:.3f}", row["eval_split"], accuracy(row),
         format_value(row["balanced_accuracy"]) if row["balanced_accuracy"] == "" else f"{row['balanced_accuracy']:.3f}"]
        for row in ranked(results)
    ]
    widths = [max(len(str(item)) for item in column) for column in zip(header, *lines)]

    def render(items: list[str]) -> str:
        return "  ".join(str(item).ljust(width) for item, width in zip(items, widths)).rstrip()

    return "\n".join([render(header), render(["-" * width for width in widths]), *map(render, lines)])


def write_reports(results: list[dict[str, Any]], warnings: list[str], folder: Path, header: dict[str, Any]) -> bool:
    """Write the leaderboards, results.json, warnings and plots into ``folder``. Return False when they were current.

    The reports are rewritten only when the set of results or the warnings changed, so a rerun with
    nothing to train does not pay for matplotlib.
    """
    folder.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(json.dumps([sorted(result["key"] for result in results), warnings, header],
                                       sort_keys=True).encode()).hexdigest()
    digest_path = folder / DIGEST_FILE
    if digest_path.is_file() and digest_path.read_text().strip() == digest:
        return False

    rows = ranked(results)
    write_json_atomic(folder / "results.json", {**header, "warnings": warnings, "results": rows})
    write_csv(rows, folder / "leaderboard.csv")
    (folder / "leaderboard.md").write_text(markdown(rows, warnings, header), encoding="utf-8")
    plot_accuracy_per_tap(rows, folder / "accuracy-per-tap.png", header.get("taps", []))
    plot_confusion(rows, folder / "confusion-best.png", header.get("class_names", []))
    digest_path.write_text(digest + "\n")
    logger.info("Wrote leaderboard.md, leaderboard.csv, results.json and plots to %s", folder)
    return True


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(LEADERBOARD_COLUMNS)
        for row in rows:
            writer.writerow([json.dumps(row[column], sort_keys=True) if column == "selected" else row[column]
                             for column in LEADERBOARD_COLUMNS])


def markdown(rows: list[dict[str, Any]], warnings: list[str], header: dict[str, Any]) -> str:
    lines = [
        f"# Leaderboard of store `{header.get('store_name', '')}`",
        "",
        f"Store key `{header.get('store_key', '')[:12]}`. Hyperparameters were selected on the selection split "
        "named in each row; accuracy is measured once, on the evaluation split, for the selected setting. "
        "The interval is a 95% bootstrap interval over the evaluated samples.",
        "",
        "| rank | tap | head | control | selected | select split | select acc | train acc | eval split | accuracy | 95% CI "
        "| balanced acc | macro F1 | top-5 | log loss |",
        "|---:|---|---|---|---|---|---:|---:|---|---:|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        top5 = row["top5_accuracy"]
        lines.append(
            f"| {row['rank']} | {row['tap']} | {row['head']} | {row['control']} | `{format_value(row['selected'])}` | "
            f"{row['select_split']} | {row['select_accuracy']:.3f} | {row['train_accuracy']:.3f} | {row['eval_split']} | "
            f"{row['accuracy']:.3f} | [{row['ci_low']:.3f}, {row['ci_high']:.3f}] | {row['balanced_accuracy']:.3f} | "
            f"{row['macro_f1']:.3f} | {'' if top5 == '' else f'{top5:.3f}'} | {row['log_loss']:.3f} |"
        )
    lines += ["", "## Warnings", ""]
    lines += [f"- {warning}" for warning in warnings] or ["None."]
    notes = sorted({note for row in rows for note in row.get("notes", [])})
    if notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in notes]
    lines += ["", "Plots: `accuracy-per-tap.png`, `confusion-best.png`.", ""]
    return "\n".join(lines)


def plot_accuracy_per_tap(rows: list[dict[str, Any]], path: Path, taps: list[str]) -> None:
    """Plot the accuracy of each head against the tap, with its 95% interval, and each control as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    pretrained = [row for row in rows if not row["control"]]
    order = [tap for tap in taps if any(row["tap"] == tap for row in pretrained)]
    for head in sorted({row["head"] for row in pretrained}):
        points = sorted((order.index(row["tap"]), row) for row in pretrained if row["head"] == head and row["tap"] in order)
        if not points:
            continue
        xs = [x for x, _ in points]
        ys = [row["accuracy"] for _, row in points]
        errors = [[row["accuracy"] - row["ci_low"] for _, row in points], [row["ci_high"] - row["accuracy"] for _, row in points]]
        axes.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=head)
    for row in rows:
        if row["control"]:
            axes.axhline(row["accuracy"], linestyle="--", linewidth=1, color="grey")
            axes.annotate(f"{row['control']}: {row['head']} on {row['tap']}", (0, row["accuracy"]), fontsize=7, color="grey")
    axes.set_xticks(range(len(order)), order, rotation=30, ha="right")
    axes.set_xlabel("tap")
    axes.set_ylabel("accuracy")
    axes.set_ylim(0, 1.02)
    axes.set_title("Accuracy per tap")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_confusion(rows: list[dict[str, Any]], path: Path, class_names: list[str]) -> None:
    """Plot the confusion matrix of the best head that is not a control."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    candidates = [row for row in rows if not row["control"]] or rows
    if not candidates:
        return
    best = candidates[0]
    matrix = np.asarray(best["metrics"]["confusion_matrix"])
    labels = best["metrics"]["confusion_labels"]
    names = [class_names[label] if isinstance(label, int) and label < len(class_names) else str(label) for label in labels]
    figure, axes = plt.subplots(figsize=(1.2 + 0.45 * len(names), 1 + 0.45 * len(names)))
    image = axes.imshow(matrix, cmap="Blues")
    for (row, column), count in np.ndenumerate(matrix):
        axes.text(column, row, str(count), ha="center", va="center", fontsize=7)
    axes.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
    axes.set_yticks(range(len(names)), names, fontsize=7)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(f"{best['head']} on {best['tap']} ({best['eval_split']})", fontsize=9)
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
