"""Taps: capture the outputs of named layers of a backbone during one forward pass.

A tap is a module name from ``model.named_modules()`` (for example ``blocks.3`` or ``layer2``),
or ``pre_logits``: the input of the backbone's final classifier. The forward pass stops as soon
as the last requested tap has fired, so early taps cost only the layers before them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pipeline.backbones import PRE_LOGITS, Backbone
from pipeline.pooling import DEFAULT_MAX_FLATTEN_DIM, parse_pooling, pool
from pipeline.settings import SettingsError


class _StopForward(Exception):
    """Raised inside a hook once every tap has fired, to skip the rest of the network."""


class TapExtractor:
    """Run a frozen backbone and return one pooled (N, D) feature tensor per tap."""

    def __init__(
        self, backbone: Backbone, taps: Sequence[str], pooling: str = "avg", max_flatten_dim: int = DEFAULT_MAX_FLATTEN_DIM
    ) -> None:
        parse_pooling(pooling)
        self.backbone = backbone
        self.taps = list(taps)
        self.pooling = pooling
        self.max_flatten_dim = max_flatten_dim
        self._modules = {tap: resolve_tap_module(backbone, tap) for tap in self.taps}

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        captured: dict[str, torch.Tensor] = {}
        handles = []

        def make_hook(tap: str, from_input: bool):
            def hook(module, inputs, output=None):
                value = inputs[0] if from_input else output
                if isinstance(value, (tuple, list)):
                    value = value[0]
                captured[tap] = pool(value, self.pooling, self.max_flatten_dim)
                if len(captured) == len(self.taps):
                    raise _StopForward

            return hook

        for tap, module in self._modules.items():
            if tap == PRE_LOGITS:
                handles.append(module.register_forward_pre_hook(make_hook(tap, from_input=True)))
            else:
                handles.append(module.register_forward_hook(make_hook(tap, from_input=False)))
        try:
            with torch.inference_mode():
                self.backbone.model(images)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()

        missing = [tap for tap in self.taps if tap not in captured]
        if missing:
            raise RuntimeError(f"Taps {missing} of {self.backbone.name} did not fire during the forward pass.")
        return {tap: captured[tap] for tap in self.taps}


def resolve_tap_module(backbone: Backbone, tap: str) -> nn.Module:
    """Return the module whose output (or, for pre_logits, whose input) a tap captures."""
    if tap == PRE_LOGITS:
        if not backbone.classifier_name:
            raise SettingsError(
                f"{backbone.name} has no final linear classifier, so it has no '{PRE_LOGITS}' tap: "
                f"name a layer instead (featcache taps {backbone.name})."
            )
        return backbone.model.get_submodule(backbone.classifier_name)
    try:
        return backbone.model.get_submodule(tap)
    except AttributeError:
        raise SettingsError(
            f"tap={tap!r} is not a layer of {backbone.name}: list the tap names with 'featcache taps {backbone.name}'."
        ) from None


def describe_taps(backbone: Backbone, max_depth: int = 2) -> list[tuple[str, tuple[int, ...], int]]:
    """Return (tap, output shape, pooled dimension) for the layers up to ``max_depth`` dots deep.

    Shapes come from one forward pass of a single blank image at the backbone's crop size.
    """
    size = backbone.preprocessing.crop_size
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    names = [PRE_LOGITS] if backbone.classifier_name else []
    for name, module in backbone.model.named_modules():
        if name and name.count(".") < max_depth:
            names.append(name)

            def hook(module, inputs, output, name=name):
                if isinstance(output, torch.Tensor):
                    shapes[name] = tuple(output.shape[1:])

            handles.append(module.register_forward_hook(hook))
    if backbone.classifier_name:
        classifier = backbone.model.get_submodule(backbone.classifier_name)

        def pre_hook(module, inputs):
            shapes[PRE_LOGITS] = tuple(inputs[0].shape[1:])

        handles.append(classifier.register_forward_pre_hook(pre_hook))
    try:
        with torch.inference_mode():
            backbone.model(torch.zeros(1, 3, size, size))
    finally:
        for handle in handles:
            handle.remove()
    rows = []
    for name in names:
        if name in shapes:
            shape = shapes[name]
            rows.append((name, shape, int(shape[0]) if len(shape) != 2 else int(shape[1])))
    return rows
