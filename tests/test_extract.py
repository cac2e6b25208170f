"""Stage one end to end with a tiny timm backbone: cache hits, rebuilds, bad input, workers, crashes."""

from __future__ import annotations

import errno
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

import pipeline.store
from pipeline.settings import DatasetSettings, ExtractSettings
from pipeline.store import FeatureStore, StoreError, read_manifest, rebuild_folder
from stages.extract import run_extraction
from stages.inspect import inspect_store, verify_store
from tests.conftest import COLOURS, write_colour_image

REPO = Path(__file__).resolve().parents[1]
BACKBONE = ("test_efficientnet", "random")
COLUMNS = ("label", "path", "split", "index", "mode", "orientation")


def settings_for(source: Path, output: Path, **changes) -> ExtractSettings:
    values = dict(
        dataset=DatasetSettings(str(source)),
        backbone=BACKBONE[0],
        weights=BACKBONE[1],
        workers=0,
        batch_size=4,
        shard_size=4,
        device="cpu",
        output_root=str(output),
    )
    values.update(changes)
    return ExtractSettings(**values)


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    """A dataset of 6 images in train/ and val/, small enough for several runs per test."""
    root = tmp_path / "tiny"
    for split, count in (("train", 2), ("val", 1)):
        for name, colour in (("red", (220, 30, 30)), ("blue", (30, 40, 220))):
            for item in range(count):
                write_colour_image(root / split / name / f"{name}_{item}.png", colour, item + 10 * len(split))
    return root


def store_arrays(folder: Path) -> dict[str, np.ndarray]:
    """Concatenate every column and tap of the shards the manifest lists, in shard order."""
    manifest = read_manifest(folder)
    parts: dict[str, list[np.ndarray]] = {}
    for entry in manifest["shards"]:
        with h5py.File(folder / entry["file"], "r") as handle:
            for column in COLUMNS:
                dataset = handle[column]
                values = dataset.asstr()[:] if h5py.check_string_dtype(dataset.dtype) else dataset[:]
                parts.setdefault(column, []).append(values)
            for tap in manifest["taps"]:
                if len(handle["features"][tap]):
                    parts.setdefault(f"features/{tap}", []).append(handle["features"][tap][:])
    return {name: np.concatenate(values) for name, values in parts.items()}


def assert_same_store(expected: Path, actual: Path) -> None:
    reference, result = store_arrays(expected), store_arrays(actual)
    assert sorted(result) == sorted(reference)
    for name, values in reference.items():
        np.testing.assert_array_equal(result[name], values, err_msg=name)


# ---------------------------------------------------------------------------------------------
# cache hits and rebuilds


def test_rerun_is_cache_hit(tiny_folder: Path, tmp_path: Path, monkeypatch, caplog) -> None:
    settings = settings_for(tiny_folder, tmp_path / "out")
    first = run_extraction(settings)

    def fail_build(settings):
        raise AssertionError("the backbone was built on a cache hit")

    monkeypatch.setattr("stages.extract._build_backbone", fail_build)
    with caplog.at_level(logging.INFO, logger="stages.extract"):
        second = run_extraction(settings)
    assert first.cache_hit is False
    assert first.extracted == 6
    assert second.cache_hit is True
    assert second.extracted == 0
    assert second.folder == first.folder
    assert "Cache hit" in caplog.text


def test_cli_cache_hit_skips_torch(tiny_folder: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    run_extraction(settings_for(tiny_folder, output))
    arguments = [
        "extract", "--data", str(tiny_folder), "--backbone", BACKBONE[0], "--weights", BACKBONE[1], "--workers", "0",
        "--output", str(output),
    ]
    # the rerun reports which heavy libraries it imported; CPU time, not wall time, because the
    # test machine may be shared
    probe = f"import sys; from pipeline.cli import main; main({arguments!r}); print(sorted({{'torch', 'h5py'}} & set(sys.modules)))"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    completed = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_seconds = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)

    assert completed.returncode == 0, completed.stderr
    assert "Cache hit" in completed.stderr
    assert "torch" not in completed.stdout.strip().splitlines()[-1]
    assert cpu_seconds < 2.0


def test_keyed_change_makes_new_store(tiny_folder: Path, tmp_path: Path) -> None:
    first = run_extraction(settings_for(tiny_folder, tmp_path / "out"))
    second = run_extraction(settings_for(tiny_folder, tmp_path / "out", dtype="float16"))
    assert second.cache_hit is False
    assert second.folder != first.folder
    assert verify_store(first.folder) == []


