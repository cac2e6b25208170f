"""Write the bench leaderboard as Markdown, CSV and JSON, and plot accuracy against images per second."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

LEADERBOARD_COLUMNS = (
    "backbone", "weights", "tap", "status", "images_per_second", "parameters", "gflops", "feature_dim",
    "store_bytes", "best_head", "val_accuracy", "test_accuracy", "eval_split", "reason",
)
MARKDOWN_HEADERS = (
    "backbone", "weights", "tap", "status", "images/s", "parameters (M)", "GFLOPs/image", "feature dim",
    "store (MB)", "best head", "val acc", "test acc", "eval split", "reason",
)


def _format_number(value: Any, scale: float = 1.0, digits: int = 2) -> str:
    if value is None or value == "":
        return ""
    return f"{value / scale:.{digits}f}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Render the rows as a Markdown table, fastest backbone first and skipped rows last."""
    ordered = sorted(rows, key=lambda row: (row["status"] != "ok", -(row.get("images_per_second") or 0.0)))
    lines = ["| " + " | ".join(MARKDOWN_HEADERS) + " |", "|" + "---|" * len(MARKDOWN_HEADERS)]
    for row in ordered:
        cells = [
            row["backbone"],
            row["weights"],
            row["tap"],
            row["status"],
            _format_number(row.get("images_per_second"), digits=1),
            _format_number(row.get("parameters"), scale=1e6),
            _format_number(row.get("gflops"), digits=3),
            str(row.get("feature_dim", "")),
            _format_number(row.get("store_bytes"), scale=1e6, digits=3),
            row.get("best_head", ""),
            _format_number(row.get("val_accuracy"), digits=3),
            _format_number(row.get("test_accuracy"), digits=3),
            row.get("eval_split", ""),
            row.get("reason", "").replace("|", "/"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_accuracy_vs_speed(rows: list[dict[str, Any]], path: Path) -> bool:
    """Plot test accuracy against images per second, one labelled point per measured row.

    Return False, writing no file, when no row has both figures.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    points = [row for row in rows if row["status"] == "ok" and row.get("images_per_second") and row.get("test_accuracy") is not None]
    if not points:
        return False
    figure, axes = plt.subplots(figsize=(7, 5))
    for row in points:
        marker = "x" if row["weights"] == "random" else "o"
        axes.scatter(row["images_per_second"], row["test_accuracy"], marker=marker)
        axes.annotate(f"{row['backbone']}@{row['weights']}:{row['tap']}", (row["images_per_second"], row["test_accuracy"]), fontsize=7)
    axes.set_xscale("log")
    axes.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axes.margins(x=0.3, y=0.1)  # room for the point labels
    axes.set_xlabel("extraction images per second (log scale)")
    axes.set_ylabel(f"test accuracy of the best head ({points[0]['eval_split']} split)")
    axes.set_title("Accuracy against extraction speed (x: random weights)")
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def write_leaderboard(rows: list[dict[str, Any]], folder: Path) -> dict[str, Path]:
    """Write leaderboard.md, leaderboard.csv, leaderboard.json and accuracy_vs_speed.png into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "markdown": folder / "leaderboard.md",
        "csv": folder / "leaderboard.csv",
        "json": folder / "leaderboard.json",
        "plot": folder / "accuracy_vs_speed.png",
    }
    paths["markdown"].write_text(markdown_table(rows) + "\n")
    paths["json"].write_text(json.dumps(rows, indent=2))
    with open(paths["csv"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=LEADERBOARD_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    if not plot_accuracy_vs_speed(rows, paths["plot"]):
        logger.warning("No backbone was measured, so %s was not written.", paths["plot"])
        del paths["plot"]
    logger.info("Wrote the leaderboard to %s", folder)
    return paths
