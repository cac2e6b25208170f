"""The ``featcache`` command line: parse, build settings, call a stage, return an exit code."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline.settings import DEFAULT_BACKBONE, DatasetSettings, ExtractSettings, HeadSettings

logger = logging.getLogger("featcache")

DEMO_TAPS = ("blocks.1", "blocks.3", "blocks.5", "pre_logits")


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def _comma_list(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


def add_extract_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="digits", help="class-per-folder directory, or 'digits' (embedded)")
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE, help="embedded, torchvision or timm model name")
    parser.add_argument("--weights", default="default", help="'default', a torchvision weights member, or 'random'")
    parser.add_argument("--checkpoint", default=None, help="local state_dict file loaded into the backbone")
    parser.add_argument("--taps", type=_comma_list, default=("pre_logits",), help="comma-separated layer names")
    parser.add_argument("--pooling", default="avg", help="pooling of feature-map taps: avg or max")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="stored feature type")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--workers", type=int, default=2, help="data-loading worker processes (0: main process)")
    parser.add_argument("--shard-size", type=int, default=1024, help="samples per HDF5 shard")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="share of each class for val without split folders")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="share of each class for test without split folders")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the stratified split")
    parser.add_argument("--output", default="data/features", help="folder that holds the stores")
    parser.add_argument("--name", default=None, help="store folder name (default: dataset-backbone-key)")
    parser.add_argument("--offline", action="store_true", help="never download weights")
    parser.add_argument("--force", action="store_true", help="rebuild the store even on a cache hit")


def extract_settings_from(args: argparse.Namespace) -> ExtractSettings:
    return ExtractSettings(
        dataset=DatasetSettings(args.data, args.val_fraction, args.test_fraction, args.split_seed),
        backbone=args.backbone,
        weights=args.weights,
        checkpoint=args.checkpoint,
        taps=args.taps,
        pooling=args.pooling,
        dtype=args.dtype,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        output_root=args.output,
        name=args.name,
        offline=args.offline,
        force=args.force,
    )


def add_heads_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", default=None, help="store folder (default: the newest complete store)")
    parser.add_argument(
        "--heads", type=_comma_list, default=("logreg", "linear", "mlp", "knn"), help="comma-separated head names"
    )
    parser.add_argument("--head-taps", type=_comma_list, default=(), help="taps to train on (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of head training")
    parser.add_argument("--results", default="data/results", help="folder that holds the results")
    parser.add_argument("--seeds", type=int, default=1, help="trainings per selected setting; results give mean and 95%% CI")
    parser.add_argument("--class-weight", default=None, choices=["balanced"], help="weight classes by inverse frequency")
    parser.add_argument(
        "--controls", type=_comma_list, default=("majority", "pixels"),
        help="comma-separated controls: majority, pixels, random (runs stage one with random weights); '' for none",
    )
    parser.add_argument("--overfit-gap", type=float, default=0.1, help="warn when train minus val accuracy exceeds this")
    parser.add_argument("--memory-budget-mb", type=float, default=2048.0, help="MiB per tap before linear/mlp heads stream")
    parser.add_argument("--cv-folds", type=int, default=3, help="cross-validation folds inside train when there is no val")
    parser.add_argument("--pixel-size", type=int, default=16, help="side in pixels of the pixels control's images")
    parser.add_argument("--head-threads", type=int, default=1, help="torch CPU threads while heads train")


def heads_settings_from(args: argparse.Namespace, store: str | None = None) -> HeadSettings:
    return HeadSettings(
        store=store or args.store,
        heads=args.heads,
        taps=args.head_taps,
        seed=args.seed,
        output_root=args.results,
        seeds=args.seeds,
        class_weight=args.class_weight,
        controls=args.controls,
        overfit_gap=args.overfit_gap,
        memory_budget_mb=args.memory_budget_mb,
        cv_folds=args.cv_folds,
        pixel_size=args.pixel_size,
        threads=args.head_threads,
    )


def command_extract(args: argparse.Namespace) -> int:
    from stages.extract import run_extraction

    result = run_extraction(extract_settings_from(args))
    print(result.folder)
    return 0


def command_heads(args: argparse.Namespace) -> int:
    from stages.train_heads import format_table, run_heads

    rows = run_heads(heads_settings_from(args), Path(getattr(args, "output", "data/features")))
    print(format_table(rows))
    return 0


def command_demo(args: argparse.Namespace) -> int:
    """Run stage one and stage two on the embedded digits with several taps of Lite0."""
    from stages.extract import run_extraction
    from stages.train_heads import format_table, run_heads

    result = run_extraction(extract_settings_from(args))
    rows = run_heads(heads_settings_from(args, store=str(result.folder)))
    print(format_table(rows))
    return 0


def command_taps(args: argparse.Namespace) -> int:
    from pipeline.backbones import build_backbone
    from pipeline.taps import describe_taps

    backbone = build_backbone(args.backbone, args.weights, offline=args.offline)
    print(f"{'tap':40s} {'output shape':20s} pooled dim")
    for name, shape, dim in describe_taps(backbone, args.depth):
        print(f"{name:40s} {str(shape):20s} {dim}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="featcache", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True)

    extract = commands.add_parser("extract", help="stage one: write the features of a dataset to a store")
    add_extract_arguments(extract)
    extract.set_defaults(handler=command_extract)

    heads = commands.add_parser("heads", help="stage two: train heads on a store and print the results")
    add_heads_arguments(heads)
    heads.set_defaults(handler=command_heads)

    demo = commands.add_parser("demo", help="both stages on the embedded digits with early to late taps")
    add_extract_arguments(demo)
    add_heads_arguments(demo)
    demo.set_defaults(handler=command_demo, taps=DEMO_TAPS)

    taps = commands.add_parser("taps", help="list the tap names of a backbone with their output shapes")
    taps.add_argument("backbone", nargs="?", default=DEFAULT_BACKBONE)
    taps.add_argument("--weights", default="default")
    taps.add_argument("--depth", type=int, default=2, help="list layers up to this many dots deep")
    taps.add_argument("--offline", action="store_true")
    taps.set_defaults(handler=command_taps)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pipeline.settings import SettingsError
    from pipeline.store import StoreError

    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        return args.handler(args)
    except (SettingsError, StoreError, FileNotFoundError, ValueError) as error:
        logger.error("%s", error)
        return 2
    except RuntimeError as error:
        # pipeline.backbones imports torch, so it is looked up only when a command has loaded it:
        # a 'heads' rerun with nothing to train never imports torch.
        backbones = sys.modules.get("pipeline.backbones")
        if backbones is None or not isinstance(error, backbones.WeightsNotAvailableError):
            raise
        logger.error("%s", error)
        return 2


if __name__ == "__main__":
    sys.exit(main())