def test_force_rebuilds_same_features(tiny_folder: Path, tmp_path: Path) -> None:
    settings = settings_for(tiny_folder, tmp_path / "out")
    first = run_extraction(settings)
    saved = {name: values.copy() for name, values in store_arrays(first.folder).items()}
    forced = run_extraction(settings_for(tiny_folder, tmp_path / "out", force=True))
    assert forced.cache_hit is False
    assert forced.extracted == 6
    assert sorted(path.name for path in (tmp_path / "out").iterdir() if not path.name.startswith(".")) == [
        first.folder.name
    ]
    for name, values in saved.items():
        np.testing.assert_array_equal(store_arrays(forced.folder)[name], values, err_msg=name)


def test_fixed_name_replaced_by_new_key(tiny_folder: Path, tmp_path: Path) -> None:
    run_extraction(settings_for(tiny_folder, tmp_path / "out", name="fixed"))
    second = run_extraction(settings_for(tiny_folder, tmp_path / "out", name="fixed", dtype="float16"))
    assert read_manifest(second.folder)["dtype"] == "float16"
    assert verify_store(second.folder) == []
    assert not (tmp_path / "out" / "fixed.rebuild").exists()


# ---------------------------------------------------------------------------------------------
# bad and odd input


def write_odd_files(folder: Path) -> dict[str, str]:
    """Write one file of each odd kind into ``folder``; return file name -> original Pillow mode."""
    folder.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(3).integers(0, 256, (24, 30, 3), dtype=np.uint8)
    rgb = Image.fromarray(pixels)
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray((np.arange(24 * 30).reshape(24, 30) * 90).astype(np.uint16)).save(folder / "deep.png")
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    palette.save(folder / "palette.png", transparency=0)
    rgb.convert("RGBA").save(folder / "rgba.png")
    rgb.convert("L").save(folder / "grey.png")
    rgb.convert("1").save(folder / "bits.png")
    rgb.save(folder / "animated.gif", save_all=True, append_images=[rgb.rotate(90)], duration=40)
    rgb.save(folder / "photo.webp")
    rgb.save(folder / "photo.bmp")
    rgb.save(folder / "photo.tif")
    rgb.save(folder / "UPPER.JPG")
    rgb.save(folder / "progressive.jpg", progressive=True)
    Image.new("RGB", (1, 1), (200, 10, 10)).save(folder / "one.png")
    Image.new("RGB", (1, 2000), (10, 200, 10)).save(folder / "thin.png")
    exif = rgb.getexif()
    exif[0x0112] = 8
    rgb.save(folder / "rotated.jpg", exif=exif)
    rgb.save(folder / "été photo.png")
    return {
        "cmyk.jpg": "CMYK", "deep.png": "I;16", "palette.png": "P", "rgba.png": "RGBA", "grey.png": "L",
        "bits.png": "1", "animated.gif": "P", "photo.webp": "RGB", "photo.bmp": "RGB", "photo.tif": "RGB",
        "UPPER.JPG": "RGB", "progressive.jpg": "RGB", "one.png": "RGB", "thin.png": "RGB", "rotated.jpg": "RGB",
        "été photo.png": "RGB",
    }


def write_bad_files(folder: Path) -> None:
    pixels = np.random.default_rng(4).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "truncated.jpg", quality=95)
    (folder / "truncated.jpg").write_bytes((folder / "truncated.jpg").read_bytes()[:600])
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not a JPEG\n")
    Image.new("RGB", (300, 300), (1, 2, 3)).save(folder / "huge.png")


def make_messy_dataset(root: Path, with_bad: bool) -> dict[str, str]:
    modes = write_odd_files(root / "train" / "odd")
    if with_bad:
        write_bad_files(root / "train" / "odd")
    for item in range(3):
        write_colour_image(root / "train" / "plain" / f"{item}.png", (50, 60, 70), item)
        write_colour_image(root / "val" / "plain" / f"{item}.png", (50, 60, 70), item + 10)
        write_colour_image(root / "val" / "odd" / f"{item}.jpg", (150, 60, 70), item + 20)
    (root / "train" / "odd" / ".DS_Store").write_bytes(b"Bud1")
    (root / "train" / "odd" / "notes.txt").write_text("not an image")
    return modes


