"""Fine-tuning baseline: train the backbone itself, on the same splits and metrics as the heads.

The backbone's classifier is replaced by a new linear layer for the dataset's classes, the last N
blocks (or all layers, or a randomly initialized network) are unfrozen, and training runs with an
augmentation policy and early stopping on val. Each run writes one row with the keys of the
stage-two results to ``finetune.json`` next to the heads' ``results.json``. Its ``tap`` is
``finetune:last-N``, ``finetune:all`` or ``finetune:scratch`` and its ``head`` is ``finetune``, so
one leaderboard compares a frozen base plus head with fine-tuning.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score
from sklearn.model_selection import train_test_split
from torch import nn
from tqdm.auto import tqdm

from pipeline.augment import build_augment_transform, get_policy
from pipeline.backbones import RANDOM_WEIGHTS, Backbone, build_backbone, resolve_device
from pipeline.cachekey import dataset_fingerprint
from pipeline.datasets import Dataset, load_dataset
from pipeline.images import ImageFileDataset, build_transform, collate_items
from pipeline.memory import keep_heap
from pipeline.settings import DATA_ROOT, DatasetSettings, SettingsError, settings_to_dict
from pipeline.store import FeatureStore
from stages.metrics import bootstrap_interval, classification_metrics
from stages.train_heads import check_results_folder

logger = logging.getLogger(__name__)

FINETUNE_FILE = "finetune.json"
UNFREEZE_ALL = "all"


@dataclass(frozen=True)
class FinetuneSettings:
    """Fine-tuning baseline: which network, which layers train, and how long."""

    # Store whose dataset, split and backbone are reused; its folder name names the results folder.
    store: str | None = None
    # Dataset and backbone when no store is given.
    dataset: DatasetSettings = field(default_factory=DatasetSettings)
    backbone: str = "efficientnet_lite0"
    weights: str = "default"
    checkpoint: str | None = None
    # Blocks to unfreeze, counted from the top ("1", "2", ...), or "all" for every layer.
    unfreeze: str = "1"
    # Start from random weights and train every layer (the no-pretraining control).
    from_scratch: bool = False
    # Augmentation policy of the training images; "none" trains on the evaluation transform.
    augment: str = "light"
    # Passes over the training images at most.
    epochs: int = 10
    # Epochs without a better val accuracy before training stops.
    patience: int = 3
    # Learning rate of the new classifier; the unfrozen pretrained layers use lr * backbone_lr_scale.
    lr: float = 1e-3
    backbone_lr_scale: float = 0.1
    weight_decay: float = 1e-4
    # Images per optimizer step.
    batch_size: int = 16
    # Data-loading worker processes; 0 decodes in the main process.
    workers: int = 2
    # "cpu", "cuda", "cuda:N" or "auto" (a GPU when there is one).
    device: str = "auto"
    # Seed of the classifier initialization, augmentation and batch order.
    seed: int = 0
    # Folder that contains the results of each store.
    output_root: str = str(DATA_ROOT / "results")
    offline: bool = False

    def unfrozen_blocks(self) -> int | None:
        """Return N of "last N blocks", or None when every layer trains."""
        if self.from_scratch or self.unfreeze == UNFREEZE_ALL:
            return None
        return int(self.unfreeze)

    def validate(self) -> None:
        if self.unfreeze != UNFREEZE_ALL and not (self.unfreeze.isdigit() and int(self.unfreeze) >= 1):
            raise SettingsError(f"unfreeze={self.unfreeze!r} is invalid: use a number of blocks (1, 2, ...) or 'all'.")
        if self.augment != "none":
            get_policy(self.augment)
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name}={getattr(self, name)} is invalid: use a positive integer.")
        if self.patience < 1:
            raise SettingsError(f"patience={self.patience} is invalid: use 1 or more epochs.")
        if self.workers < 0:
            raise SettingsError(f"workers={self.workers} is invalid: use 0 or more.")
        for name in ("lr", "backbone_lr_scale"):
            if not getattr(self, name) > 0:
                raise SettingsError(f"{name}={getattr(self, name)} is invalid: use a positive number.")
        if not self.weight_decay >= 0:
            raise SettingsError(f"weight_decay={self.weight_decay} is invalid: use 0 or a positive number.")

    def label(self) -> str:
        """Return the results row's tap: finetune:last-N, finetune:all or finetune:scratch."""
        if self.from_scratch:
            return "finetune:scratch"
        blocks = self.unfrozen_blocks()
        return "finetune:all" if blocks is None else f"finetune:last-{blocks}"


