"""Benchmark: K linear heads trained together as one batched computation vs K separate trainings.

Prints the seconds of both and the speed-up. Every head runs the same number of epochs (early
stopping off), so both sides do the same arithmetic. Run from the repository root:

    python benchmarks/batched_linear.py --heads 16 --samples 2000 --dim 512 --epochs 10
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.batched import LinearSetting, train_linear_grid  # noqa: E402
from stages.heads import LinearHead  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=16, help="number of linear heads K (a lr x weight decay grid)")
    parser.add_argument("--samples", type=int, default=2000, help="train samples")
    parser.add_argument("--dim", type=int, default=512, help="feature dimension")
    parser.add_argument("--classes", type=int, default=10, help="number of classes")
    parser.add_argument("--epochs", type=int, default=10, help="epochs per head")
    parser.add_argument("--batch-size", type=int, default=256, help="samples per batch")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rng = np.random.default_rng(0)
    labels = rng.integers(0, args.classes, size=args.samples)
    centres = rng.normal(0, 1, size=(args.classes, args.dim))
    features = (centres[labels] + rng.normal(0, 2, size=(args.samples, args.dim))).astype(np.float32)
    rates = np.logspace(-4, -1, 4)
    decays = np.logspace(-5, -1, int(np.ceil(args.heads / 4)))
    settings = [LinearSetting("tap", float(lr), float(wd)) for lr, wd in itertools.product(rates, decays)][: args.heads]
    options = {"epochs": args.epochs, "batch_size": args.batch_size, "seed": 0}

    started = time.perf_counter()
    train_linear_grid({"tap": features}, labels, settings, **options)
    together = time.perf_counter() - started

    started = time.perf_counter()
    for setting in settings:
        LinearHead(lr=setting.lr, weight_decay=setting.weight_decay, **options).fit(features, labels)
    separate = time.perf_counter() - started

    print(f"K={len(settings)} heads, {args.samples} samples x {args.dim} features, {args.classes} classes, "
          f"{args.epochs} epochs, batch {args.batch_size}, {args.threads} torch thread(s)")
    print(f"together: {together:.2f} s   separate: {separate:.2f} s   speed-up: {separate / together:.1f}x")


if __name__ == "__main__":
    main()
