"""Fold each batch norm of a frozen backbone into the convolution before it.

A frozen backbone runs its batch norms in eval mode, so each one is a fixed per-channel affine
map: ``y = (x - mean) / sqrt(var + eps) * gamma + beta``. When ``x`` is the output of a
convolution that feeds nothing else, scaling the convolution's weights and shifting its bias
gives the same ``y`` in one pass instead of two. The features change only by float rounding
(a relative difference near 1e-6), and on a CPU the forward pass gets faster.

Pairs are found by tracing the model with ``torch.fx``, with every convolution and batch norm
kept as one call, so that a convolution whose output also feeds a residual sum is left alone.
A model that cannot be traced is left unchanged. After folding, the taps' outputs are compared
with the unfolded model's on a random image, and the folding is undone when they differ.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from pipeline.backbones import Backbone

logger = logging.getLogger(__name__)

# Largest relative L2 difference of a tap's output between the folded and the unfolded model.
# Folding changes only float rounding (about 1e-6), so a larger difference means a wrong pair.
FOLD_TOLERANCE = 1e-3


@dataclass
class FoldReport:
    """Outcome of folding a model: the pairs folded, or the reason nothing was folded."""

    folded: list[tuple[str, str]] = field(default_factory=list)  # (convolution, batch norm) module names
    reason: str = ""  # why nothing was folded, empty when pairs were folded
    # per folded pair: the convolution's weight and bias before folding, and the batch norm module
    undo: list[tuple[torch.Tensor, torch.Tensor | None, nn.Module]] = field(default_factory=list, repr=False)


class NormActivation(nn.Module):
    """Dropout and activation that remain of timm's BatchNormAct2d once its batch norm is folded."""

    def __init__(self, drop: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.drop = drop
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


def _replacement(norm: nn.BatchNorm2d) -> nn.Module | None:
    """Return the module that takes a folded batch norm's place, or None for a batch norm this module does not know."""
    if type(norm) is nn.BatchNorm2d:
        return nn.Identity()
    # timm's BatchNormAct2d: a BatchNorm2d whose forward also applies ``drop`` and ``act``
    if type(norm).__name__ == "BatchNormAct2d" and hasattr(norm, "act") and hasattr(norm, "drop"):
        return NormActivation(norm.drop, norm.act)
    return None


class _LeafTracer(torch.fx.Tracer):
    """Trace a model keeping every convolution and batch norm, subclasses included, as one call."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        if isinstance(module, (nn.Conv2d, nn.BatchNorm2d)):
            return True
        return super().is_leaf_module(module, qualified_name)


def find_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """Return (convolution, batch norm) module names where the norm is the only user of the convolution's output.

    Raises whatever ``torch.fx`` raises for a model it cannot trace.
    """
    graph = _LeafTracer().trace(model)
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
            continue
        source = node.args[0] if node.args else None
        if not isinstance(source, torch.fx.Node) or source.op != "call_module":
            continue
        conv = modules[source.target]
        if isinstance(conv, nn.Conv2d) and len(source.users) == 1 and len(node.args) == 1 and not node.kwargs:
            pairs.append((str(source.target), str(node.target)))
    return pairs


def fold_pair(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> None:
    """Scale the convolution's weights and set its bias so that it outputs what the batch norm after it did."""
    with torch.no_grad():
        scale = 1 / torch.sqrt(norm.running_var + norm.eps)
        shift = torch.zeros_like(norm.running_mean)
        if norm.affine:
            scale = norm.weight * scale
            shift = norm.bias
        bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
        conv.weight.copy_(conv.weight * scale.reshape(-1, *([1] * (conv.weight.dim() - 1))))
        folded_bias = (bias - norm.running_mean) * scale + shift
        if conv.bias is None:
            conv.bias = nn.Parameter(folded_bias, requires_grad=False)
        else:
            conv.bias.copy_(folded_bias)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def fold_batchnorm(model: nn.Module, keep: set[str] = frozenset()) -> FoldReport:
    """Fold every eligible batch norm of an eval-mode model into its convolution, in place.

    ``keep`` names modules whose own output must not change meaning: a convolution in it keeps
    its raw output, so its pair is skipped. A folded batch norm is replaced by a module of the
    same name that returns the same values, so a tap on the norm itself still works.
    """
    if model.training:
        return FoldReport(reason="the model is in training mode")
    try:
        pairs = find_pairs(model)
    except Exception as error:  # torch.fx raises many types for models it cannot trace
        logger.info("Batch norms not folded: torch.fx cannot trace %s (%s).", type(model).__name__, error)
        return FoldReport(reason=f"torch.fx cannot trace the model: {type(error).__name__}")
    report = FoldReport()
    for conv_name, norm_name in pairs:
        conv, norm = model.get_submodule(conv_name), model.get_submodule(norm_name)
        replacement = _replacement(norm)
        if conv_name in keep or replacement is None or norm.running_mean is None:
            continue
        bias = None if conv.bias is None else conv.bias.detach().clone()
        report.undo.append((conv.weight.detach().clone(), bias, norm))
        fold_pair(conv, norm)
        _set_module(model, norm_name, replacement)
        report.folded.append((conv_name, norm_name))
    if not report.folded:
        report.reason = "no convolution followed by a batch norm"
    return report


def unfold_batchnorm(model: nn.Module, report: FoldReport) -> None:
    """Undo ``fold_batchnorm``: put back the convolutions' weights and biases and the batch norm modules."""
    with torch.no_grad():
        for (conv_name, norm_name), (weight, bias, norm) in zip(report.folded, report.undo):
            conv = model.get_submodule(conv_name)
            conv.weight.copy_(weight)
            if bias is None:
                conv.register_parameter("bias", None)
            else:
                conv.bias.copy_(bias)
            _set_module(model, norm_name, norm)


def fold_backbone(backbone: "Backbone", taps: list[str], sample: torch.Tensor) -> FoldReport:
    """Fold the batch norms of a frozen backbone in place, and check the taps' outputs on ``sample``.

    ``sample`` is a small batch on the model's device. When a tap's output moves by more than
    FOLD_TOLERANCE, the folding is undone and the report gives the reason.
    """
    from pipeline.taps import TapExtractor

    model = backbone.model
    with torch.inference_mode():
        before = TapExtractor(backbone, taps, "avg")(sample)
    report = fold_batchnorm(model, keep=set(taps))
    if not report.folded:
        return report
    with torch.inference_mode():
        after = TapExtractor(backbone, taps, "avg")(sample)
    for tap in taps:
        size = torch.linalg.vector_norm(before[tap]).clamp_min(1e-12)
        difference = float(torch.linalg.vector_norm(after[tap] - before[tap]) / size)
        if not difference <= FOLD_TOLERANCE:
            unfold_batchnorm(model, report)
            logger.warning(
                "Folding batch norms changed tap %s by %.2g (relative L2), so the backbone runs unfolded.", tap, difference
            )
            return FoldReport(reason=f"folding changed tap {tap} by {difference:.2g}")
    logger.info("Folded %d batch norms of %s into their convolutions.", len(report.folded), backbone.name)
    return report
