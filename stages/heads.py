"""Heads: lightweight classifiers trained on cached features, following the scikit-learn contract.

Each head's ``__init__`` only stores its keyword arguments, ``fit(X, y)`` returns ``self``, learned
state ends in ``_``, and ``predict`` / ``predict_proba`` raise ``NotFittedError`` before ``fit``.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.utils.validation import check_is_fitted
from torch import nn

from pipeline.settings import SettingsError
from stages.adamw import AdamW
from stages.knn import KNNHead

logger = logging.getLogger(__name__)


class LogisticRegressionHead(ClassifierMixin, BaseEstimator):
    """Multinomial logistic regression on standardized features (scikit-learn, L-BFGS)."""

    def __init__(self, *, C: float = 1.0, max_iter: int = 1000, class_weight: str | None = None) -> None:
        self.C = C
        self.max_iter = max_iter
        self.class_weight = class_weight

    def fit(self, X: np.ndarray, y: np.ndarray, eval_set=None) -> "LogisticRegressionHead":
        self.pipeline_ = make_pipeline(
            Standardizer(), LogisticRegression(C=self.C, max_iter=self.max_iter, class_weight=self.class_weight)
        )
        self.pipeline_.fit(X, y)
        self.classes_ = self.pipeline_.classes_
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self, "pipeline_")
        return self.pipeline_.predict_proba(X)

    def predict(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self, "pipeline_")
        return self.pipeline_.predict(X)


class Standardizer(TransformerMixin, BaseEstimator):
    """Scale each feature to zero mean and unit variance, with the statistics of ``standardization``.

    scikit-learn's StandardScaler gives the same values to float32 rounding, but it accumulates in
    float64 and checks for NaNs, and it took 0.19 s to fit and apply on 3,333 x 1,280 features
    where this takes 0.02 s.
    """

    def fit(self, X: np.ndarray, y=None) -> "Standardizer":
        X = np.asarray(X, dtype=np.float32)
        self.mean_, self.scale_ = standardization(X)
        self.n_samples_seen_, self.n_features_in_ = X.shape
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self, "mean_")
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has shape {X.shape}, but this Standardizer was fitted on {self.n_features_in_} features.")
        return (X - self.mean_) / self.scale_


class _Standardized(nn.Module):
    """A torch classifier whose input standardization travels in its state_dict."""

    def __init__(self, body: nn.Module, mean: np.ndarray, scale: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32))
        self.body = body

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.body((features - self.mean) / self.scale)


class TorchHead(ClassifierMixin, BaseEstimator):
    """Shared training loop of the torch heads: AdamW on mini-batches, early stopping on val."""

    def __init__(
        self,
        *,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        epochs: int = 100,
        batch_size: int = 256,
        patience: int = 10,
        seed: int = 0,
        device: str = "cpu",
        class_weight: str | None = None,
    ) -> None:
        self.lr = lr
        self.weight_decay = weight_decay
        self.epochs = epochs
        self.batch_size = batch_size
        self.patience = patience
        self.seed = seed
        self.device = device
        self.class_weight = class_weight

    def build_body(self, n_features: int, n_classes: int) -> nn.Module:
        raise NotImplementedError

    def fit(self, X: np.ndarray, y: np.ndarray, eval_set: tuple[np.ndarray, np.ndarray] | None = None) -> "TorchHead":
        """Train on (X, y); with ``eval_set=(X_val, y_val)``, keep the epoch with the best val accuracy."""
        X = np.asarray(X, dtype=np.float32)
        self.classes_, targets = np.unique(np.asarray(y), return_inverse=True)
        mean, scale = standardization(X)
        features = torch.as_tensor(X)
        labels = torch.as_tensor(targets)

        def epoch_batches(generator: torch.Generator):
            order = torch.randperm(len(features), generator=generator)
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                yield features[batch], labels[batch]

        evaluate = None
        if eval_set is not None:
            X_eval, y_eval = np.asarray(eval_set[0], dtype=np.float32), np.asarray(eval_set[1])
            evaluate = lambda: float(np.mean(self.predict(X_eval) == y_eval))  # noqa: E731
        return self.train_loop(X.shape[1], mean, scale, np.bincount(targets, minlength=len(self.classes_)), epoch_batches, evaluate)

    def train_loop(self, n_features: int, mean: np.ndarray, scale: np.ndarray, class_counts: np.ndarray, epoch_batches, evaluate) -> "TorchHead":
        """Run the epochs: ``epoch_batches(generator)`` yields (features, labels) batches, ``evaluate()`` the val accuracy."""
        torch.manual_seed(self.seed)
        generator = torch.Generator().manual_seed(self.seed)
        device = torch.device(self.device)
        module = _Standardized(self.build_body(n_features, len(self.classes_)), mean, scale).to(device)
        optimizer = AdamW(module.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        weight = class_weights(class_counts, self.class_weight)
        loss_function = nn.CrossEntropyLoss(weight=None if weight is None else torch.as_tensor(weight, device=device))

        best_score, best_state, best_epoch, stale = -1.0, None, 0, 0
        for epoch in range(self.epochs):
            module.train()
            for batch_features, batch_labels in epoch_batches(generator):
                optimizer.zero_grad()
                loss = loss_function(module(batch_features.to(device)), batch_labels.to(device))
                loss.backward()
                optimizer.step()

            if evaluate is None:
                continue
            self.module_ = module
            score = evaluate()
            if score > best_score:
                best_score, best_state, best_epoch, stale = score, copy.deepcopy(module.state_dict()), epoch, 0
            else:
                stale += 1
                if stale >= self.patience:
                    break

        if best_state is not None:
            module.load_state_dict(best_state)
        module.eval()
        self.module_ = module
        self.best_epoch_ = best_epoch if evaluate is not None else self.epochs - 1
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self, "module_")
        self.module_.eval()
        with torch.inference_mode():
            logits = self.module_(torch.as_tensor(np.asarray(X, dtype=np.float32), device=torch.device(self.device)))
            return torch.softmax(logits, dim=1).cpu().numpy()

    def predict(self, X: np.ndarray) -> np.ndarray:
        probabilities = self.predict_proba(X)
        return self.classes_[np.argmax(probabilities, axis=1)]


def standardization(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the per-feature mean and standard deviation of (N, D) features; constant features get a scale of 1."""
    mean = X.mean(axis=0)
    scale = X.std(axis=0)
    scale[scale < 1e-6] = 1.0
    return mean, scale


