"""Measure what JPEG draft mode saves in decoding and how close its features stay to a full decode.

For each photo the script decodes it twice, at full size and in draft mode, applies the same
evaluation transform, and compares the backbone's features: cosine similarity and relative L2
difference ``|draft - full| / |full|``. It also times both decodes, transform included.

    python -m benchmarks.draft_features --data hymenoptera --subset 100
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import Timer, add_common_arguments, configure_logging, describe_machine, resolve_dataset, select_samples
from pipeline.backbones import build_backbone
from pipeline.images import build_transform, load_image
from pipeline.taps import TapExtractor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="hymenoptera", help="hymenoptera, cifar10, flowers5, or a class-per-folder path")
    parser.add_argument("--subset", type=int, default=100, help="photos to compare, spread over the dataset")
    parser.add_argument("--tap", default="pre_logits", help="tap whose features are compared")
    add_common_arguments(parser)
    args = parser.parse_args()
    configure_logging(args.verbose)

    root = resolve_dataset(args.data)
    samples = [sample for sample in select_samples(root, args.subset) if sample.path.lower().endswith((".jpg", ".jpeg"))]
    backbone = build_backbone(args.backbone, args.weights)
    transform = build_transform(backbone.preprocessing)
    draft_size = backbone.preprocessing.resize_size
    print(f"machine: {describe_machine()}")
    print(f"dataset: {root} ({len(samples)} JPEG photos), backbone {args.backbone} ({args.weights} weights), tap {args.tap}")

    # decode every photo both ways, timing each way separately
    with Timer() as full_timer:
        full = torch.stack([transform(load_image(root / sample.path)) for sample in samples])  # (N, 3, H, W)
    with Timer() as draft_timer:
        draft = torch.stack([transform(load_image(root / sample.path, draft_size=draft_size)) for sample in samples])  # (N, 3, H, W)

    # compare the features batch by batch
    extractor = TapExtractor(backbone, [args.tap])
    full_features, draft_features = [], []
    for start in range(0, len(samples), 32):
        full_features.append(extractor(full[start : start + 32])[args.tap])
        draft_features.append(extractor(draft[start : start + 32])[args.tap])
    full_features = torch.cat(full_features)  # (N, D)
    draft_features = torch.cat(draft_features)  # (N, D)
    cosine = torch.nn.functional.cosine_similarity(full_features, draft_features, dim=1)
    relative = (draft_features - full_features).norm(dim=1) / full_features.norm(dim=1)
    pixels = (draft - full).abs().mean(dim=(1, 2, 3))

    print(f"decode + transform: full {len(samples) / full_timer.seconds:.1f} images/s, draft {len(samples) / draft_timer.seconds:.1f} images/s "
          f"({full_timer.seconds / draft_timer.seconds:.2f}x faster)")
    print(f"cosine similarity draft vs full: mean {cosine.mean():.4f}, min {cosine.min():.4f}")
    print(f"relative L2 difference:          mean {relative.mean():.4f}, max {relative.max():.4f}")
    print(f"mean absolute input difference (normalized units): mean {pixels.mean():.4f}, max {pixels.max():.4f}")
    print(f"photos changed by draft mode: {int((pixels > 0).sum())} of {len(samples)}")


if __name__ == "__main__":
    main()
