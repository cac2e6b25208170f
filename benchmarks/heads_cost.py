"""Compare the cost of stage two's default sweep with the extraction time of the same store.

Stage two should cost less than 10% of stage one on cifar10-small features, so that trying heads
is cheap next to extracting features once. Extraction is timed end to end (backbone load
included), the sweep is ``run_heads`` with the default heads on every tap.

    python -m benchmarks.heads_cost --data cifar10
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.common import Timer, add_common_arguments, configure_logging, describe_machine, link_subset, resolve_dataset, select_samples
from pipeline.settings import DatasetSettings, ExtractSettings, HeadSettings
from stages.extract import run_extraction
from stages.train_heads import run_heads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="cifar10", help="hymenoptera, cifar10, flowers5, or a class-per-folder path")
    parser.add_argument("--subset", type=int, default=None, help="use this many images, spread over the dataset (default: all)")
    add_common_arguments(parser)
    args = parser.parse_args()
    configure_logging(args.verbose)

    root = resolve_dataset(args.data)
    samples = select_samples(root, args.subset)
    head_settings = HeadSettings()
    print(f"machine: {describe_machine()}")
    print(f"dataset: {root} ({len(samples)} images), backbone {args.backbone} ({args.weights} weights)")

    with tempfile.TemporaryDirectory(prefix="featcache-heads-") as scratch:
        folder = link_subset(root, samples, Path(scratch) / root.name)
        settings = ExtractSettings(
            dataset=DatasetSettings(str(folder)), backbone=args.backbone, weights=args.weights,
            device="cpu", output_root=str(Path(scratch) / "features"), force=True,
        )
        result = run_extraction(settings)
        print(f"stage one: {result.extracted} images in {result.seconds:.1f} s ({result.loop_seconds:.1f} s in the extraction loop)")

        head_settings = HeadSettings(store=str(result.folder), output_root=str(Path(scratch) / "results"))
        with Timer() as timer:
            rows = run_heads(head_settings)
    for row in rows:
        print(f"  {row['tap']:12s} {row['head']:8s} {row.get('seconds', 0.0):7.1f} s  accuracy {row['accuracy']:.3f} on {row['eval_split']}")
    print(f"stage two, default sweep {list(head_settings.heads)}: {timer.seconds:.1f} s")
    print(f"stage two / stage one = {timer.seconds / result.seconds:.3f}  (target < 0.10)")


if __name__ == "__main__":
    main()
