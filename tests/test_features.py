"""The feature cache: built once with a progress bar, reused, resumed, keyed, tolerant of bad files.

A small convolutional trunk stands in for the pretrained CNN so that each build takes a fraction
of a second; the cache treats every ImageEncoder alike. The photographs are real Flickr8k ones.
"""

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from shared_data import DATA
from torch import nn

import torch_lstmcap.features as features_module
from torch_lstmcap.encoder import ImageEncoder, Preprocessing, load_image, preprocess
from torch_lstmcap.features import build_feature_cache, cache_key, default_cache_dir

FLICKR8K_PHOTOS = DATA / "flickr8k" / "Flicker8k_Dataset"

pytestmark = pytest.mark.skipif(
    not FLICKR8K_PHOTOS.is_dir(),
    reason=f"Flickr8k photographs not found under {DATA} (set LSTMCAP_DATA)",
)


def small_encoder(image_size: int = 32, weights_id: str = "seed-0") -> ImageEncoder:
    """An ImageEncoder with a two-layer trunk: (N, 3, S, S) -> (N, 8, h, w), pooled to (N, 8)."""
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 8, 3))
    return ImageEncoder("small-cnn", trunk, 8, Preprocessing(image_size), weights_id).eval()


def count_encoded(encoder: ImageEncoder) -> list[int]:
    """Batch sizes of every forward call of ``encoder`` from now on."""
    batch_sizes = []
    encoder.register_forward_hook(lambda module, inputs, output: batch_sizes.append(len(output)))
    return batch_sizes


@pytest.fixture(scope="module")
def photos() -> list[Path]:
    return sorted(FLICKR8K_PHOTOS.glob("*.jpg"))[:11]


def test_build_shows_progress_and_stores_each_images_features(tmp_path, photos, capsys, caplog):
    encoder = small_encoder()
    with caplog.at_level(logging.INFO, logger="torch_lstmcap.features"):
        cache = build_feature_cache(encoder, photos, tmp_path, batch_size=4, num_workers=1)

    bar = capsys.readouterr().err
    assert "features" in bar and f"{len(photos)}/{len(photos)}" in bar
    assert cache.features.shape == (len(photos), 8)
    assert cache.failed == {}
    assert cache.path.parent == tmp_path and cache.path.suffix == ".npy"
    assert any(f"{len(photos)} images encoded" in message for message in caplog.messages)
    with torch.inference_mode():
        for index in (0, 5, len(photos) - 1):
            # Loaded as the cache loads it: a JPEG far larger than the input decodes reduced.
            image = load_image(photos[index], min_side=encoder.preprocessing.image_size)
            pixels = preprocess(image, encoder.preprocessing)
            expected = encoder(pixels.unsqueeze(0))[0].numpy()
            np.testing.assert_allclose(cache.features[index], expected, rtol=1e-4, atol=1e-5)


def test_second_build_reuses_the_cache_without_encoding(tmp_path, photos):
    first = build_feature_cache(small_encoder(), photos, tmp_path, batch_size=4, progress=False)
    encoder = small_encoder()
    encoded = count_encoded(encoder)

    second = build_feature_cache(encoder, photos, tmp_path, batch_size=4, progress=False)

    assert encoded == []
    assert second.path == first.path
    np.testing.assert_array_equal(second.features, first.features)


