"""K MLP heads (learning rate x weight decay) trained together on one fold as one batched computation.

Each head starts from the initialization that ``MLPHead`` gets with the same seed, trains on the same
batch order and takes AdamW steps with its own learning rate and weight decay. The heads keep their
weights stacked in (K, D, H) and (K, H, C) tensors, so one batched matrix product replaces K and
the Python loop runs once per batch. The grid trains on the CPU. Dropout masks come from their own generator, so the heads
train like ``MLPHead`` but do not repeat its results bit for bit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from stages.adamw import StackedAdamW
from stages.batched import _summed_cross_entropy
from stages.heads import MLPHead, _Standardized, class_weights, standardization

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MLPSetting:
    """One head of the grid."""

    lr: float
    weight_decay: float


def train_mlp_grid(
    X: np.ndarray,
    y: np.ndarray,
    settings: list[MLPSetting],
    X_select: np.ndarray | None = None,
    y_select: np.ndarray | None = None,
    *,
    hidden: int = 512,
    dropout: float = 0.5,
    epochs: int = 100,
    batch_size: int = 256,
    patience: int = 10,
    seed: int = 0,
    class_weight: str | None = None,
) -> list[MLPHead]:
    """Train one MLPHead per setting on (X, y), all in one loop, and return them fitted, in settings order.

    With a selection split, each head keeps its epoch of best selection accuracy and stops after
    ``patience`` epochs without improvement, as ``MLPHead.fit(..., eval_set=...)`` does. The loop
    ends when every head has stopped.
    """
    X = np.asarray(X, dtype=np.float32)
    classes, targets = np.unique(np.asarray(y), return_inverse=True)
    labels = torch.as_tensor(targets)
    weight = class_weights(np.bincount(targets, minlength=len(classes)), class_weight)
    loss_weight = None if weight is None else torch.as_tensor(weight)
    mean, scale = standardization(X)

    # the same float32 operations as _Standardized.forward
    def standardized(values: np.ndarray) -> torch.Tensor:
        return (torch.as_tensor(np.asarray(values, dtype=np.float32)) - torch.as_tensor(mean)) / torch.as_tensor(scale)

    features = standardized(X)  # (N, D)
    select = None if X_select is None else standardized(X_select)  # (N_select, D)
    y_select = None if y_select is None else np.asarray(y_select)

    # stacked parameters, each head initialized as MLPHead does: its layers right after manual_seed
    template = MLPHead(hidden=hidden, dropout=dropout, seed=seed)
    initial = []
    for _ in settings:
        torch.default_generator.manual_seed(seed)  # the CPU generator, as in stages.batched
        body = template.build_body(X.shape[1], len(classes))
        initial.append([body[0].weight.detach().T, body[0].bias.detach(), body[3].weight.detach().T, body[3].bias.detach()])
    parameters = [torch.stack([head[part] for head in initial]).contiguous() for part in range(4)]  # W1, b1, W2, b2
    optimizer = StackedAdamW(parameters, [setting.lr for setting in settings], [setting.weight_decay for setting in settings])

    # per-head early stopping bookkeeping, indexed like settings
    best_score = np.full(len(settings), -1.0)
    best_epoch = np.zeros(len(settings), dtype=int)
    stale = np.zeros(len(settings), dtype=int)
    best = [[parameter[position].clone() for parameter in parameters] for position in range(len(settings))]

    order_generator = torch.Generator().manual_seed(seed)
    dropout_generator = torch.Generator().manual_seed(seed + 1)
    live = np.arange(len(settings))  # positions of the heads still training, in the order of the stacks
    for epoch in range(epochs):
        order = torch.randperm(len(labels), generator=order_generator)
        # one gather per epoch, after which every batch is a contiguous slice
        shuffled, shuffled_labels = features[order], labels[order]
        for start in range(0, len(order), batch_size):
            batch_labels = shuffled_labels[start : start + batch_size]
            for parameter in parameters:
                parameter.requires_grad_(True)
            W1, b1, W2, b2 = parameters
            hidden_values = torch.relu(torch.matmul(shuffled[start : start + batch_size], W1) + b1[:, None, :])  # (K, B, H)
            if dropout > 0:
                keep = torch.rand(hidden_values.shape, generator=dropout_generator) >= dropout
                hidden_values = hidden_values * keep / (1.0 - dropout)
            logits = torch.bmm(hidden_values, W2) + b2[:, None, :]  # (K, B, C)
            # summing the per-head mean cross-entropies gives each head the gradient of its own loss
            loss = _summed_cross_entropy(logits.permute(0, 2, 1), batch_labels, loss_weight)
            grads = torch.autograd.grad(loss, parameters)
            for parameter in parameters:
                parameter.requires_grad_(False)
            optimizer.step(grads)

        if select is None:
            continue
        with torch.no_grad():
            W1, b1, W2, b2 = parameters
            logits = torch.bmm(torch.relu(torch.matmul(select, W1) + b1[:, None, :]), W2) + b2[:, None, :]  # (K, N_select, C)
        accuracy = (classes[logits.argmax(dim=2).numpy()] == y_select[None, :]).mean(axis=1)  # (K,)
        for row, position in enumerate(live):
            if accuracy[row] > best_score[position]:
                best_score[position], best_epoch[position], stale[position] = accuracy[row], epoch, 0
                best[position] = [parameter[row].clone() for parameter in parameters]
            else:
                stale[position] += 1

        # drop the heads that stopped from the stacks, so that they cost nothing more
        keep_rows = np.flatnonzero(stale[live] < patience)
        if len(keep_rows) == 0:
            break
        if len(keep_rows) < len(live):
            parameters = optimizer.keep(keep_rows.tolist())
            live = live[keep_rows]

    # unpack each head into an MLPHead with the weights of its best epoch (its last without selection)
    heads = []
    for position, setting in enumerate(settings):
        head = MLPHead(hidden=hidden, dropout=dropout, lr=setting.lr, weight_decay=setting.weight_decay, epochs=epochs,
                       batch_size=batch_size, patience=patience, seed=seed, class_weight=class_weight)
        body = head.build_body(X.shape[1], len(classes))
        # without selection no head stops, so the stacks still hold every head in settings order
        chosen = best[position] if select is not None else [parameter[position] for parameter in parameters]
        with torch.no_grad():
            body[0].weight.copy_(chosen[0].T)
            body[0].bias.copy_(chosen[1])
            body[3].weight.copy_(chosen[2].T)
            body[3].bias.copy_(chosen[3])
        head.classes_ = classes
        head.module_ = _Standardized(body, mean, scale).eval()
        head.best_epoch_ = int(best_epoch[position]) if select is not None else epoch
        heads.append(head)
    return heads
