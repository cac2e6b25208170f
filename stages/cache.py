"""Result keys, the results manifest, and head files that are verified by SHA-256 before loading.

A result is keyed by the store's key and everything that changes it: the head, the tap or control,
the search space, the fixed head settings, the selection protocol and the seeds. Rerunning stage
two finds finished results by key and trains only the missing ones. This module imports neither
torch nor scikit-learn, so that a rerun with nothing to train stays fast.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from pipeline.store import file_sha256, write_json_atomic

logger = logging.getLogger(__name__)

# Bump when a result's meaning changes for the same settings, so that old results are retrained.
RESULT_VERSION = 1
MANIFEST = "manifest.json"


class HeadFileError(RuntimeError):
    """A saved head file is missing or does not match the SHA-256 recorded in the results manifest."""

    def __init__(self, problem: str) -> None:
        super().__init__(f"{problem}. Rerun 'featcache heads', which trains it again.")
        self.problem = problem


def result_key(store_key: str, unit: dict[str, Any]) -> str:
    """Hash the store key and a unit's full settings into the key of its result."""
    payload = {"version": RESULT_VERSION, "store_key": store_key, **unit}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class ResultsIndex:
    """The results folder of one store: ``manifest.json``, ``results/<key>.json`` and ``heads/<key>.*``."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        self.manifest: dict[str, Any] = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"results": {}}

    def result_path(self, key: str) -> Path:
        return self.folder / "results" / f"{key}.json"

    def cached(self, key: str) -> dict[str, Any] | None:
        """Return the stored result of ``key``, or None when it is missing or its head file fails verification."""
        entry = self.manifest["results"].get(key)
        if entry is None or not self.result_path(key).is_file():
            return None
        head_file = entry.get("head_file")
        if head_file:
            try:
                verify_head_file(self.folder / head_file, entry["head_sha256"])
            except HeadFileError as error:
                logger.warning("%s: training result %s again.", error.problem, key[:12])
                return None
        return json.loads(self.result_path(key).read_text(encoding="utf-8"))

    def record(self, key: str, result: dict[str, Any], head: Any | None) -> dict[str, Any]:
        """Save a result, and its head when given, then add both to the manifest with the head's SHA-256."""
        entry: dict[str, Any] = {"tap": result["tap"], "head": result["head"], "control": result.get("control")}
        if head is not None:
            path = save_head(head, self.folder / "heads", key)
            entry["head_file"] = path.relative_to(self.folder).as_posix()
            entry["head_sha256"] = file_sha256(path)
            result = {**result, "head_file": entry["head_file"], "head_sha256": entry["head_sha256"]}
        self.result_path(key).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.result_path(key), result)
        self.manifest["results"][key] = entry
        write_json_atomic(self.folder / MANIFEST, self.manifest)
        return result


def save_head(head: Any, folder: Path, key: str) -> Path:
    """Write a head: torch heads as a state_dict file, the others with joblib. Return the path."""
    from stages.heads import TorchHead

    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(head, TorchHead):
        import torch

        path = folder / f"{key}.pt"
        payload = {
            "class": type(head).__name__,
            "params": head.get_params(),
            "classes": head.classes_.tolist(),
            "state_dict": head.module_.state_dict(),
        }
        torch.save(payload, path)
        return path
    import joblib

    path = folder / f"{key}.joblib"
    joblib.dump(head, path)
    return path


def verify_head_file(path: Path, expected_sha256: str) -> None:
    """Raise HeadFileError unless ``path`` exists and its SHA-256 equals ``expected_sha256``."""
    if not Path(path).is_file():
        raise HeadFileError(f"Head file {path} is missing")
    actual = file_sha256(Path(path))
    if actual != expected_sha256:
        raise HeadFileError(
            f"Head file {path} has SHA-256 {actual[:16]}..., but the results manifest records "
            f"{expected_sha256[:16]}...: it was changed after training and is not loaded"
        )


def load_head(path: Path, expected_sha256: str) -> Any:
    """Load a saved head after checking its SHA-256, so that a changed file is never unpickled.

    Torch head files are read with ``torch.load(..., weights_only=True)``. joblib files are pickles
    and are loaded only after the hash matches.
    """
    path = Path(path)
    verify_head_file(path, expected_sha256)
    if path.suffix != ".pt":
        import joblib

        return joblib.load(path)

    import numpy as np
    import torch

    from stages.heads import HEAD_CLASSES, _Standardized

    payload = torch.load(path, map_location="cpu", weights_only=True)
    head_classes = {head_class.__name__: head_class for head_class in HEAD_CLASSES.values()}
    head = head_classes[payload["class"]](**payload["params"])
    head.classes_ = np.asarray(payload["classes"])
    state = payload["state_dict"]
    n_features = state["mean"].shape[0]
    head.module_ = _Standardized(head.build_body(n_features, len(head.classes_)), state["mean"], state["scale"])
    head.module_.load_state_dict(state)
    head.module_.eval()
    return head
