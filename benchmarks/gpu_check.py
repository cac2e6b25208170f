"""Check stage one on a CUDA GPU: forward-only and pipeline images/s, and fp32 vs mixed-precision features.

Meant to finish within 5 minutes on one GPU. It writes its own photo-like JPEG images into a
temporary folder, so it needs no dataset, and it exits with status 2 when no CUDA GPU is present.
The CPU path and the tests never depend on it. ``--device cpu`` runs the same steps on the CPU
(fp32 and bf16 only), which checks the script itself on a machine without a GPU.

    python -m benchmarks.gpu_check                  # Lite0, fp32 / bf16 / fp16
    python -m benchmarks.gpu_check --compile        # also time torch.compile in the pipeline
    python -m benchmarks.gpu_check --device cpu --backbone test_efficientnet --weights random --images 16 --steps 1
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.common import Timer, add_common_arguments, configure_logging, describe_machine
from pipeline.backbones import build_backbone
from pipeline.devices import autocast_context, check_amp, default_batch_size, to_device
from pipeline.settings import DatasetSettings, ExtractSettings
from pipeline.taps import TapExtractor
from stages.extract import prepare_backbone, run_extraction

TAP = "pre_logits"


def write_images(folder: Path, count: int, size: tuple[int, int] = (500, 375)) -> Path:
    """Write ``count`` noisy gradient JPEGs in two class folders of a train split."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0 : size[1], 0 : size[0]].astype(np.float32)
    for item in range(count):
        label = item % 2
        base = np.stack([x / size[0] * 255, y / size[1] * 255, np.full_like(x, 200.0 * label)], axis=-1)
        pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        path = folder / "train" / f"class{label}" / f"{item:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=90)
    return folder


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued kernels, so that a timer measures them; a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_rate(extractor: TapExtractor, batch: torch.Tensor, amp: str, channels_last: bool, steps: int) -> float:
    """Return images/s of the forward pass on one device-resident batch, repeated ``steps`` times."""
    device = batch.device
    batch = to_device(batch, device, channels_last)
    for _ in range(3):  # warm-up: cuDNN autotuning and allocator growth
        with autocast_context(amp, device):
            extractor(batch)
    synchronize(device)
    with Timer() as timer:
        for _ in range(steps):
            with autocast_context(amp, device):
                extractor(batch)
        synchronize(device)
    return steps * len(batch) / timer.seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1024, help="images written for the pipeline run")
    parser.add_argument("--steps", type=int, default=20, help="timed forward batches per precision")
    parser.add_argument("--compile", action="store_true", help="also run the pipeline with torch.compile")
    parser.add_argument("--device", default="cuda", help="cuda or cuda:N; cpu only checks the script itself")
    add_common_arguments(parser)
    args = parser.parse_args()
    configure_logging(args.verbose)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("No CUDA GPU is available: run this check on a machine with a CUDA GPU.", file=sys.stderr)
        return 2
    accelerator = torch.cuda.get_device_name(device) if device.type == "cuda" else "none (CPU run)"
    print(f"machine: {describe_machine()}, GPU {accelerator}")

    # forward only, per precision, with the backbone prepared as stage one runs it (folded, channels-last)
    backbone = build_backbone(args.backbone, args.weights)
    prepare_backbone(backbone, ExtractSettings(taps=(TAP,), device=args.device), device)
    extractor = TapExtractor(backbone, [TAP])
    size = backbone.preprocessing.crop_size
    batch_size = default_batch_size(device)
    batch = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    precisions = [amp for amp in ("none", "bf16", "fp16") if _supported(amp, device)]
    reference = None
    for amp in precisions:
        rate = forward_rate(extractor, batch, amp, channels_last=True, steps=args.steps)
        with autocast_context(amp, device):
            features = extractor(to_device(batch, device, True))[TAP].float()  # (B, D)
        if reference is None:
            reference = features
            print(f"forward only {amp:>4}: {rate:9.1f} images/s")
            continue
        relative = (features - reference).norm(dim=1) / reference.norm(dim=1)
        cosine = torch.nn.functional.cosine_similarity(features, reference, dim=1)
        print(
            f"forward only {amp:>4}: {rate:9.1f} images/s; vs fp32 relative L2 mean {relative.mean():.4f} "
            f"max {relative.max():.4f}, cosine min {cosine.min():.5f}"
        )

    # the whole pipeline: decode, copy, forward and write
    with tempfile.TemporaryDirectory(prefix="featcache-gpu-") as scratch:
        folder = write_images(Path(scratch) / "images", args.images)
        variants = [("none", False), ("bf16" if "bf16" in precisions else "fp16", False)]
        if args.compile:
            variants.append((variants[1][0], True))
        for amp, compile_model in variants:
            settings = ExtractSettings(
                dataset=DatasetSettings(str(folder)), backbone=args.backbone, weights=args.weights, taps=(TAP,),
                device=args.device, amp=amp, channels_last=True, compile=compile_model,
                output_root=str(Path(scratch) / "features"), force=True,
            )
            result = run_extraction(settings)
            print(
                f"pipeline amp={amp:>4} compile={compile_model!s:5}: {result.extracted / result.loop_seconds:9.1f} images/s "
                f"({result.extracted} images, {settings.workers} workers, batch {batch_size})"
            )
    return 0


def _supported(amp: str, device: torch.device) -> bool:
    try:
        check_amp(amp, device)
    except ValueError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