@pytest.mark.slow
def test_messy_folder_skips_and_aligns(tmp_path: Path) -> None:
    modes = make_messy_dataset(tmp_path / "messy", with_bad=True)
    make_messy_dataset(tmp_path / "clean", with_bad=False)
    options = dict(batch_size=1, shard_size=5, max_image_pixels=50_000)
    messy = run_extraction(settings_for(tmp_path / "messy", tmp_path / "out", **options))
    clean = run_extraction(settings_for(tmp_path / "clean", tmp_path / "out", **options))
    manifest = read_manifest(messy.folder)

    # skipped files listed with path and reason
    skipped = {item["path"]: item["reason"] for item in manifest["skipped"]}
    assert messy.skipped == 4
    assert sorted(skipped) == [f"train/odd/{name}" for name in ("huge.png", "text.jpg", "truncated.jpg", "zero.jpg")]
    assert "above the limit of 50000" in skipped["train/odd/huge.png"]
    assert "UnidentifiedImageError" in skipped["train/odd/zero.jpg"]

    # counts by original mode, and the EXIF rotation recorded
    expected_modes = {}
    for mode in list(modes.values()) + ["RGB"] * 3 + ["RGB"] * 6:
        expected_modes[mode] = expected_modes.get(mode, 0) + 1
    assert manifest["modes"] == dict(sorted(expected_modes.items()))
    assert manifest["exif_rotated"] == 1

    # labels, paths and features of the other samples stay aligned
    store, reference = FeatureStore(messy.folder), FeatureStore(clean.folder)
    paths = store.paths("train") + store.paths("val")
    assert paths == reference.paths("train") + reference.paths("val")
    assert "train/odd/été photo.png" in paths
    for split in ("train", "val"):
        features, labels = store.load(split, "pre_logits")
        expected_features, expected_labels = reference.load(split, "pre_logits")
        np.testing.assert_array_equal(labels, expected_labels)
        np.testing.assert_array_equal(features, expected_features)
        names = [store.class_names[label] for label in labels]
        assert names == [path.split("/")[1] for path in store.paths(split)]
    assert verify_store(messy.folder) == []


def test_every_file_failing_is_error(tmp_path: Path) -> None:
    for split in ("train", "val"):
        folder = tmp_path / "bad" / split / "only"
        folder.mkdir(parents=True)
        (folder / "zero.jpg").write_bytes(b"")
        (folder / "text.jpg").write_text("not an image")
    with pytest.raises(ValueError, match="Every one of the 4 images"):
        run_extraction(settings_for(tmp_path / "bad", tmp_path / "out"))


# ---------------------------------------------------------------------------------------------
# workers and write failures


def test_workers_match_single_process(tmp_path: Path) -> None:
    root = tmp_path / "twelve"
    for item in range(12):
        write_colour_image(root / "train" / ("a" if item % 2 else "b") / f"{item}.png", (90, 30, 30), item)
    single = run_extraction(settings_for(root, tmp_path / "one", workers=0))
    parallel = run_extraction(settings_for(root, tmp_path / "two", workers=2))
    assert_same_store(single.folder, parallel.folder)


def fail_with_full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "shard-00000.h5.tmp")


@pytest.mark.parametrize("change", [{"dtype": "float16"}, {"force": True}])
def test_full_disk_keeps_earlier_store(tiny_folder: Path, tmp_path: Path, monkeypatch, change: dict) -> None:
    earlier = run_extraction(settings_for(tiny_folder, tmp_path / "out"))
    manifest_before = (earlier.folder / "manifest.json").read_text()
    monkeypatch.setattr(pipeline.store, "write_shard_file", fail_with_full_disk)
    with pytest.raises(StoreError, match="No space left on device while writing shard-00000.h5.tmp"):
        run_extraction(settings_for(tiny_folder, tmp_path / "out", **change))
    assert (earlier.folder / "manifest.json").read_text() == manifest_before
    assert verify_store(earlier.folder) == []


def test_interrupted_force_rebuild_resumes(tiny_folder: Path, tmp_path: Path, monkeypatch, caplog) -> None:
    earlier = run_extraction(settings_for(tiny_folder, tmp_path / "out"))
    manifest_before = (earlier.folder / "manifest.json").read_text()
    write = pipeline.store.write_shard_file

    def fail_on_second_shard(folder, shard, *args, **kwargs):
        if shard == 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "shard-00001.h5.tmp")
        return write(folder, shard, *args, **kwargs)

    monkeypatch.setattr(pipeline.store, "write_shard_file", fail_on_second_shard)
    with pytest.raises(StoreError, match="No space left on device"):
        run_extraction(settings_for(tiny_folder, tmp_path / "out", force=True))
    assert (earlier.folder / "manifest.json").read_text() == manifest_before

    monkeypatch.setattr(pipeline.store, "write_shard_file", write)
    with pytest.raises(StoreError, match="with --force to resume it"):
        FeatureStore(rebuild_folder(earlier.folder))
    with caplog.at_level(logging.WARNING, logger="stages.extract"):
        assert run_extraction(settings_for(tiny_folder, tmp_path / "out")).cache_hit
    assert "unfinished replacement of this store" in caplog.text
    resumed = run_extraction(settings_for(tiny_folder, tmp_path / "out", force=True))
    assert resumed.folder == earlier.folder
    assert resumed.extracted == 2  # only the second shard's images: the first was kept
    assert verify_store(resumed.folder) == []
    assert not rebuild_folder(earlier.folder).exists()


