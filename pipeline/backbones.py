"""Backbones: a name -> factory registry over the embedded Lite0, torchvision and timm.

Every backbone comes back frozen (eval mode, no gradients) together with the preprocessing its
weights expect and an identity of those weights (the SHA-256 of the state_dict), so that stage one
can record exactly what produced a feature store.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from pipeline import lite0
from pipeline.settings import SettingsError

logger = logging.getLogger(__name__)

PRE_LOGITS = "pre_logits"
RANDOM_WEIGHTS = "random"
# Seed of the random-weights control, so that two runs of it build the same network.
RANDOM_WEIGHTS_SEED = 0


class WeightsNotAvailableError(RuntimeError):
    """Pretrained weights are neither on disk nor downloadable."""


@dataclass(frozen=True)
class Preprocessing:
    """The deterministic evaluation transform that a backbone's weights expect."""

    resize_size: int  # shorter side after resizing, in pixels
    crop_size: int  # side of the square center crop, in pixels
    interpolation: str  # "bilinear" or "bicubic"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str  # where these values were read from

    def to_dict(self) -> dict:
        return asdict(self)


IMAGENET_DEFAULT = Preprocessing(256, 224, "bilinear", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "imagenet-default")


@dataclass
class Backbone:
    """A frozen network with everything stage one records about it."""

    name: str
    family: str  # "embedded", "torchvision", "timm"
    model: nn.Module
    preprocessing: Preprocessing
    weights: str  # the weights' name: "default", an enum member, "random" or a checkpoint path
    weights_sha256: str
    classifier_name: str | None  # module whose input is the pre-logits feature
    categories: list[str] | None  # class names of the pretrained classifier, when known

    def provenance(self) -> dict:
        return {
            "backbone": self.name,
            "family": self.family,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            "classifier": self.classifier_name,
            "preprocessing": self.preprocessing.to_dict(),
        }


def state_dict_sha256(model: nn.Module) -> str:
    """Hash every tensor of the state_dict in key order: the identity of the weights."""
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def imagenet_categories() -> list[str]:
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


# ---------------------------------------------------------------------------------------------
# embedded Lite0


def _build_embedded_lite0(weights: str, offline: bool) -> Backbone:
    if weights not in ("default", RANDOM_WEIGHTS):
        raise SettingsError(f"weights={weights!r} is invalid for efficientnet_lite0: use 'default' or 'random'.")
    if weights == RANDOM_WEIGHTS:
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
    model, _ = lite0.build_lite0(pretrained=weights != RANDOM_WEIGHTS)
    return Backbone(
        name="efficientnet_lite0",
        family="embedded",
        model=model,
        preprocessing=_timm_preprocessing(model),
        weights=weights,
        weights_sha256=state_dict_sha256(model),
        classifier_name="classifier",
        categories=imagenet_categories() if weights != RANDOM_WEIGHTS else None,
    )


# ---------------------------------------------------------------------------------------------
# torchvision


def _torchvision_names() -> list[str]:
    from torchvision import models

    return sorted(models.list_models(module=models))


def _build_torchvision(name: str, weights: str, offline: bool) -> Backbone:
    from torchvision import models

    if weights == RANDOM_WEIGHTS:
        enum = models.get_model_weights(name).DEFAULT
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
        model = models.get_model(name, weights=None)
        weights_label = RANDOM_WEIGHTS
    else:
        enum_class = models.get_model_weights(name)
        member = "DEFAULT" if weights == "default" else weights
        try:
            enum = enum_class[member]
        except KeyError:
            allowed = [m.name for m in enum_class] + ["default", RANDOM_WEIGHTS]
            raise SettingsError(f"weights={weights!r} is invalid for {name}: use one of {allowed}.") from None
        model = models.get_model(name, weights=None)
        model.load_state_dict(_load_torchvision_weights(name, enum, offline))
        weights_label = f"{enum_class.__name__}.{enum.name}"

    transforms = enum.transforms()
    preprocessing = Preprocessing(
        resize_size=int(transforms.resize_size[0]),
        crop_size=int(transforms.crop_size[0]),
        interpolation=transforms.interpolation.value,
        mean=tuple(float(v) for v in transforms.mean),
        std=tuple(float(v) for v in transforms.std),
        source=f"torchvision {type(enum).__name__}.{enum.name}.transforms()",
    )
    return Backbone(
        name=name,
        family="torchvision",
        model=model,
        preprocessing=preprocessing,
        weights=weights_label,
        weights_sha256=state_dict_sha256(model),
        classifier_name=_last_linear_name(model),
        categories=list(enum.meta.get("categories", [])) or None if weights != RANDOM_WEIGHTS else None,
    )


def _load_torchvision_weights(name: str, enum, offline: bool) -> dict:
    checkpoint_dir = Path(torch.hub.get_dir()) / "checkpoints"
    path = checkpoint_dir / os.path.basename(enum.url)
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    how_to_place = (
        f"download {enum.url} on a machine with internet access and place it at {path} "
        "(torch looks in $TORCH_HOME/hub/checkpoints), or pass --checkpoint FILE"
    )
    if offline:
        raise WeightsNotAvailableError(f"Weights {enum} of {name} are not on disk at {path}: {how_to_place}.")
    try:
        return torch.hub.load_state_dict_from_url(enum.url, map_location="cpu", weights_only=True, progress=False)
    except OSError as error:
        raise WeightsNotAvailableError(
            f"Weights {enum} of {name} are not on disk at {path} and downloading them failed ({error}): {how_to_place}."
        ) from error


