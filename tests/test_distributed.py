"""Distributed stage one: torchrun's environment, the process group, and torchrun runs against one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from conftest import COLOURS, write_colour_image
from pipeline.distributed import (
    TIMEOUT_VARIABLE,
    TORCHRUN_VARIABLES,
    DistributedContext,
    is_main_process,
    read_timeout,
    select_backend,
    start_distributed,
)
from pipeline.rank_records import record_path
from pipeline.settings import SettingsError
from pipeline.store import FeatureStore, read_manifest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_context_owns_round_robin_shards():
    context = DistributedContext(rank=1, world_size=3)

    assert context.owned_shards(8) == [1, 4, 7]
    assert context.owns_shard(4)
    assert not context.owns_shard(5)


def test_single_process_without_torchrun(no_torchrun):
    context = start_distributed("cpu")

    assert not context.is_distributed
    assert context.is_main
    assert context.device == "cpu"
    context.barrier()  # returns at once without a process group
    context.check_same("any value", "values")


def test_partial_torchrun_environment_raises(no_torchrun, monkeypatch):
    monkeypatch.setenv("RANK", "0")

    with pytest.raises(SettingsError, match="WORLD_SIZE"):
        start_distributed("cpu")


def test_select_backend_cpu_is_gloo():
    assert select_backend("cpu", 0) == ("gloo", "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto picks nccl when a GPU is present")
def test_select_backend_auto_without_gpu_is_gloo():
    assert select_backend("auto", 0) == ("gloo", "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_select_backend_cuda_without_gpu_raises():
    with pytest.raises(SettingsError, match="no CUDA GPU"):
        select_backend("cuda", 0)


def test_select_backend_unknown_device_raises():
    with pytest.raises(SettingsError, match="'tpu' is invalid"):
        select_backend("tpu", 0)


@pytest.mark.parametrize("text", ["soon", "-5", "0"])
def test_timeout_invalid_value_raises(monkeypatch, text):
    monkeypatch.setenv(TIMEOUT_VARIABLE, text)

    with pytest.raises(SettingsError, match=TIMEOUT_VARIABLE):
        read_timeout()


def test_timeout_reads_seconds(monkeypatch):
    monkeypatch.setenv(TIMEOUT_VARIABLE, "90")

    assert read_timeout() == timedelta(seconds=90)


def test_is_main_process_reads_rank(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert not is_main_process()
    monkeypatch.setenv("RANK", "0")
    assert is_main_process()


def test_gloo_group_of_one_joins_and_closes(gloo_group_of_one):
    context = gloo_group_of_one

    assert context.is_distributed
    assert context.backend == "gloo"
    assert dist.get_world_size() == 1
    context.barrier()
    context.check_same("same key", "cache keys")
    context.close()
    assert not dist.is_initialized()


def test_joined_group_is_reused_and_left_open(gloo_group_of_one):
    reused = start_distributed("cpu")

    assert not reused.owns_group
    reused.close()
    assert dist.is_initialized()


def run_two_rank_checks(rank: int, port: int, folder: str) -> None:
    """Join a two-rank gloo group as ``rank``, then record what main_first and check_same did in ``folder``."""
    os.environ.update(
        {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    )
    context = start_distributed("cpu")
    marker = Path(folder) / "rank-0-done"
    try:
        with context.main_first():
            if rank == 0:
                time.sleep(0.5)  # give rank 1 the chance to run first if main_first did not hold it back
                marker.touch()
            else:
                (Path(folder) / "rank-1-saw-marker").write_text(str(marker.exists()))
        try:
            context.check_same(f"key-{rank}", "cache keys")
        except RuntimeError as error:
            (Path(folder) / f"rank-{rank}-error").write_text(str(error))
    finally:
        context.close()


@pytest.mark.slow
def test_two_ranks_main_first_and_key_check(tmp_path):
    from conftest import free_loopback_port

    torch.multiprocessing.spawn(run_two_rank_checks, args=(free_loopback_port(), str(tmp_path)), nprocs=2)

    assert (tmp_path / "rank-1-saw-marker").read_text() == "True"
    for rank in (0, 1):
        assert "rank 0: key-0, rank 1: key-1" in (tmp_path / f"rank-{rank}-error").read_text()


# torchrun against one process: real subprocesses on loopback, so these are slow


def make_colour_images(root: Path, count: int) -> Path:
    names = list(COLOURS)
    for item in range(count):
        name = names[item % len(names)]
        split = "val" if item % 4 == 3 else "train"
        write_colour_image(root / split / name / f"{name}_{item:02d}.png", COLOURS[name], seed=item)
    return root


def run_environment() -> dict[str, str]:
    """One thread per process, so one process and each rank run the same CPU kernels and match bitwise."""
    environment = {name: value for name, value in os.environ.items() if name not in TORCHRUN_VARIABLES}
    environment["PYTHONPATH"] = str(REPO_ROOT)
    environment["OMP_NUM_THREADS"] = "1"
    return environment


def extract_command(data: Path, output: Path, options: list[str], ranks: int = 0) -> list[str]:
    launcher = [sys.executable, "-m", "pipeline"]
    if ranks:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), "-m", "pipeline"]
    return launcher + ["extract", "--data", str(data), "--output", str(output), "--name", "store", "--device", "cpu", "--workers", "0", *options]


def run_extract(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=run_environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def extract_in_process(data: Path, output: Path, **options) -> Path:
    """Extract with one thread, as each rank does, and return the store folder."""
    from pipeline.settings import DatasetSettings, ExtractSettings
    from stages.extract import run_extraction

    settings = ExtractSettings(
        dataset=DatasetSettings(str(data)), output_root=str(output), name="store", device="cpu", workers=0, **options
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_extraction(settings).folder
    finally:
        torch.set_num_threads(threads)


def shard_listing(folder: Path) -> list[tuple[int, int, str]]:
    return [(entry["shard"], entry["count"], entry["sha256"]) for entry in read_manifest(folder)["shards"]]


def assert_same_store(expected: Path, actual: Path, taps: list[str]) -> None:
    """Compare two stores: the same shard files byte for byte, and the same arrays when read."""
    assert shard_listing(actual) == shard_listing(expected)
    reference, other = FeatureStore(expected), FeatureStore(actual)
    for split in reference.splits():
        assert other.paths(split) == reference.paths(split)
        for tap in taps:
            expected_features, expected_labels = reference.load(split, tap)
            features, labels = other.load(split, tap)
            assert np.array_equal(features, expected_features), f"{split}/{tap} features differ"
            assert np.array_equal(labels, expected_labels), f"{split} labels differ"


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process(tmp_path):
    data = make_colour_images(tmp_path / "colours", 16)
    options = ["--backbone", "test_efficientnet", "--weights", "random", "--taps", "pre_logits,blocks.3", "--shard-size", "4", "--batch-size", "4"]

    extract_in_process(
        data, tmp_path / "single", backbone="test_efficientnet", weights="random", taps=("pre_logits", "blocks.3"), shard_size=4, batch_size=4
    )
    result = run_extract(extract_command(data, tmp_path / "ranks", options + ["--virtual-view"], ranks=2), tmp_path)

    store = tmp_path / "ranks" / "store"
    assert result.stdout.split() == [str(store)]  # rank 0 alone prints the store folder
    assert read_manifest(store)["complete"]
    assert read_manifest(store)["world_size"] == 2
    assert not (store / "ranks").exists()
    assert_same_store(tmp_path / "single" / "store", store, ["pre_logits", "blocks.3"])

    # stage two reads the multi-rank store like any other
    from pipeline.settings import HeadSettings
    from stages.train_heads import run_heads

    rows = {}
    for name in ("single", "ranks"):
        settings = HeadSettings(store=str(tmp_path / name / "store"), heads=("logreg",), output_root=str(tmp_path / f"results-{name}"))
        rows[name] = [(row["tap"], row["val_accuracy"], row["accuracy"]) for row in run_heads(settings)]
    assert rows["ranks"] == rows["single"]

    # the virtual view written by --virtual-view reads as the store in plain h5py
    import h5py

    with h5py.File(store / "store.h5", "r") as handle:
        assert np.array_equal(handle["features/pre_logits"][:], FeatureStore(store).features("pre_logits"))


def process_children(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(child) for child in (task / "children").read_text().split()]
    return children


def find_rank_process(launcher: int, rank: int) -> int | None:
    """Return the pid of torchrun's worker process with RANK=rank, searching the launcher's descendants."""
    pending = [launcher]
    while pending:
        pid = pending.pop()
        try:
            environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            pending += process_children(pid)
        except (FileNotFoundError, ProcessLookupError):
            continue
        if f"RANK={rank}".encode() in environment and pid != launcher:
            return pid
    return None


def recorded_shards(path: Path) -> list[dict]:
    try:
        return json.loads(path.read_text())["shards"]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


@pytest.mark.slow
@pytest.mark.skipif(
    not Path(f"/proc/self/task/{os.getpid()}/children").exists(), reason="finds torchrun's worker processes through /proc"
)
def test_torchrun_resume_after_killed_rank(tmp_path):
    data = make_colour_images(tmp_path / "colours", 16)
    options = ["--backbone", "efficientnet_lite0", "--shard-size", "2", "--batch-size", "2"]
    store = tmp_path / "ranks" / "store"
    command = extract_command(data, tmp_path / "ranks", options, ranks=2)
    extract_in_process(data, tmp_path / "single", backbone="efficientnet_lite0", shard_size=2, batch_size=2)

    # kill rank 1 once it has recorded its first shard; torchrun then stops rank 0 too
    with open(tmp_path / "killed.log", "w") as log:
        launcher = subprocess.Popen(command, cwd=tmp_path, env=run_environment(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while not recorded_shards(record_path(store, 1)):
            assert launcher.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "rank 1 recorded no shard within 240 s"
            time.sleep(0.005)
        rank_process = find_rank_process(launcher.pid, 1)
        assert rank_process is not None, "rank 1 has no process left to kill"
        os.kill(rank_process, signal.SIGKILL)
        returncode = launcher.wait(timeout=120)

    assert returncode != 0
    assert not read_manifest(store)["complete"]
    done = {entry["shard"]: entry["file"] for rank in (0, 1) for entry in recorded_shards(record_path(store, rank))}
    assert 1 <= len(done) < 8
    written = {shard: (store / file).stat().st_mtime_ns for shard, file in done.items()}

    # rerun the same command: it resumes, skipping the shards either rank recorded
    run_extract(command, tmp_path)

    assert read_manifest(store)["complete"]
    assert {shard: (store / file).stat().st_mtime_ns for shard, file in done.items()} == written
    assert_same_store(tmp_path / "single" / "store", store, ["pre_logits"])
