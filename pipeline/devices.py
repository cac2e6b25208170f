"""Device placement for stage one: default workers and batch size, mixed precision, channels-last, compile.

The defaults are computed on the machine that runs the extraction, never fixed for one machine.
Only ``os`` is imported at module level so that the CLI can read the defaults without importing torch.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

logger = logging.getLogger(__name__)

# Mixed-precision choices: "none" keeps float32; the others run the backbone under torch.autocast.
AMP_DTYPES = ("none", "bf16", "fp16")
# Batch size on CPU. A CPU's throughput stops growing after a few dozen images per batch, and
# larger batches only hold more decoded images in memory.
CPU_BATCH_SIZE = 32
# Batch size on a GPU. Larger batches keep the GPU busy between the host-to-device copies; 128
# images of 3x224x224 float32 take 77 MB, small next to any current GPU's memory.
GPU_BATCH_SIZE = 128
# Data-loading workers never exceed this many, because beyond it decoding is rarely the bottleneck
# and every worker process keeps its own copy of the dataset index and transform.
MAX_WORKERS = 8


def available_cpus() -> int:
    """Return the CPU cores this process may run on (its affinity mask, which containers narrow)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_workers() -> int:
    """Return the data-loading worker processes to start by default: 0 up to 2 cores, else one core fewer than available.

    With 0 workers, stage one decodes each batch in threads of the main process and then runs its
    forward pass, each on every core. On 2 cores, a worker process instead takes a core from one
    of the forward pass's two threads, which then stalls the other: hymenoptera photos ran at 95
    images/s with 1 worker and 106 with 0 (mean of two runs each). With more cores, ``cores - 1``
    workers overlap decoding with the forward pass.

    NOTE: on a GPU machine with 2 cores, ``--workers 1`` may be faster than this default of 0,
    because a worker decodes while the GPU computes. That case has not been measured.
    """
    cores = available_cpus()
    return 0 if cores <= 2 else min(MAX_WORKERS, cores - 1)


def default_batch_size(device: "torch.device") -> int:
    """Return the images per forward pass used when the settings leave the batch size at 0."""
    return GPU_BATCH_SIZE if device.type == "cuda" else CPU_BATCH_SIZE


def check_amp(amp: str, device: "torch.device") -> None:
    """Raise SettingsError when the mixed-precision type is unknown or unsupported on the device."""
    import torch

    from pipeline.settings import SettingsError

    if amp not in AMP_DTYPES:
        raise SettingsError(f"amp={amp!r} is invalid: use one of {list(AMP_DTYPES)}.")
    if amp == "fp16" and device.type != "cuda":
        raise SettingsError(f"amp='fp16' needs a CUDA device, but the device is {device}: use --amp bf16 or --amp none.")
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise SettingsError(f"amp='bf16' is not supported by the GPU {device}: use --amp fp16 or --amp none.")


def autocast_context(amp: str, device: "torch.device") -> contextlib.AbstractContextManager:
    """Return the torch.autocast context of the mixed-precision type, or a no-op for "none"."""
    import torch

    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def prepare_model(model: "nn.Module", device: "torch.device", channels_last: bool, compile_model: bool) -> "nn.Module":
    """Move a frozen backbone to the device, optionally in channels-last format, and optionally compile it.

    ``compile_model`` compiles the module in place (``nn.Module.compile``), so the submodules that
    the taps hook into stay the same objects and the tap names keep working.
    """
    import torch

    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile_model:
        # NOTE: the taps register hooks on every call and stop the forward pass by raising an
        # exception, so torch.compile may fall back to eager mode around them (a graph break).
        # It has been run on CPU with a timm test model, not yet on a GPU.
        logger.info("Compiling %s with torch.compile; the first batch includes the compile time.", type(model).__name__)
        model.compile()
    return model


def to_device(images: "torch.Tensor", device: "torch.device", channels_last: bool) -> "torch.Tensor":
    """Copy a (B, 3, H, W) batch to the device; the copy is asynchronous when the batch is in pinned memory."""
    import torch

    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return images.to(device, non_blocking=True, memory_format=memory_format)