def resolve_blocks(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """Return (blocks in forward order, head layers that train together with the last block)."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.Sequential) and hasattr(model, "conv_head"):
        # timm EfficientNet and MobileNet: conv_head and bn2 sit between the last block and the pooling
        return list(blocks), [model.conv_head, getattr(model, "bn2", nn.Identity())]
    if all(isinstance(getattr(model, f"layer{stage}", None), nn.Module) for stage in range(1, 5)):
        return [model.layer1, model.layer2, model.layer3, model.layer4], []  # torchvision and timm ResNets
    raise SettingsError(
        f"Cannot find the blocks of a {type(model).__name__}: '--unfreeze N' supports timm EfficientNet and "
        "MobileNet models (model.blocks with conv_head) and ResNets (layer1..layer4). "
        "Use '--unfreeze all' or '--from-scratch' for this backbone."
    )


def replace_classifier(backbone: Backbone, class_count: int) -> nn.Linear:
    """Put a new linear classifier for ``class_count`` classes in place of the backbone's own."""
    if not backbone.classifier_name:
        raise SettingsError(f"{backbone.name} has no final linear classifier to replace: pick another backbone.")
    old = backbone.model.get_submodule(backbone.classifier_name)
    new = nn.Linear(old.in_features, class_count)
    backbone.model.set_submodule(backbone.classifier_name, new)
    return new


def prepare_trainable(backbone: Backbone, settings: FinetuneSettings, class_count: int) -> tuple[list[nn.Module], list[dict]]:
    """Replace the classifier, unfreeze the chosen layers, and return (training modules, optimizer groups)."""
    model = backbone.model
    classifier = replace_classifier(backbone, class_count)
    blocks = settings.unfrozen_blocks()
    if blocks is None:
        trainable = [model]
    else:
        all_blocks, head_layers = resolve_blocks(model)
        if blocks > len(all_blocks):
            raise SettingsError(
                f"unfreeze={blocks} is invalid: {backbone.name} has {len(all_blocks)} blocks. "
                "Use a smaller number or 'all'."
            )
        trainable = [*all_blocks[-blocks:], *head_layers, classifier]
    for module in trainable:
        for parameter in module.parameters():
            parameter.requires_grad_(True)

    classifier_ids = {id(parameter) for parameter in classifier.parameters()}
    body = [parameter for parameter in model.parameters() if parameter.requires_grad and id(parameter) not in classifier_ids]
    body_lr = settings.lr if settings.from_scratch else settings.lr * settings.backbone_lr_scale
    groups = [{"params": list(classifier.parameters()), "lr": settings.lr}]
    if body:
        groups.append({"params": body, "lr": body_lr})
    return trainable, groups


def set_training_mode(model: nn.Module, trainable: list[nn.Module]) -> None:
    """Train only the unfrozen modules, so frozen batch-norm layers keep their pretrained statistics."""
    model.eval()
    for module in trainable:
        module.train()


def split_indices(dataset: Dataset, seed: int) -> tuple[dict[str, list[int]], str, str, list[str]]:
    """Return (indices of train, select and eval, select split name, eval split name, notes), as the heads pick them."""
    by_split = {split: [i for i, sample in enumerate(dataset.samples) if sample.split == split] for split in ("train", "val", "test")}
    if not by_split["train"]:
        raise SettingsError(f"Dataset {dataset.root} has no training images: fine-tuning needs a train split.")
    notes = []
    train = by_split["train"]
    if by_split["val"]:
        select, select_split = by_split["val"], "val"
    else:
        labels = [dataset.samples[index].label for index in train]
        train, select = train_test_split(train, test_size=0.2, stratify=labels, random_state=seed)
        select_split = "train-holdout"
        notes.append("no val split: selected on a stratified 20% holdout of train")
    if by_split["test"]:
        evaluate, eval_split = by_split["test"], "test"
    else:
        evaluate, eval_split = select, select_split
        notes.append(f"no test split: the reported accuracy is on {select_split}, which also selected the epoch")
    return {"train": list(train), "select": list(select), "eval": list(evaluate)}, select_split, eval_split, notes


class _Loaders:
    """Data loaders of one fine-tuning run; unreadable files are skipped and reported once."""

    def __init__(self, dataset: Dataset, backbone: Backbone, settings: FinetuneSettings, device: torch.device) -> None:
        self.dataset = dataset
        self.settings = settings
        self.device = device
        self.evaluation = build_transform(backbone.preprocessing)
        policy = None if settings.augment == "none" else get_policy(settings.augment)
        self.training = build_augment_transform(backbone.preprocessing, policy) if policy else self.evaluation
        self.reported: set[int] = set()

    def batches(self, indices: list[int], train: bool, generator: torch.Generator | None = None):
        """Yield (images (B, 3, H, W), labels (B,)) on the device."""
        loader = torch.utils.data.DataLoader(
            ImageFileDataset(self.dataset.root, self.dataset.samples, self.training if train else self.evaluation, indices),
            batch_size=self.settings.batch_size,
            shuffle=train,
            generator=generator,
            num_workers=self.settings.workers,
            collate_fn=collate_items,
        )
        for batch in loader:
            for index, reason in batch.failures:
                if index not in self.reported:
                    self.reported.add(index)
                    logger.warning("Skipping %s: %s", self.dataset.samples[index].path, reason)
            if batch.images is None:
                continue
            labels = torch.tensor([self.dataset.samples[index].label for index in batch.indices], device=self.device)
            yield batch.images.to(self.device), labels


def predict(model: nn.Module, loaders: _Loaders, indices: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Return (true labels, predicted labels) of some samples with the evaluation transform."""
    truth, probabilities = predict_proba(model, loaders, indices)
    return truth, probabilities.argmax(axis=1)


def predict_proba(model: nn.Module, loaders: _Loaders, indices: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Return (true labels (n,), class probabilities (n, C)) of some samples with the evaluation transform."""
    model.eval()
    truth, probabilities = [], []
    with torch.inference_mode():
        for images, labels in loaders.batches(indices, train=False):
            probabilities.append(torch.softmax(model(images).float(), dim=1).cpu().numpy())
            truth.append(labels.cpu().numpy())
    if not truth:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    return np.concatenate(truth), np.concatenate(probabilities)


def resolve_source(settings: FinetuneSettings) -> tuple[DatasetSettings, str, str, str | None, str, FeatureStore | None]:
    """Return (dataset settings, backbone, weights, checkpoint, results folder name, store) of a run."""
    if settings.store is None:
        name = f"{Path(settings.dataset.source).name}-{settings.backbone}-finetune"
        return settings.dataset, settings.backbone, settings.weights, settings.checkpoint, name, None
    store = FeatureStore(settings.store)
    stored = json.loads((store.folder / "settings.json").read_text())
    dataset_settings = DatasetSettings(**stored["dataset"])
    return dataset_settings, stored["backbone"], stored["weights"], stored.get("checkpoint"), store.name, store


def run_finetune(settings: FinetuneSettings) -> dict[str, Any]:
    """Fine-tune, select the epoch on val, evaluate like the heads, and write the results row."""
    settings.validate()
    started = time.perf_counter()
    dataset_settings, backbone_name, weights, checkpoint, results_name, store = resolve_source(settings)
    check_results_folder(Path(settings.output_root) / results_name)
    # the row records the dataset and backbone that were used, which a store decides
    settings = replace(settings, dataset=dataset_settings, backbone=backbone_name, weights=weights, checkpoint=checkpoint)
    dataset = load_dataset(dataset_settings)
    if store is not None and store.manifest["key_fields"]["dataset"]["files_sha256"] != dataset_fingerprint(dataset):
        logger.warning(
            "The files of %s changed since store %s was extracted: the splits may differ from the heads' splits.",
            dataset.root, store.name,
        )

    # network: new classifier, chosen layers unfrozen
    keep_heap()  # each step's activations and gradients reuse the heap instead of faulting in again
    torch.manual_seed(settings.seed)
    backbone = build_backbone(
        backbone_name, RANDOM_WEIGHTS if settings.from_scratch else weights,
        None if settings.from_scratch else checkpoint, settings.offline,
    )
    trainable, groups = prepare_trainable(backbone, settings, len(dataset.class_names))
    device = resolve_device(settings.device)
    model = backbone.model.to(device)
    optimizer = torch.optim.AdamW(groups, weight_decay=settings.weight_decay)
    loss_function = nn.CrossEntropyLoss()

    indices, select_split, eval_split, notes = split_indices(dataset, settings.seed)
    for note in notes:
        logger.warning("%s", note)
    loaders = _Loaders(dataset, backbone, settings, device)
    generator = torch.Generator().manual_seed(settings.seed)
    trained = sum(parameter.numel() for group in groups for parameter in group["params"])
    logger.info(
        "Fine-tuning %s (%s, %d trainable parameters) on %d train images, selecting on %s, on %s",
        backbone.name, settings.label(), trained, len(indices["train"]), select_split, device,
    )

    # train with early stopping on the selection split
    best_score, best_state, best_epoch, stale = -1.0, None, 0, 0
    for epoch in range(settings.epochs):
        set_training_mode(model, trainable)
        total_loss, seen = 0.0, 0
        batches = loaders.batches(indices["train"], train=True, generator=generator)
        for images, labels in tqdm(batches, desc=f"finetune epoch {epoch + 1}", unit="batch", dynamic_ncols=True):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_function(model(images), labels)  # logits (B, classes)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(labels)
            seen += len(labels)
        truth, predicted = predict(model, loaders, indices["select"])
        score = float(accuracy_score(truth, predicted))
        logger.info("epoch %d: train loss %.4f, %s accuracy %.4f", epoch + 1, total_loss / max(seen, 1), select_split, score)
        if score > best_score:
            best_score, best_state, best_epoch, stale = score, copy.deepcopy(model.state_dict()), epoch, 0
        else:
            stale += 1
            if stale >= settings.patience:
                logger.info("Stopping early: no better %s accuracy for %d epochs", select_split, stale)
                break
    model.load_state_dict(best_state)

    # evaluate like the heads: train accuracy, selection accuracy, and the evaluation split
    train_truth, train_predicted = predict(model, loaders, indices["train"])
    eval_truth, eval_probabilities = predict_proba(model, loaders, indices["eval"])
    eval_predicted = eval_probabilities.argmax(axis=1)
    interval = bootstrap_interval(eval_truth, [eval_predicted], seed=settings.seed)
    folder = Path(settings.output_root) / results_name
    row = {
        "tap": settings.label(),
        "head": "finetune",
        "selected": {"epoch": best_epoch + 1, "lr": settings.lr, "augment": settings.augment},
        "select_split": select_split,
        "train_accuracy": float(accuracy_score(train_truth, train_predicted)),
        "select_accuracy": best_score,
        "val_accuracy": best_score,
        "eval_split": eval_split,
        "accuracy": float(accuracy_score(eval_truth, eval_predicted)),
        "ci_low": interval["ci_low"],
        "ci_high": interval["ci_high"],
        "balanced_accuracy": float(balanced_accuracy_score(eval_truth, eval_predicted)),
        "metrics": classification_metrics(eval_truth, eval_probabilities, np.arange(len(dataset.class_names))),
        "notes": notes,
        "seconds": time.perf_counter() - started,
        "device": str(device),
        "model_file": str(save_model(model, folder, settings.label())),
        "settings": settings_to_dict(settings),
    }
    write_finetune_row(row, folder)
    return row


def save_model(model: nn.Module, folder: Path, label: str) -> Path:
    path = folder / "finetune" / f"{label.replace(':', '-')}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def write_finetune_row(row: dict[str, Any], folder: Path) -> None:
    """Add a row to finetune.json, replacing an earlier row of the same tap."""
    path = folder / FINETUNE_FILE
    rows = json.loads(path.read_text())["results"] if path.is_file() else []
    rows = [item for item in rows if item["tap"] != row["tap"]] + [row]
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"results": rows}, indent=2))
    logger.info("Wrote the fine-tuning result to %s", path)


def leaderboard_rows(folder: Path) -> list[dict[str, Any]]:
    """Return the heads' rows and the fine-tuning rows of one results folder, best val accuracy first."""
    rows = []
    for name in ("results.json", FINETUNE_FILE):
        path = folder / name
        if path.is_file():
            rows += json.loads(path.read_text()).get("results", [])
    return sorted(rows, key=lambda row: -row["val_accuracy"])
