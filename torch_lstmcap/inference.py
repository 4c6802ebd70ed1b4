"""Photographs in, sentences out: a checkpoint and its encoder, ready to caption files.

    captioner = ImageCaptioner.from_checkpoint(default_checkpoint_path())
    for result in captioner.caption_files(["dog.jpg", "beach.png"]):
        print(result.image, result.captions[0].text)

Only torch, PIL, safetensors and the encoder's own package are imported on this path, so a
single photograph is captioned a few seconds after Python starts.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import Checkpoint, CheckpointError, load_checkpoint
from .decoding import DEFAULT_LENGTH_PENALTY, beam_search
from .encoder import (
    EncoderError,
    ImageBatch,
    ImageEncoder,
    ImageLoadError,
    build_encoder,
    iter_image_batches,
    load_image,
)

# .mpo: the multi-picture JPEG of some cameras and phones (its first picture is used).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".mpo", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"
DEFAULT_MODEL_NAME = "flickr8k_lite0.safetensors"
# Hypotheses (photographs times beam size) that caption_files searches together: 256
# photographs at beam size 3. A search over 256 photographs costs little more per step than
# one over 64 (the step's products read the same weights); a larger beam takes fewer of them,
# as each hypothesis holds a row of log-probabilities over the whole vocabulary.
DECODE_ROWS = 768
DEFAULT_BEAM_SIZE = 3


def default_checkpoint_path() -> Path:
    """Path of the bundled Flickr8k model (it may not exist in a source checkout)."""
    return DEFAULT_MODEL_DIR / DEFAULT_MODEL_NAME


@dataclass(frozen=True)
class GeneratedCaption:
    text: str
    log_prob: float


@dataclass(frozen=True)
class CaptionResult:
    """The captions of one image (best first), or why it could not be read."""

    image: str
    captions: tuple[GeneratedCaption, ...] = ()
    error: str | None = None


class ImageCaptioner:
    """A trained captioner together with the image encoder it was trained on."""

    def __init__(self, checkpoint: Checkpoint, encoder: ImageEncoder, device: torch.device):
        self.model = checkpoint.model.to(device).eval()
        self.vocab = checkpoint.vocab
        self.encoder = encoder.for_inference(device)
        self.device = device

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike, device: str | torch.device = "cpu"
    ) -> ImageCaptioner:
        """Load a checkpoint and build its encoder with the preprocessing it was trained with.

        Raises:
            CheckpointError: unreadable checkpoint, or trained on encoder weights we lack.
            EncoderError: the checkpoint's encoder cannot be built here (weights not installed).
        """
        device = torch.device(device)
        checkpoint = load_checkpoint(path, device=device)
        try:
            encoder = cls._build_encoder(path, checkpoint)
        except EncoderError as error:
            raise EncoderError(f"{path}: {error}") from None
        return cls(checkpoint, encoder, device)

    @staticmethod
    def _build_encoder(path: str | os.PathLike, checkpoint) -> ImageEncoder:
        """The encoder the checkpoint was trained with, with its weights and preprocessing."""
        if checkpoint.encoder_state is not None:
            # A fine-tuned encoder travels in the checkpoint; the package weights are not used.
            encoder = build_encoder(checkpoint.encoder.name, pretrained=False)
            try:
                encoder.load_state_dict(checkpoint.encoder_state)
            except RuntimeError:
                raise CheckpointError(
                    f"{path}: its encoder weights do not fit {checkpoint.encoder.name}"
                ) from None
        else:
            encoder = build_encoder(checkpoint.encoder.name)
            if encoder.weights_id != checkpoint.encoder.weights:
                raise CheckpointError(
                    f"{path}: trained on {checkpoint.encoder.name} weights "
                    f"{checkpoint.encoder.weights}, but {encoder.weights_id} is installed"
                )
        # The checkpoint's preprocessing wins: it is what the decoder's features assume.
        encoder.preprocessing = checkpoint.encoder.preprocessing
        return encoder

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: (B, 3, S, S) preprocessed -> features (B, F) float32, on the device."""
        return self.encoder.encode(pixels)

    @torch.inference_mode()
    def caption_features(
        self,
        features: torch.Tensor,
        *,
        beam_size: int = DEFAULT_BEAM_SIZE,
        top_k: int = 1,
        max_length: int = 20,
        length_penalty: float = DEFAULT_LENGTH_PENALTY,
    ) -> list[tuple[GeneratedCaption, ...]]:
        """features: (B, F) from :meth:`encode` -> per image, ``top_k`` captions, best first."""
        results = beam_search(
            self.model,
            features,
            **self.vocab.special_ids,
            beam_size=beam_size,
            max_length=max_length,
            length_penalty=length_penalty,
            top_k=top_k,
        )
        return [
            tuple(GeneratedCaption(self.vocab.decode(c.token_ids), c.log_prob) for c in best)
            for best in results
        ]

    def caption_tensor(self, pixels: torch.Tensor, **options) -> list[tuple[GeneratedCaption, ...]]:
        """pixels: (B, 3, S, S) preprocessed -> per image, ``top_k`` captions, best first."""
        return self.caption_features(self.encode(pixels), **options)

    def caption_image(self, path: str | os.PathLike, **options) -> tuple[GeneratedCaption, ...]:
        """Caption one photograph file (raises ImageLoadError if it cannot be read)."""
        image = load_image(path, min_side=self.encoder.preprocessing.image_size)
        pixels = self.encoder.preprocess(image).unsqueeze(0)
        return self.caption_tensor(pixels, **options)[0]

    def caption_files(
        self,
        paths: Sequence[str | os.PathLike],
        *,
        batch_size: int = 16,
        num_workers: int = 2,
        progress: bool = False,
        **options,
    ) -> Iterator[CaptionResult]:
        """Caption many files in batches, in input order; unreadable files yield errors.

        Photographs are decoded in worker threads; on a GPU, while the encoder runs on the
        previous batch (see :func:`iter_image_batches` for why not on the CPU). The encoder's
        features are gathered until at least DECODE_ROWS / beam_size photographs wait, and beam
        search runs on all of them at once: a decoding step reads the same weights for a few
        rows or for a few hundred, so fewer, larger steps cost less per photograph. The
        progress bar counts photographs as they are encoded.

        paths: file paths; a single path is one file.
        """
        if isinstance(paths, str | os.PathLike):
            paths = [paths]
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(paths), unit="img", desc="captioning")
        batches = iter_image_batches(
            paths,
            self.encoder.preprocessing,
            batch_size,
            num_workers=num_workers,
            read_ahead=self.device.type != "cpu",
        )
        group = max(1, DECODE_ROWS // options.get("beam_size", DEFAULT_BEAM_SIZE))
        waiting: list[tuple[ImageBatch, torch.Tensor | None]] = []
        num_waiting = 0
        for batch in batches:
            features = self.encode(batch.pixels) if batch.indices else None
            waiting.append((batch, features))
            num_waiting += len(batch.indices)
            if bar is not None:
                bar.update(len(batch.indices) + len(batch.errors))
            if num_waiting >= group:
                yield from self._decode_waiting(paths, waiting, options)
                waiting, num_waiting = [], 0
        yield from self._decode_waiting(paths, waiting, options)
        if bar is not None:
            bar.close()

    def _decode_waiting(
        self,
        paths: Sequence[str | os.PathLike],
        waiting: list[tuple[ImageBatch, torch.Tensor | None]],
        options: dict,
    ) -> Iterator[CaptionResult]:
        """Beam-search the features of the waiting batches together; results in input order."""
        encoded = [features for _, features in waiting if features is not None]
        captions = self.caption_features(torch.cat(encoded), **options) if encoded else []
        by_index = dict(
            zip(
                [index for batch, _ in waiting for index in batch.indices],
                captions,
                strict=True,
            )
        )
        for batch, _ in waiting:
            for index in sorted([*batch.indices, *batch.errors]):
                if index in batch.errors:
                    yield CaptionResult(str(paths[index]), error=batch.errors[index])
                else:
                    yield CaptionResult(str(paths[index]), captions=by_index[index])


def expand_image_paths(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Files stay as given; a folder becomes its image files (by suffix), sorted.

    Only the folder's own files count: subfolders are not searched. A link to nowhere with an
    image suffix is listed (its loading fails with a message), a folder with one is not.

    Raises:
        ImageLoadError: a folder that cannot be listed (no permission to read it).
    """
    paths = []
    for item in map(Path, inputs):
        try:
            is_folder = item.is_dir()
        except OSError:
            # Left to load_image, which reports why the file cannot be reached.
            is_folder = False
        if not is_folder:
            paths.append(item)
            continue
        try:
            images = [p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
            # A broken link is listed, so that loading it reports it; subfolders are not.
            paths.extend(sorted(p for p in images if p.is_file() or not p.exists()))
        except OSError as error:
            raise ImageLoadError(f"{item}: cannot list folder ({error.strerror})") from None
    return paths