def _last_linear_name(model: nn.Module) -> str | None:
    name = None
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            name = module_name
    return name


# ---------------------------------------------------------------------------------------------
# timm


def _timm_preprocessing(model: nn.Module) -> Preprocessing:
    import timm.data

    config = timm.data.resolve_data_config({}, model=model)
    crop = int(config["input_size"][-1])
    return Preprocessing(
        resize_size=int(crop / config.get("crop_pct", 0.875)),
        crop_size=crop,
        interpolation=str(config.get("interpolation", "bicubic")),
        mean=tuple(float(v) for v in config["mean"]),
        std=tuple(float(v) for v in config["std"]),
        source=f"timm data config of {model.pretrained_cfg.get('architecture', '?')}",
    )


def _build_timm(name: str, weights: str, offline: bool) -> Backbone:
    import timm

    if weights not in ("default", RANDOM_WEIGHTS):
        raise SettingsError(f"weights={weights!r} is invalid for timm model {name}: use 'default' or 'random'.")
    torch.manual_seed(RANDOM_WEIGHTS_SEED)
    model = timm.create_model(name, pretrained=False)
    if weights == "default":
        model.load_state_dict(_load_timm_weights(name, model, offline))
    return Backbone(
        name=name,
        family="timm",
        model=model,
        preprocessing=_timm_preprocessing(model),
        weights=weights,
        weights_sha256=state_dict_sha256(model),
        classifier_name=model.pretrained_cfg.get("classifier"),
        categories=None,
    )


def _load_timm_weights(name: str, model: nn.Module, offline: bool) -> dict:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.constants import HF_HUB_CACHE
    from timm.models import load_state_dict

    hub_id = model.pretrained_cfg.get("hf_hub_id")
    if not hub_id:
        raise WeightsNotAvailableError(
            f"timm model {name} names no Hugging Face hub id for its weights: pass --checkpoint FILE."
        )
    cache_folder = Path(HF_HUB_CACHE) / f"models--{hub_id.replace('/', '--')}"
    how_to_place = (
        f"download {hub_id} (model.safetensors) on a machine with internet access and copy its hub cache "
        f"folder to {cache_folder}, or pass --checkpoint FILE"
    )
    errors = []
    for filename in ("model.safetensors", "pytorch_model.bin"):
        try:
            path = hf_hub_download(hub_id, filename, local_files_only=True)
            return load_state_dict(path)
        except Exception as error:  # huggingface_hub raises several unrelated types for "not cached"
            errors.append(f"{filename}: {type(error).__name__}")
    if offline:
        raise WeightsNotAvailableError(f"Weights of timm model {name} are not in the cache {cache_folder}: {how_to_place}.")
    try:
        path = hf_hub_download(hub_id, "model.safetensors")
        return load_state_dict(path)
    except Exception as error:
        raise WeightsNotAvailableError(
            f"Weights of timm model {name} are not in the cache {cache_folder} and downloading them failed "
            f"({type(error).__name__}): {how_to_place}."
        ) from error


# ---------------------------------------------------------------------------------------------
# checkpoints and the registry


def load_checkpoint_into(backbone: Backbone, checkpoint: str) -> Backbone:
    """Replace the backbone's weights with a local state_dict file (read with weights_only=True)."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} not found: pass the path of a saved state_dict.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"Checkpoint {path} was rejected: it contains pickled objects other than tensors and plain "
            "containers, and loading those could run arbitrary code. Save only the model's state_dict."
        ) from error
    for wrapper_key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper_key), dict):
            state = state[wrapper_key]
    state = {key.removeprefix("module."): value for key, value in state.items()}
    result = backbone.model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"Checkpoint {path} does not fit {backbone.name}: {len(result.missing_keys)} missing keys "
            f"(e.g. {result.missing_keys[:3]}) and {len(result.unexpected_keys)} unexpected keys "
            f"(e.g. {result.unexpected_keys[:3]}). Save the state_dict of the same architecture."
        )
    backbone.weights = str(path)
    backbone.weights_sha256 = state_dict_sha256(backbone.model)
    backbone.categories = None
    return backbone


BackboneFactory = Callable[[str, bool], Backbone]
EMBEDDED: dict[str, BackboneFactory] = {"efficientnet_lite0": _build_embedded_lite0}


def build_backbone(
    name: str, weights: str = "default", checkpoint: str | None = None, offline: bool = False
) -> Backbone:
    """Build a frozen backbone by name: embedded first, then torchvision, then timm."""
    import timm

    if name in EMBEDDED:
        backbone = EMBEDDED[name](weights if checkpoint is None else RANDOM_WEIGHTS, offline)
    elif name in _torchvision_names():
        backbone = _build_torchvision(name, weights if checkpoint is None else RANDOM_WEIGHTS, offline)
    elif timm.is_model(name):
        backbone = _build_timm(name, weights if checkpoint is None else RANDOM_WEIGHTS, offline)
    else:
        raise SettingsError(
            f"backbone={name!r} is not known: use 'efficientnet_lite0', a torchvision model name "
            "(see torchvision.models.list_models()) or a timm model name (see timm.list_models())."
        )
    if checkpoint is not None:
        backbone = load_checkpoint_into(backbone, checkpoint)
    freeze(backbone.model)
    logger.info("Backbone %s (%s), weights %s", backbone.name, backbone.family, backbone.weights)
    return backbone


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SettingsError(f"device={device!r} was requested, but no CUDA GPU is available: use --device cpu.")
    return torch.device(device)
