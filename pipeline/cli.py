"""The ``featcache`` command line: parse, build settings, call a stage, return an exit code."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from pipeline.devices import AMP_DTYPES, default_workers
from pipeline.settings import DEFAULT_BACKBONE, DEFAULT_MAX_IMAGE_PIXELS, DatasetSettings, ExtractSettings, HeadSettings

logger = logging.getLogger("featcache")

DEMO_TAPS = ("blocks.1", "blocks.3", "blocks.5", "pre_logits")


# Loggers of featcache's own modules. Other libraries log warnings only (info too with -v), so
# that messages such as torch's exit-time statistics stay out of the output.
FEATCACHE_LOGGERS = ("featcache", "pipeline", "stages", "benchmarks")


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for name in FEATCACHE_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)


def _comma_list(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


def _at_least(minimum: int):
    """Return an argparse type that reads an integer of at least ``minimum``, naming the option on an error."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is invalid: use an integer") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"{number} is invalid: use {minimum} or more")
        return number

    return parse


def add_split_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of the seeded split, used when a dataset has no split folders."""
    parser.add_argument("--val-fraction", type=float, default=0.2, help="share of each class for val without split folders")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="share of each class for test without split folders")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the stratified split")


def add_extract_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="digits", help="class-per-folder directory, CSV manifest, or 'digits'")
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE, help="embedded, torchvision or timm model name")
    parser.add_argument("--weights", default="default", help="'default', a torchvision weights member, or 'random'")
    parser.add_argument("--checkpoint", default=None, help="local state_dict file loaded into the backbone")
    parser.add_argument("--taps", type=_comma_list, default=("pre_logits",), help="comma-separated layer names")
    parser.add_argument(
        "--pooling", default="avg", help="pooling of feature-map taps: avg, max, gem<p> (gem3), grid<k> (grid2) or flatten"
    )
    parser.add_argument("--max-flatten-dim", type=_at_least(1), default=16384, help="largest feature 'flatten' may store, in values")
    parser.add_argument("--views", type=_at_least(0), default=0, help="augmented views per training image, besides view 0")
    parser.add_argument("--augment", default="none", help="augmentation policy of the views: flip, light or standard")
    parser.add_argument("--view-seed", type=int, default=0, help="seed of the augmented views")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="stored feature type")
    parser.add_argument("--batch-size", type=_at_least(0), default=0, help="images per forward pass (0: 32 on CPU, 128 on CUDA)")
    parser.add_argument(
        "--workers", type=_at_least(0), default=default_workers(),
        help="data-loading worker processes (0: threads of the main process, between forward passes; "
             "default: 0 on up to 2 cores, else cores - 1)",
    )
    parser.add_argument("--shard-size", type=_at_least(1), default=1024, help="samples per HDF5 shard")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    add_split_arguments(parser)
    parser.add_argument("--output", default="data/features", help="folder of the feature stores")
    parser.add_argument("--name", default=None, help="store folder name (default: dataset-backbone-key)")
    parser.add_argument("--offline", action="store_true", help="never download weights")
    parser.add_argument("--force", action="store_true", help="rebuild the store even on a cache hit")
    parser.add_argument("--compression", default="none", choices=["none", "gzip", "lzf"], help="HDF5 compression of features")
    parser.add_argument(
        "--max-image-pixels", type=_at_least(1), default=DEFAULT_MAX_IMAGE_PIXELS,
        help="skip and list images with more pixels (width * height) than this",
    )
    parser.add_argument(
        "--content-hash", action="store_true",
        help="key the store by the bytes of every file instead of their sizes and modification times",
    )
    parser.add_argument("--amp", default="none", choices=list(AMP_DTYPES), help="mixed precision of the forward pass (fp16: CUDA only)")
    parser.add_argument(
        "--channels-last", action=argparse.BooleanOptionalAction, default=True,
        help="channels-last memory format for backbone and batches (default: on)",
    )
    parser.add_argument(
        "--fold-batchnorm", action=argparse.BooleanOptionalAction, default=True,
        help="fold each batch norm into the convolution before it (default: on)",
    )
    parser.add_argument("--compile", action="store_true", help="compile the backbone with torch.compile")
    parser.add_argument("--no-draft", dest="draft", action="store_false", help="decode JPEGs at full size (no draft mode)")


def extract_settings_from(args: argparse.Namespace) -> ExtractSettings:
    return ExtractSettings(
        dataset=DatasetSettings(args.data, args.val_fraction, args.test_fraction, args.split_seed, args.content_hash),
        backbone=args.backbone,
        weights=args.weights,
        checkpoint=args.checkpoint,
        taps=args.taps,
        pooling=args.pooling,
        max_flatten_dim=args.max_flatten_dim,
        views=args.views,
        augment=args.augment,
        view_seed=args.view_seed,
        dtype=args.dtype,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        output_root=args.output,
        name=args.name,
        offline=args.offline,
        force=args.force,
        compression=args.compression,
        max_image_pixels=args.max_image_pixels,
        amp=args.amp,
        channels_last=args.channels_last,
        fold_batchnorm=args.fold_batchnorm,
        compile=args.compile,
        draft=args.draft,
    )


def add_heads_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", default=None, help="store folder (default: the newest complete store)")
    parser.add_argument(
        "--heads", type=_comma_list, default=("logreg", "linear", "mlp", "knn"), help="comma-separated head names, from logreg, linear, mlp and knn"
    )
    parser.add_argument("--head-taps", type=_comma_list, default=(), help="taps to train on (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of head training")
    parser.add_argument("--results", default="data/results", help="folder of the head results")
    parser.add_argument("--seeds", type=_at_least(1), default=1, help="trainings per selected setting; results give mean and 95%% CI")
    parser.add_argument("--class-weight", default=None, choices=["balanced"], help="weight classes by inverse frequency")
    parser.add_argument(
        "--controls", type=_comma_list, default=("majority", "pixels"),
        help="comma-separated controls: majority, pixels, random (runs stage one with random weights); '' for none",
    )
    parser.add_argument("--overfit-gap", type=float, default=0.1, help="warn when train minus val accuracy exceeds this")
    parser.add_argument("--memory-budget-mb", type=float, default=2048.0, help="MiB per tap before linear/mlp heads stream")
    parser.add_argument("--cv-folds", type=_at_least(2), default=3, help="cross-validation folds inside train when there is no val")
    parser.add_argument("--cv-max-train", type=_at_least(0), default=HeadSettings.cv_max_train,
                        help="above this many train images, select on one held-out fold instead of cross-validating; "
                             "0 always cross-validates")
    parser.add_argument("--pixel-size", type=_at_least(1), default=16, help="side in pixels of the pixels control's images")
    parser.add_argument("--head-threads", type=_at_least(1), default=HeadSettings.threads, help="torch CPU threads while heads train")
    parser.add_argument("--patience", type=_at_least(1), default=HeadSettings.patience,
                        help="epochs without a better selection accuracy before a linear or MLP head stops")
    parser.add_argument("--mlp-hidden", type=_at_least(1), default=HeadSettings.mlp_hidden, help="hidden units of the MLP head")


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
        cv_max_train=args.cv_max_train,
        pixel_size=args.pixel_size,
        threads=args.head_threads,
        patience=args.patience,
        mlp_hidden=args.mlp_hidden,
    )


def command_extract(args: argparse.Namespace) -> int:
    from pipeline.distributed import is_main_process
    from pipeline.virtual import write_virtual_view
    from stages.extract import run_extraction

    result = run_extraction(extract_settings_from(args))
    if not is_main_process():
        return 0
    if args.virtual_view:
        write_virtual_view(result.folder)
    print(result.folder)
    return 0


def command_virtual(args: argparse.Namespace) -> int:
    from pipeline.virtual import write_virtual_view

    print(write_virtual_view(args.store))
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


def command_inspect(args: argparse.Namespace) -> int:
    from stages.inspect import inspect_store

    print(inspect_store(args.store))
    return 0


def command_verify(args: argparse.Namespace) -> int:
    from stages.inspect import verify_store

    problems = verify_store(args.store)
    for problem in problems:
        logger.error("%s", problem)
    if problems:
        print(f"{args.store}: {len(problems)} problem{'s' if len(problems) != 1 else ''} found")
        return 1
    print(f"{args.store}: every shard matches the manifest")
    return 0


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="digits", help="class-per-folder directory, or 'digits' (embedded)")
    parser.add_argument(
        "--backbones", type=_comma_list, default=(),
        help="comma-separated backbone names; 'name@weights' picks other weights, such as 'resnet18@random' "
        "(default: efficientnet_lite0 and four torchvision backbones)",
    )
    parser.add_argument("--taps", type=_comma_list, default=("pre_logits",), help="comma-separated taps of every backbone")
    parser.add_argument("--heads", type=_comma_list, default=("logreg", "linear", "mlp"), help="comma-separated head names, from logreg, linear, mlp and knn")
    parser.add_argument("--include-random", action="store_true", help="also run every backbone with random weights")
    parser.add_argument("--download", action="store_true", help="download missing weights instead of skipping the backbone")
    parser.add_argument("--batch-size", type=_at_least(0), default=0, help="images per forward pass (0: 32 on CPU, 128 on CUDA)")
    parser.add_argument("--workers", type=_at_least(0), default=default_workers(), help="data-loading worker processes")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    add_split_arguments(parser)
    parser.add_argument("--features", default="data/features", help="folder of the feature stores")
    parser.add_argument("--results", default="data/results", help="folder of the head results")
    parser.add_argument("--output", default="data/bench", help="folder for the leaderboard files and timings")


def command_bench(args: argparse.Namespace) -> int:
    from stages.bench import DEFAULT_BENCH_BACKBONES, BenchSettings, run_bench
    from stages.leaderboard import markdown_table

    settings = BenchSettings(
        dataset=DatasetSettings(args.data, args.val_fraction, args.test_fraction, args.split_seed),
        backbones=args.backbones or DEFAULT_BENCH_BACKBONES,
        taps=args.taps,
        heads=args.heads,
        include_random=args.include_random,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        offline=not args.download,
        features_root=args.features,
        results_root=args.results,
        output=args.output,
    )
    rows = run_bench(settings)
    print(markdown_table(rows))
    return 0


def command_advise(args: argparse.Namespace) -> int:
    from stages.advise import format_advice, run_advice

    advice = run_advice(args.store, Path(args.results), args.sample, args.device, args.offline)
    print(format_advice(advice))
    return 0


def command_finetune(args: argparse.Namespace) -> int:
    from stages.finetune import FinetuneSettings, leaderboard_rows, run_finetune
    from stages.train_heads import format_table

    if args.store is None and args.data is None:
        raise ValueError("finetune needs --store STORE (reuses its dataset, split and backbone) or --data FOLDER.")
    settings = FinetuneSettings(
        store=args.store,
        dataset=DatasetSettings(args.data or "digits", args.val_fraction, args.test_fraction, args.split_seed),
        backbone=args.backbone,
        weights=args.weights,
        unfreeze=args.unfreeze,
        from_scratch=args.from_scratch,
        augment=args.augment,
        epochs=args.epochs,
        patience=args.patience,
        lr=args.lr,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        seed=args.seed,
        output_root=args.results,
        offline=args.offline,
    )
    row = run_finetune(settings)
    print(format_table(leaderboard_rows(Path(row["model_file"]).parents[1])))
    return 0


class _DefaultsHelpFormatter(argparse.HelpFormatter):
    """Append each option's default to its help, unless the help already states it or there is none to state."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default is None or default is False or default == argparse.SUPPRESS:
            return text
        if isinstance(action, argparse._StoreFalseAction):
            return text  # the flag turns something off, and its default of True only means that it is on
        default_text = ",".join(str(item) for item in default) if isinstance(default, (tuple, list)) else str(default)
        # argparse formats help strings with %, so a % in the default is doubled
        return f"{text} (default: {default_text.replace('%', '%%') or 'none'})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="featcache",
        description="Cache frozen-backbone features of an image dataset once (stage one), then train many heads on them (stage two).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    # -v also after the subcommand; SUPPRESS keeps a subcommand from resetting a -v given before it
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True)

    def add_command(name: str, **options) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=[verbose], formatter_class=_DefaultsHelpFormatter, **options)


    extract = add_command("extract", help="stage one: write the features of a dataset to a store")
    add_extract_arguments(extract)
    extract.add_argument("--virtual-view", action="store_true", help="also write store.h5, one HDF5 view of all shards")
    extract.set_defaults(handler=command_extract)

    heads = add_command("heads", help="stage two: train heads on a store and print the results")
    add_heads_arguments(heads)
    heads.set_defaults(handler=command_heads)

    demo = add_command("demo", help="both stages on the embedded digits with early to late taps")
    add_extract_arguments(demo)
    add_heads_arguments(demo)
    demo.set_defaults(handler=command_demo, taps=DEMO_TAPS)

    taps = add_command("taps", help="list the tap names of a backbone with their output shapes")
    taps.add_argument("backbone", nargs="?", default=DEFAULT_BACKBONE)
    taps.add_argument("--weights", default="random",
                      help="weights to build the backbone with; tap names and shapes do not depend on them, so "
                           "random weights, which need no download, are the default")
    taps.add_argument("--depth", type=_at_least(0), default=2, help="list layers up to this many dots deep")
    taps.add_argument("--offline", action="store_true")
    taps.set_defaults(handler=command_taps)

    inspect = add_command("inspect", help="describe a store: counts, taps, provenance, skipped files")
    inspect.add_argument("store", help="store folder")
    inspect.set_defaults(handler=command_inspect)

    verify = add_command("verify", help="check every shard of a store against its manifest (exit 1 on mismatch)")
    verify.add_argument("store", help="store folder")
    verify.set_defaults(handler=command_verify)

    bench = add_command("bench", help="compare backbones: speed, cost and head accuracy in one leaderboard")
    add_bench_arguments(bench)
    bench.set_defaults(handler=command_bench)

    virtual = add_command("virtual", help="write store.h5, one HDF5 virtual dataset view of a store's shards")
    virtual.add_argument("store", help="folder of a complete store")
    virtual.set_defaults(handler=command_virtual)

    finetune = add_command("finetune", help="fine-tuning baseline on the same splits and metrics as the heads")
    finetune.add_argument("--store", default=None, help="store whose dataset, split and backbone are reused")
    finetune.add_argument("--data", default=None, help="class-per-folder directory or 'digits', when no store is given")
    finetune.add_argument("--backbone", default=DEFAULT_BACKBONE, help="backbone, when no store is given")
    finetune.add_argument("--weights", default="default", help="weights, when no store is given")
    add_split_arguments(finetune)
    finetune.add_argument("--unfreeze", default="1", help="blocks to train, counted from the top (1, 2, ...), or 'all'")
    finetune.add_argument("--from-scratch", action="store_true", help="start from random weights and train every layer")
    finetune.add_argument("--augment", default="light", help="augmentation policy: none, flip, light or standard")
    finetune.add_argument("--epochs", type=_at_least(1), default=10, help="passes over the training images at most")
    finetune.add_argument("--patience", type=_at_least(1), default=3, help="epochs without a better val accuracy before stopping")
    finetune.add_argument("--lr", type=float, default=1e-3, help="learning rate of the new classifier (unfrozen layers: 0.1x)")
    finetune.add_argument("--batch-size", type=_at_least(1), default=16, help="images per optimizer step")
    finetune.add_argument("--workers", type=_at_least(0), default=2, help="data-loading worker processes (0: main process)")
    finetune.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    finetune.add_argument("--seed", type=int, default=0, help="seed of initialization, augmentation and batch order")
    finetune.add_argument("--results", default="data/results", help="folder that contains the results of each store")
    finetune.add_argument("--offline", action="store_true", help="never download weights")
    finetune.set_defaults(handler=command_finetune)

    advise = add_command("advise", help="recommend a transfer-learning strategy for a store, with reasons")
    advise.add_argument("store", help="store folder")
    advise.add_argument("--results", default="data/results", help="folder that contains the results of each store")
    advise.add_argument("--sample", type=_at_least(1), default=64, help="images on which the ImageNet classifier's confidence is measured")
    advise.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    advise.add_argument("--offline", action="store_true", help="never download weights")
    advise.set_defaults(handler=command_advise)
    return parser