def test_damaged_manifest_named_and_rebuilt(tiny_folder: Path, tmp_path: Path) -> None:
    earlier = run_extraction(settings_for(tiny_folder, tmp_path / "out"))
    (earlier.folder / "manifest.json").write_text("{\n  broken")
    with pytest.raises(StoreError, match="manifest .*manifest.json is damaged .*--force"):
        FeatureStore(earlier.folder)
    with pytest.raises(StoreError, match="is damaged"):
        run_extraction(settings_for(tiny_folder, tmp_path / "out"))
    rebuilt = run_extraction(settings_for(tiny_folder, tmp_path / "out", force=True))
    assert rebuilt.extracted == 6
    assert verify_store(rebuilt.folder) == []


def test_missing_shard_named_with_fix(tiny_folder: Path, tmp_path: Path) -> None:
    store = run_extraction(settings_for(tiny_folder, tmp_path / "out"))
    (store.folder / "shards" / "shard-00001.h5").unlink()
    with pytest.raises(StoreError, match="shard-00001.h5 of store .* is missing: run 'featcache verify"):
        FeatureStore(store.folder).load("train", "pre_logits")
    assert "1 shard files missing, such as shards/shard-00001.h5" in inspect_store(store.folder).splitlines()[0]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_unwritable_output_folder_chmod(tiny_folder: Path, tmp_path: Path) -> None:
    output = tmp_path / "locked"
    output.mkdir()
    output.chmod(0o555)
    try:
        with pytest.raises(StoreError, match="pass a writable --output folder"):
            run_extraction(settings_for(tiny_folder, output))
    finally:
        output.chmod(0o755)


def test_unwritable_output_folder_message(tiny_folder: Path, tmp_path: Path, monkeypatch) -> None:
    def deny(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))

    monkeypatch.setattr(Path, "mkdir", deny)
    with pytest.raises(StoreError, match="Permission denied.*pass a writable --output folder"):
        run_extraction(settings_for(tiny_folder, tmp_path / "out"))


# ---------------------------------------------------------------------------------------------
# kill -9 at several points, then resume


def run_until_shards(command: list[str], shards: Path, count: int, delay: float) -> int:
    """Start the command, SIGKILL it once ``count`` shard files exist plus ``delay`` seconds; return its code."""
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        if shards.is_dir() and len(list(shards.glob("*.h5"))) >= count:
            time.sleep(delay)
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    code = process.wait()
    written = len(list(shards.glob("*.h5"))) if shards.is_dir() else 0
    assert code == -signal.SIGKILL, f"extraction ended with code {code} before the kill at {count} shards ({written} written)"
    return written


def many_colours(root: Path, per_class: int) -> Path:
    """Write a class-per-folder dataset of 3 classes with ``per_class`` train images each, all 16 x 16 PNGs."""
    seed = 0
    for name, colour in COLOURS.items():
        for item in range(per_class):
            seed += 1
            write_colour_image(root / "train" / name / f"{name}_{item:03d}.png", colour, seed, size=(16, 16))
    return root


def two_image_shards_command(source: Path, output: Path, workers: int) -> list[str]:
    """Return the extract command line that writes ``source`` into ``output/store`` in shards of 2 images."""
    return [
        sys.executable, "-m", "pipeline", "extract", "--data", str(source), "--backbone", BACKBONE[0],
        "--weights", BACKBONE[1], "--workers", str(workers), "--device", "cpu", "--shard-size", "2", "--batch-size", "2",
        "--output", str(output), "--name", "store",
    ]