def class_weights(class_counts: np.ndarray, class_weight: str | None) -> np.ndarray | None:
    """Return per-class loss weights: None, or n / (C * count) for "balanced", as scikit-learn computes them."""
    if class_weight is None:
        return None
    if class_weight != "balanced":
        raise SettingsError(f"class_weight={class_weight!r} is invalid: use None or 'balanced'.")
    counts = np.maximum(np.asarray(class_counts, dtype=np.float64), 1.0)
    return (counts.sum() / (len(counts) * counts)).astype(np.float32)


class LinearHead(TorchHead):
    """One linear layer on standardized features (torch)."""

    def build_body(self, n_features: int, n_classes: int) -> nn.Module:
        return nn.Linear(n_features, n_classes)


class MLPHead(TorchHead):
    """One hidden layer with ReLU and dropout on standardized features (torch)."""

    def __init__(
        self,
        *,
        hidden: int = 512,
        dropout: float = 0.5,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        epochs: int = 100,
        batch_size: int = 256,
        patience: int = 10,
        seed: int = 0,
        device: str = "cpu",
        class_weight: str | None = None,
    ) -> None:
        super().__init__(
            lr=lr,
            weight_decay=weight_decay,
            epochs=epochs,
            batch_size=batch_size,
            patience=patience,
            seed=seed,
            device=device,
            class_weight=class_weight,
        )
        self.hidden = hidden
        self.dropout = dropout

    def build_body(self, n_features: int, n_classes: int) -> nn.Module:
        return nn.Sequential(
            nn.Linear(n_features, self.hidden), nn.ReLU(), nn.Dropout(self.dropout), nn.Linear(self.hidden, n_classes)
        )


# Head name -> head class; the search spaces live in stages.selection.
HEAD_CLASSES: dict[str, type] = {
    "logreg": LogisticRegressionHead,
    "linear": LinearHead,
    "mlp": MLPHead,
    "knn": KNNHead,
}
