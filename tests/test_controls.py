"""Tests of stages.controls: pixels read from the dataset, and the random-weights store."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.store import FeatureStore, StoreError
from stages.controls import pixel_tap_data, store_tap_data
from tests.synthetic_store import write_store


def test_pixels_are_read_and_downscaled(tmp_path):
    store = FeatureStore(write_store(tmp_path / "store", image_root=tmp_path / "images"))
    data = pixel_tap_data(store, size=4)
    first_path = store.paths("train")[0]
    expected = np.asarray(Image.open(tmp_path / "images" / first_path).convert("RGB").resize((4, 4), Image.Resampling.BILINEAR))
    assert data.X_train.shape == (90, 48)
    assert data.X_test.shape == (45, 48)
    np.testing.assert_allclose(data.X_train[0], expected.ravel() / 255.0, atol=1e-6)
    np.testing.assert_array_equal(data.y_val, store.load_labels("val"))

    # every row contains its own image
    every = np.stack([
        np.asarray(Image.open(tmp_path / "images" / path).convert("RGB").resize((4, 4), Image.Resampling.BILINEAR)).ravel()
        for path in store.paths("train")
    ]) / 255.0
    np.testing.assert_allclose(data.X_train, every, atol=1e-6)


def test_pixels_of_large_jpegs(tmp_path):
    from pipeline.devices import available_cpus
    from stages.controls import threads_pay_off

    store = FeatureStore(write_store(tmp_path / "store", image_root=tmp_path / "images", counts={"train": 24, "test": 12},
                                     image_size=(320, 256), image_format="jpg"))
    small = FeatureStore(write_store(tmp_path / "small", image_root=tmp_path / "small-images"))
    assert threads_pay_off(tmp_path / "images", store.paths("train")) == (available_cpus() > 1)
    assert not threads_pay_off(tmp_path / "small-images", small.paths("train"))

    data = pixel_tap_data(store, size=16)
    assert data.X_train.shape == (24, 768)

    def full_decode(path: str) -> np.ndarray:
        with Image.open(tmp_path / "images" / path) as image:
            return np.asarray(image.convert("RGB").resize((16, 16), Image.Resampling.BILINEAR)).ravel() / 255.0

    def draft_decode(path: str) -> np.ndarray:
        with Image.open(tmp_path / "images" / path) as image:
            image.draft("RGB", (16, 16))
            assert image.size == (40, 32)  # decoded at 1/8 scale
            return np.asarray(image.convert("RGB").resize((16, 16), Image.Resampling.BILINEAR)).ravel() / 255.0

    # each row contains its own image, decoded at 1/8 scale, and close to a full decode
    np.testing.assert_allclose(data.X_train, np.stack([draft_decode(path) for path in store.paths("train")]), atol=1e-6)
    full = np.stack([full_decode(path) for path in store.paths("train")])
    assert np.abs(data.X_train - full).mean() < 0.03


def test_pixels_without_images_raise(tmp_path):
    store = FeatureStore(write_store(tmp_path / "store"))
    store.manifest["dataset_root"] = str(tmp_path / "gone")
    with pytest.raises(StoreError, match="dataset_root"):
        pixel_tap_data(store, size=4)


def test_store_tap_data_groups_by_index(tmp_path):
    store = FeatureStore(write_store(tmp_path / "store"))
    data = store_tap_data(store, "early")
    np.testing.assert_array_equal(data.groups, store.indices("train"))
    assert data.X_val.shape == (45, 6)


@pytest.mark.slow
def test_random_weights_control_runs_stage_one(colour_folder, in_tmp):
    import torch

    from pipeline.backbones import build_backbone
    from pipeline.settings import DatasetSettings, ExtractSettings, HeadSettings
    from stages.controls import random_weights_store
    from stages.extract import run_extraction
    from stages.train_heads import run_heads

    # a 'trained' checkpoint: the random initialization, perturbed, so that it differs from the control
    generator = torch.Generator().manual_seed(1)
    state = {name: value + 0.05 * torch.randn(value.shape, generator=generator) if value.is_floating_point() else value
             for name, value in build_backbone("test_resnet", "random").model.state_dict().items()}
    torch.save(state, in_tmp / "trained.pt")
    settings = ExtractSettings(dataset=DatasetSettings(str(colour_folder)), backbone="test_resnet",
                               checkpoint=str(in_tmp / "trained.pt"), taps=("pre_logits",), workers=0, batch_size=8,
                               device="cpu", name="trained")
    store = FeatureStore(run_extraction(settings).folder)

    control = random_weights_store(store)
    again = random_weights_store(store)
    assert control.folder != store.folder
    assert again.folder == control.folder
    assert control.provenance["weights"] == "random"
    assert control.taps == store.taps

    results = run_heads(HeadSettings(store=str(store.folder), heads=("logreg",), controls=("random",), output_root="results"))
    assert [result["control"] for result in results] == [None, "random weights"]
    assert results[1]["control_store"] == str(control.folder)


@pytest.mark.slow
@pytest.mark.real_data
def test_pixels_control_on_real_photos(shared_datasets, in_tmp):
    from pipeline.settings import DatasetSettings, ExtractSettings, HeadSettings
    from stages.extract import run_extraction
    from stages.train_heads import run_heads

    settings = ExtractSettings(dataset=DatasetSettings(str(shared_datasets / "hymenoptera_data")), backbone="test_resnet",
                               weights="random", taps=("pre_logits",), workers=0, batch_size=16, device="cpu")
    store = FeatureStore(run_extraction(settings).folder)
    data = pixel_tap_data(store, size=8)
    assert data.X_train.shape == (len(store.paths("train")), 192)
    assert data.X_val.shape == (153, 192)
    assert "ants/ant photos.jpg" in [path.split("train/", 1)[-1] for path in store.paths("train")]

    results = run_heads(HeadSettings(store=str(store.folder), heads=("logreg",), controls=("majority", "pixels"),
                                     pixel_size=8, output_root="results"))
    pixels = next(result for result in results if result["control"] == "pixels")
    majority = next(result for result in results if result["control"] == "majority")
    assert pixels["eval_split"] == "val"
    assert pixels["accuracy"] > majority["accuracy"] - 0.1