def reported_errors() -> tuple[type[Exception], ...]:
    """Return the error types that main reports as one line with exit code 2 instead of a traceback."""
    from pipeline.settings import SettingsError
    from pipeline.store import StoreError

    errors: list[type[Exception]] = [SettingsError, StoreError, FileNotFoundError, ValueError]
    # pipeline.backbones imports torch, which costs seconds, so a cache hit must not import it here.
    # Its error can only be raised once a command has imported it.
    backbones = sys.modules.get("pipeline.backbones")
    if backbones is not None:
        errors.append(backbones.WeightsNotAvailableError)
    return tuple(errors)


def with_option_names(message: str, options: set[str]) -> str:
    """Write a settings field at the start of a "field=value" phrase as the command's option, where it has one.

    The settings classes name their fields ("val_fraction=1.5 is invalid"), and a command-line user
    knows the options ("--val-fraction=1.5 is invalid").
    """
    def option(match: re.Match) -> str:
        dashed = "--" + match.group(1).replace("_", "-")
        return f"{dashed}=" if dashed in options else match.group(0)

    return re.sub(r"(?<![\w.-])([a-z][a-z0-9_]*)=", option, message)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        # stage one keeps every shard it wrote and stage two every result it cached
        logger.error("Interrupted. The shards and results written so far are kept: rerun the same command to continue.")
        return 130
    except Exception as error:
        if not isinstance(error, reported_errors()):
            raise
        logger.error("%s", with_option_names(str(error), command_options(parser, args)))
        return 2


def command_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> set[str]:
    """Return the option strings of the subcommand that ``args`` ran."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                if command.get_default("handler") is args.handler:
                    return {name for item in command._actions for name in item.option_strings}
    return set()


if __name__ == "__main__":
    sys.exit(main())
