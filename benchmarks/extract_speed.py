"""Measure stage one against its limit, in one process and run, and print images per second and ratios.

(a) forward only: the backbone's forward pass up to the tap, prepared as featcache runs it (batch
    norms folded, channels-last), on tensors already decoded, normalized and laid out in memory.
    This is the limit, because any extraction has to run these passes. The same passes with the
    backbone as built, unprepared, are printed as (a0) to show what the preparation gains.
(b) naive loop: what a user writes by hand, with torchvision ImageFolder, a DataLoader with its
    default settings (0 workers unless --naive-workers), the full model under torch.no_grad, and
    the features collected as numpy arrays. It runs in a fresh process started for it, because
    featcache sets malloc's thresholds for its whole process (pipeline/memory.py) and a
    hand-written script keeps the defaults. (b here) is the same loop in this process.
(c) featcache: ``run_extraction`` with its default settings, into a store in a temporary folder,
    timed over its decode-forward-write loop (without the backbone load, as (a) and (b)).

(a), (b) and (c) run in turns for --repeats rounds, and the ratios compare each one's best round.
A shared machine can only slow a run down, so the best round is the closest to what the code does.

Targets on a 2-core CPU: (c) >= 0.9 x (a) and (c) >= 1.3 x (b).

    python -m benchmarks.extract_speed --data hymenoptera --subset 64
    python -m benchmarks.extract_speed --data cifar10 --subset 600
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from torchvision import datasets
from torchvision import transforms as T

from benchmarks.common import Timer, add_common_arguments, configure_logging, describe_machine, link_subset, resolve_dataset, select_samples
from pipeline.backbones import Backbone, build_backbone
from pipeline.devices import CPU_BATCH_SIZE
from pipeline.images import build_transform, load_image
from pipeline.settings import DatasetSettings, ExtractSettings
from pipeline.taps import TapExtractor
from stages.extract import prepare_backbone, run_extraction

TAP = "pre_logits"


def decode_all(backbone: Backbone, folder: Path, samples) -> torch.Tensor:
    """Return every image of the samples decoded and normalized: (N, 3, H, W) float32."""
    transform = build_transform(backbone.preprocessing)
    return torch.stack([transform(load_image(folder / sample.path)) for sample in samples])


def measure_forward_only(backbone: Backbone, images: torch.Tensor, batch_size: int) -> float:
    """Return images/s of the forward pass alone, on batches decoded and stacked beforehand."""
    extractor = TapExtractor(backbone, [TAP])
    extractor(images[:batch_size])  # warm-up: the first call allocates and picks kernels
    with Timer() as timer:
        for start in range(0, len(images), batch_size):
            extractor(images[start : start + batch_size])
    return len(images) / timer.seconds


def naive_features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Return the pre-logits features the way a user would: timm's forward_head, else the full output."""
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        return model.forward_head(model.forward_features(images), pre_logits=True)
    return model(images)


def measure_naive(backbone: Backbone, folder: Path, batch_size: int, workers: int) -> tuple[float, int]:
    """Return (images/s, images) of the hand-written ImageFolder + DataLoader + model loop."""
    preprocessing = backbone.preprocessing
    transform = T.Compose(
        [
            T.Resize(preprocessing.resize_size, interpolation=T.InterpolationMode(preprocessing.interpolation)),
            T.CenterCrop(preprocessing.crop_size),
            T.ToTensor(),
            T.Normalize(preprocessing.mean, preprocessing.std),
        ]
    )
    split_folders = [folder / split for split in ("train", "val", "test") if (folder / split).is_dir()] or [folder]
    features, count = [], 0
    with Timer() as timer:
        for split_folder in split_folders:
            loader = torch.utils.data.DataLoader(
                datasets.ImageFolder(split_folder, transform=transform), batch_size=batch_size, num_workers=workers
            )
            with torch.no_grad():
                for images, _labels in loader:
                    features.append(naive_features(backbone.model, images).numpy())
                    count += len(images)
        np.concatenate(features)
    return count / timer.seconds, count


