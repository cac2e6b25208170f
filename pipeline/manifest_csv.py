"""CSV manifests: a dataset listed as ``path,label[,split]`` rows instead of class folders.

Paths are relative to the CSV file's folder, and absolute paths are accepted too. With a split
column, every row names train, val or test, and the class-to-index map comes from the train rows.
Without one, each class gets the seeded stratified split of a folder without split folders. Every
error names the CSV file and the row number, counting the header as row 1.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from pipeline.datasets import SPLITS, Dataset, Sample, seeded_split, sorted_samples
from pipeline.settings import DatasetSettings

logger = logging.getLogger(__name__)

HEADERS = (["path", "label"], ["path", "label", "split"])


class ManifestError(ValueError):
    """A CSV manifest is malformed; the message names the file and the row."""


def _read_rows(csv_path: Path) -> tuple[bool, list[tuple[int, list[str]]]]:
    """Return whether the CSV has a split column, and its non-blank data rows with their row numbers."""
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        raise ManifestError(f"CSV manifest {csv_path} is empty: start it with the header 'path,label[,split]'.")
    header = [cell.strip().lower() for cell in rows[0]]
    if header not in HEADERS:
        raise ManifestError(
            f"CSV manifest {csv_path} row 1: the header is {rows[0]}, expected 'path,label' or 'path,label,split'."
        )
    width = len(header)
    data = []
    for number, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != width:
            raise ManifestError(
                f"CSV manifest {csv_path} row {number}: {len(row)} columns, expected {width} ({','.join(header)})."
            )
        data.append((number, [cell.strip() for cell in row]))
    if not data:
        raise ManifestError(f"CSV manifest {csv_path} lists no images: add one 'path,label[,split]' row per image.")
    return width == 3, data


def read_csv_manifest(csv_path: Path, settings: DatasetSettings) -> Dataset:
    """Index the images a CSV manifest lists, checking every row before any image is read."""
    csv_path = Path(csv_path)
    root = csv_path.parent
    has_split, rows = _read_rows(csv_path)

    # rows: every path present, not listed twice, with a label and a known split
    entries: list[tuple[int, str, str, str | None]] = []
    first_row_of: dict[Path, int] = {}
    for number, cells in rows:
        path_text, label = cells[0], cells[1]
        split = cells[2].lower() if has_split else None
        where = f"CSV manifest {csv_path} row {number}"
        if not path_text:
            raise ManifestError(f"{where}: the path is empty.")
        if not label:
            raise ManifestError(f"{where}: the label of {path_text} is empty.")
        if has_split and split not in SPLITS:
            raise ManifestError(f"{where}: split {cells[2]!r} is invalid, use one of {list(SPLITS)}.")
        resolved = (root / path_text).resolve()
        if not resolved.is_file():
            raise ManifestError(f"{where}: image {path_text} not found at {resolved}.")
        if resolved in first_row_of:
            raise ManifestError(f"{where}: {path_text} is already listed in row {first_row_of[resolved]}.")
        first_row_of[resolved] = number
        entries.append((number, Path(path_text).as_posix(), label, split))

    # class-to-index map: from train rows when there is a split column, applied to every split by name
    if has_split:
        class_names = sorted({label for _, _, label, split in entries if split == "train"})
        if not class_names:
            raise ManifestError(f"CSV manifest {csv_path} has no train rows: every class needs training images.")
        for number, path_text, label, split in entries:
            if label not in class_names:
                raise ManifestError(
                    f"CSV manifest {csv_path} row {number}: class {label!r} appears in {split} but has no train rows: "
                    "every class needs training images."
                )
        index = {name: position for position, name in enumerate(class_names)}
        samples = [Sample(path_text, index[label], split) for _, path_text, label, split in entries]
        source = "csv"
    else:
        class_names = sorted({label for _, _, label, _ in entries})
        samples = []
        for label_index, name in enumerate(class_names):
            members = sorted(path_text for _, path_text, label, _ in entries if label == name)
            seed = settings.split_seed * 1_000_003 + label_index
            splits = seeded_split(len(members), settings.val_fraction, settings.test_fraction, seed)
            samples += [Sample(path_text, label_index, split) for path_text, split in zip(members, splits)]
        source = "seeded"

    logger.info("CSV manifest %s: %d images in %d classes", csv_path, len(samples), len(class_names))
    return Dataset(csv_path.stem, root, class_names, sorted_samples(samples), source)