def test_key_follows_encoder_weights_preprocessing_and_image_list(tmp_path, photos):
    encoder = small_encoder()
    key = cache_key(encoder, photos)

    # The same images named by a relative path are the same images.
    relative = [Path(os.path.relpath(path)) for path in photos]
    assert cache_key(encoder, relative) == key
    assert cache_key(small_encoder(), photos) == key

    changed = {
        "image order": cache_key(encoder, photos[::-1]),
        "one image fewer": cache_key(encoder, photos[:-1]),
        "image size": cache_key(small_encoder(image_size=48), photos),
        "weights": cache_key(small_encoder(weights_id="seed-1"), photos),
    }
    normalised = small_encoder()
    normalised.preprocessing = Preprocessing(32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    changed["normalisation"] = cache_key(normalised, photos)
    assert all(other != key for other in changed.values()), changed
    assert len(set(changed.values())) == len(changed)

    small = build_feature_cache(encoder, photos[:3], tmp_path, progress=False)
    other = build_feature_cache(normalised, photos[:3], tmp_path, progress=False)
    assert small.path != other.path
    assert not np.array_equal(small.features, other.features)


def test_interrupted_build_resumes_with_the_unfinished_images(tmp_path, photos, monkeypatch):
    batch_size = 4
    real_batches = features_module.iter_image_batches

    def two_batches_then_interrupt(*args, **kwargs):
        for count, batch in enumerate(real_batches(*args, **kwargs)):
            if count == 2:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(features_module, "iter_image_batches", two_batches_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        build_feature_cache(small_encoder(), photos, tmp_path, batch_size, progress=False)
    progress_files = list(tmp_path.glob("*.json"))
    assert len(progress_files) == 1
    assert json.loads(progress_files[0].read_text())["done"] == 2 * batch_size

    monkeypatch.setattr(features_module, "iter_image_batches", real_batches)
    encoder = small_encoder()
    encoded = count_encoded(encoder)
    resumed = build_feature_cache(encoder, photos, tmp_path, batch_size, progress=False)
    assert sum(encoded) == len(photos) - 2 * batch_size

    scratch = build_feature_cache(
        small_encoder(), photos, tmp_path / "scratch", batch_size, progress=False
    )
    np.testing.assert_array_equal(resumed.features, scratch.features)
    assert not (resumed.features == 0).all(axis=1).any()


def test_unreadable_photo_is_recorded_as_failed_and_zeroed(tmp_path, photos, caplog):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"this is not a JPEG file")
    images = [photos[0], broken, photos[1]]

    with caplog.at_level(logging.WARNING, logger="torch_lstmcap.features"):
        cache = build_feature_cache(small_encoder(), images, tmp_path, progress=False)

    assert list(cache.failed) == [1]
    assert "broken.jpg" in cache.failed[1]
    assert any("broken.jpg" in message for message in caplog.messages)
    assert not cache.features[1].any()
    assert cache.features[0].any() and cache.features[2].any()
    # A reused cache still knows which image failed.
    again = build_feature_cache(small_encoder(), images, tmp_path, progress=False)
    assert again.failed == cache.failed


def test_a_photograph_replaced_in_place_is_read_again(tmp_path, photos):
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"this is not a JPEG file")
    images = [photos[0], photo]
    before = build_feature_cache(small_encoder(), images, tmp_path, progress=False)
    assert list(before.failed) == [1]

    shutil.copyfile(photos[1], photo)
    after = build_feature_cache(small_encoder(), images, tmp_path, progress=False)

    assert after.failed == {} and after.path != before.path
    reference = build_feature_cache(small_encoder(), photos[:2], tmp_path, progress=False)
    np.testing.assert_array_equal(after.features, reference.features)


def test_damaged_array_is_rebuilt(tmp_path, photos):
    cache = build_feature_cache(small_encoder(), photos[:3], tmp_path, progress=False)
    expected = np.array(cache.features)
    cache.path.write_bytes(b"truncated")

    rebuilt = build_feature_cache(small_encoder(), photos[:3], tmp_path, progress=False)

    np.testing.assert_array_equal(rebuilt.features, expected)


def test_cache_folder_defaults_to_lstmcap_cache(tmp_path, photos, monkeypatch):
    monkeypatch.setenv("LSTMCAP_CACHE", str(tmp_path / "env-cache"))
    assert default_cache_dir() == tmp_path / "env-cache"

    cache = build_feature_cache(small_encoder(), photos[:2], progress=False)

    assert cache.path.parent == tmp_path / "env-cache"