def naive_in_fresh_process(backbone_name: str, weights: str, folder: Path, batch_size: int, workers: int) -> float:
    """Return images/s of the naive loop run in a new interpreter, with the C library's default malloc settings."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # the executor's process may start DataLoader workers of its own (--naive-workers)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_naive_rate, backbone_name, weights, folder, batch_size, workers).result()


def _naive_rate(backbone_name: str, weights: str, folder: Path, batch_size: int, workers: int) -> float:
    return measure_naive(build_backbone(backbone_name, weights), folder, batch_size, workers)[0]


def measure_featcache(folder: Path, output: Path, args: argparse.Namespace, draft: bool) -> tuple[float, ExtractSettings]:
    """Return images/s of run_extraction's loop with the default workers and batch size."""
    settings = ExtractSettings(
        dataset=DatasetSettings(str(folder)),
        backbone=args.backbone,
        weights=args.weights,
        taps=(TAP,),
        device="cpu",
        output_root=str(output),
        draft=draft,
        force=True,
    )
    result = run_extraction(settings)
    return result.extracted / result.loop_seconds, settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="hymenoptera", help="hymenoptera, cifar10, flowers5, or a class-per-folder path")
    parser.add_argument("--subset", type=int, default=None, help="use this many images, spread over the dataset (default: all)")
    parser.add_argument("--batch-size", type=int, default=CPU_BATCH_SIZE, help="batch size of (a) and (b)")
    parser.add_argument("--naive-workers", type=int, default=0, help="DataLoader workers of the naive loop (its default is 0)")
    parser.add_argument("--no-draft-too", action="store_true", help="also time (c) with draft mode off")
    parser.add_argument(
        "--repeats", type=int, default=3,
        help="rounds of (a), (b) and (c); the ratios use each one's best round, the least disturbed by other work",
    )
    add_common_arguments(parser)
    args = parser.parse_args()
    configure_logging(args.verbose)

    root = resolve_dataset(args.data)
    samples = select_samples(root, args.subset)
    print(f"machine: {describe_machine()}")
    print(f"dataset: {root} ({len(samples)} images), backbone {args.backbone} ({args.weights} weights), tap {TAP}")

    with tempfile.TemporaryDirectory(prefix="featcache-speed-") as scratch:
        folder = link_subset(root, samples, Path(scratch) / root.name)
        backbone = build_backbone(args.backbone, args.weights)  # as built: for (a0) and the naive loop
        prepared = build_backbone(args.backbone, args.weights)  # as featcache runs it: for (a)
        defaults = ExtractSettings(taps=(TAP,), device="cpu")
        prepare_backbone(prepared, defaults, torch.device("cpu"))
        images = decode_all(backbone, folder, samples)
        laid_out = images.contiguous(memory_format=torch.channels_last) if defaults.channels_last else images

        plain_rate = measure_forward_only(backbone, images, args.batch_size)
        print(f"(a0) forward only, backbone as built {plain_rate:8.1f} images/s  (batch {args.batch_size}, tensors in memory)")
        print(
            f"(a) forward only, prepared as featcache runs it (batch norms folded: {defaults.fold_batchnorm}, "
            f"channels-last: {defaults.channels_last}), batch {args.batch_size}, tensors in memory"
        )
        print(f"(b) naive loop, batch {args.batch_size}, {args.naive_workers} workers, in a fresh process; (b here) in this one")
        print(f"(c) featcache extract, default batch size and workers, draft on")
        rates: dict[str, list[float]] = {"a": [], "b": [], "b here": [], "c": [], "c, no draft": []}
        # (a), (b) and (c) take turns, so that a slow spell of a shared machine hits all three
        for round_number in range(1, args.repeats + 1):
            rates["a"].append(measure_forward_only(prepared, laid_out, args.batch_size))
            rates["b"].append(naive_in_fresh_process(args.backbone, args.weights, folder, args.batch_size, args.naive_workers))
            rates["b here"].append(measure_naive(backbone, folder, args.batch_size, args.naive_workers)[0])
            rates["c"].append(measure_featcache(folder, Path(scratch) / "features", args, draft=True)[0])
            if args.no_draft_too:
                rates["c, no draft"].append(measure_featcache(folder, Path(scratch) / "features-full", args, draft=False)[0])
            line = ", ".join(f"{name} {values[-1]:.1f}" for name, values in rates.items() if values)
            print(f"round {round_number}: {line} images/s; c/a {rates['c'][-1] / rates['a'][-1]:.2f}, c/b {rates['c'][-1] / rates['b'][-1]:.2f}")
        del images, laid_out

    best = {name: max(values) for name, values in rates.items() if values}
    print("best of " + str(args.repeats) + ": " + ", ".join(f"{name} {value:.1f}" for name, value in best.items()) + " images/s")
    print(f"a / a0 = {best['a'] / plain_rate:.2f}  (what folding and channels-last gain on the forward pass)")
    print(f"c / a = {best['c'] / best['a']:.2f}  (target >= 0.90)")
    print(f"c / b = {best['c'] / best['b']:.2f}  (target >= 1.30)")


if __name__ == "__main__":
    main()