@pytest.mark.slow
def test_kill_resume_matches_uninterrupted(tmp_path: Path) -> None:
    # 240 images make 120 shards. Each kill point below leaves about 60 shards unwritten.
    # That is about a second of work here, so a killed run stays incomplete.
    source = many_colours(tmp_path / "colours", per_class=80)
    options = dict(shard_size=2, batch_size=2)
    reference = run_extraction(settings_for(source, tmp_path / "reference", **options))
    output = tmp_path / "killed"
    command = two_image_shards_command(source, output, workers=0)
    shards = output / "store" / "shards"

    # after the first shard, after some more, and between two shard writes
    for count, delay in ((1, 0.0), (30, 0.0), (60, 0.02)):
        written = run_until_shards(command, shards, count, delay)
        assert count <= written < 120
        assert read_manifest(output / "store")["complete"] is False
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert completed.returncode == 0, completed.stderr
    assert "Resuming store" in completed.stderr

    assert verify_store(output / "store") == []
    assert_same_store(reference.folder, output / "store")
    manifest = json.loads((output / "store" / "manifest.json").read_text())
    assert manifest["complete"] is True


@pytest.mark.slow
def test_interrupt_then_resume(tmp_path: Path) -> None:
    source = many_colours(tmp_path / "colours", per_class=80)
    output = tmp_path / "out"
    command = two_image_shards_command(source, output, workers=1)
    shards = output / "store" / "shards"
    # A shell's background job, as CI may run the suite in, ignores SIGINT, and the child would
    # inherit that. The child gets the default disposition back, as in a terminal.
    process = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline and len(list(shards.glob("*.h5"))) < 10:
        time.sleep(0.005)
    process.send_signal(signal.SIGINT)  # what Ctrl-C sends
    _, stderr = process.communicate(timeout=60)

    assert process.returncode == 130, stderr
    assert "Interrupted. The shards and results written so far are kept" in stderr
    assert "Traceback" not in stderr
    assert read_manifest(output / "store")["complete"] is False
    written = len(list(shards.glob("*.h5")))
    assert 10 <= written < 120

    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert completed.returncode == 0, completed.stderr
    assert "Resuming store" in completed.stderr
    assert verify_store(output / "store") == []
    assert read_manifest(output / "store")["complete"] is True


@pytest.mark.real_data
def test_hymenoptera_odd_files_extract(shared_datasets: Path, tmp_path: Path) -> None:
    ants = shared_datasets / "hymenoptera_data" / "train" / "ants"
    bees = shared_datasets / "hymenoptera_data" / "train" / "bees"
    bee_files = sorted(bees.glob("*.jpg"))[:2]
    rows = ["path,label,split", f"{ants / 'imageNotFound.gif'},ants,train", f"{ants / 'ant photos.jpg'},ants,train"]
    rows += [f"{path},bees,train" for path in bee_files]
    csv_path = tmp_path / "odd.csv"
    csv_path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    result = run_extraction(settings_for(csv_path, tmp_path / "out"))
    store = FeatureStore(result.folder)
    paths = store.paths("train")
    assert result.skipped == 0
    assert str(ants / "imageNotFound.gif") in paths
    assert str(ants / "ant photos.jpg") in paths
    assert read_manifest(result.folder)["modes"]["P"] == 1


def test_cache_hit_makes_store_the_latest(colour_folder, tmp_path):
    """make extract DATA=a; make extract DATA=b; make extract DATA=a (cache hit); make heads: trains on a."""
    import shutil

    from pipeline.store import LAST_USED, latest_store

    other = tmp_path / "other" / "shades"
    shutil.copytree(colour_folder, other)
    output = tmp_path / "features"
    first = run_extraction(settings_for(colour_folder, output))
    second = run_extraction(settings_for(other, output))
    assert second.folder != first.folder
    assert latest_store(output) == second.folder
    again = run_extraction(settings_for(colour_folder, output))
    assert again.cache_hit
    assert (first.folder / LAST_USED).exists()
    assert latest_store(output) == first.folder


@pytest.mark.parametrize("content", ["[]", "{}", '{"key": 5, "shards": [], "shard_size": 4}'])
def test_manifest_of_wrong_shape_named(tiny_folder: Path, tmp_path: Path, content: str) -> None:
    earlier = run_extraction(settings_for(tiny_folder, tmp_path / "out"))
    (earlier.folder / "manifest.json").write_text(content)
    with pytest.raises(StoreError, match="manifest .* is damaged .*--force"):
        FeatureStore(earlier.folder)
    with pytest.raises(StoreError, match="is damaged"):
        verify_store(earlier.folder)
    with pytest.raises(StoreError, match="is damaged"):
        run_extraction(settings_for(tiny_folder, tmp_path / "out"))
