"""The pieces of a training run: caption batches, one epoch of teacher forcing, evaluation.

``train.py`` strings these together; they are here so that tests and notebooks can use them
without the command line.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset
from tqdm import tqdm

from .captioner import Captioner, caption_loss
from .datasets import ImageCaptions
from .decoding import beam_search, sample_captions
from .encoder import ImageEncoder, ImageLoadError, iter_image_batches, load_image
from .metrics import CiderD, score_captions
from .vocab import Vocabulary

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class CaptionPairs(Dataset):
    """Every (image, caption) pair of a split; an epoch sees each human caption once.

    With ``features`` (N, F) the item's image is its cached feature row; without, it is the
    photograph itself, preprocessed for ``encoder`` (for ``--fine-tune-encoder``).
    """

    def __init__(
        self,
        records: Sequence[ImageCaptions],
        vocab: Vocabulary,
        max_length: int,
        features: np.ndarray | None = None,
        encoder: ImageEncoder | None = None,
        skip: set[int] = frozenset(),
    ):
        if (features is None) == (encoder is None):
            raise ValueError("give exactly one of features or encoder")
        self.records = records
        self.features = features
        self.encoder = encoder
        self.pairs = [
            (image, vocab.encode(caption, max_length))
            for image, record in enumerate(records)
            if image not in skip
            for caption in record.captions
        ]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, list[int]] | None:
        """The pair's (features or pixels, caption ids); None for an unreadable photograph."""
        image, caption = self.pairs[index]
        if self.features is not None:
            return torch.from_numpy(np.array(self.features[image])), caption
        try:
            photo = load_image(
                self.records[image].image_path, min_side=self.encoder.preprocessing.image_size
            )
        except ImageLoadError as error:
            log.warning("skipping %s", error)
            return None
        return self.encoder.preprocess(photo), caption


class LengthBucketSampler:
    """Batches of captions of similar length, in a new random order every epoch.

    Padding costs as much as words in the LSTM, so each batch is cut from a chunk of
    ``batch_size * 50`` shuffled pairs sorted by length; the batches are then shuffled. Under
    torchrun every rank forms the same batches and takes every ``world_size``-th one.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.lengths = torch.as_tensor(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator)
        chunk = self.batch_size * 50
        batches = []
        for start in range(0, len(order), chunk):
            indices = order[start : start + chunk]
            indices = indices[torch.argsort(self.lengths[indices], stable=True)]
            # Incomplete batches are dropped: every step sees a full batch.
            for first in range(0, len(indices) - self.batch_size + 1, self.batch_size):
                batches.append(indices[first : first + self.batch_size].tolist())
        shuffled = torch.randperm(len(batches), generator=generator).tolist()
        batches = [batches[index] for index in shuffled]
        usable = len(batches) // self.world_size * self.world_size
        return batches[self.rank : usable : self.world_size]

    def __iter__(self):
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())


def collate_captions(batch, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[(image, ids) or None] -> images (B, ...), captions (B, L) padded with ``pad_id``.

    None items (unreadable photographs) are left out, so such a batch is a little smaller.
    """
    batch = [item for item in batch if item is not None]
    if not batch:
        raise ValueError("every photograph of a batch was unreadable")
    images = torch.stack([image for image, _ in batch])
    length = max(len(ids) for _, ids in batch)
    captions = torch.full((len(batch), length), pad_id, dtype=torch.long)
    for row, (_, ids) in enumerate(batch):
        captions[row, : len(ids)] = torch.tensor(ids)
    return images, captions


def warmup_cosine(total_steps: int, warmup_steps: int, floor: float = 0.05) -> Callable:
    """Learning-rate multiplier: linear warm-up, then cosine decay to ``floor``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class EncoderDecoder(nn.Module):
    """Image encoder and captioner as one module, for ``--fine-tune-encoder``.

    One module lets DistributedDataParallel average the encoder's gradients too.
    """

    def __init__(self, encoder: ImageEncoder, captioner: Captioner):
        super().__init__()
        self.encoder = encoder
        self.captioner = captioner

    @property
    def config(self):
        return self.captioner.config

    def forward(
        self, images: torch.Tensor, captions: torch.Tensor, targets_only: bool = False
    ) -> torch.Tensor:
        """images: (N, 3, S, S), captions: (N, L) -> logits, as :meth:`Captioner.forward`."""
        return self.captioner(self.encoder(images), captions, targets_only)

    def train(self, mode: bool = True) -> EncoderDecoder:
        super().train(mode)
        # Batch-norm keeps its ImageNet statistics: caption batches are too small and too
        # alike to estimate new ones, and the running averages would drift towards them.
        for module in self.encoder.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self


@torch.inference_mode()
def encode_records(
    encoder: ImageEncoder,
    records: Sequence[ImageCaptions],
    batch_size: int = 32,
    num_workers: int = 2,
) -> tuple[torch.Tensor, set[int]]:
    """Pooled features of every photograph, with the encoder as it is now (not cached), on
    the encoder's device.

    Returns:
        features (N, F) float32 on the CPU (zeros for unreadable photographs), and the
        indices of those unreadable photographs.
    """
    encoder = encoder.for_inference()
    paths = [record.image_path for record in records]
    features = torch.zeros(len(paths), encoder.feature_dim)
    failed = set()
    read_ahead = encoder.device().type != "cpu"  # see iter_image_batches
    batches = iter_image_batches(
        paths, encoder.preprocessing, batch_size, num_workers, read_ahead=read_ahead
    )
    for batch in batches:
        failed.update(batch.errors)
        if batch.indices:
            features[batch.indices] = encoder.encode(batch.pixels).cpu()
    return features, failed


@dataclass
class EpochResult:
    """loss: mean training loss; reward: mean reward of the sampled captions (self-critical)."""

    loss: float
    steps: int
    seconds: float
    reward: float | None = None


def train_one_epoch(
    model: torch.nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    scheduler,
    *,
    device: torch.device,
    clip_norm: float = 2.0,
    label_smoothing: float = 0.0,
    autocast_dtype: torch.dtype | None = None,
    epoch: int = 0,
    progress: bool = True,
) -> EpochResult:
    """One pass of teacher forcing over ``loader``.

    ``model`` is a :class:`Captioner` fed cached features, or an :class:`EncoderDecoder` fed
    images (``--fine-tune-encoder``), possibly inside DistributedDataParallel.

    Raises:
        NonFiniteLossError: the loss or the gradient norm became NaN or infinite; the weights
            are not stepped with it, on any rank.
    """
    captioner = model.module if isinstance(model, DistributedDataParallel) else model
    model.train()
    start, total, steps = time.perf_counter(), 0.0, 0
    bar = tqdm(loader, desc=f"epoch {epoch}", unit="batch", disable=not progress, leave=False)
    for images, captions in bar:
        images, captions = images.to(device), captions.to(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(images, captions, targets_only=True)
            loss = caption_loss(logits, captions, captioner.config, label_smoothing)
        observed = _step_checked(
            model, loss, optimizer, scheduler, clip_norm, f"epoch {epoch}, step {steps}"
        )

        total += observed.item()
        steps += 1
        bar.set_postfix(loss=f"{total / steps:.3f}")
    return EpochResult(total / max(1, steps), steps, time.perf_counter() - start)


def _step_checked(
    model, loss: torch.Tensor, optimizer, scheduler, clip_norm: float, where: str
) -> torch.Tensor:
    """Back-propagate ``loss`` and step; the loss as seen by every rank, for logging.

    Raises NonFiniteLossError before a NaN or infinite loss or gradient reaches the weights.
    """
    observed = loss.detach()
    if isinstance(model, DistributedDataParallel):
        # The mean over ranks: the logged loss covers every rank's batch, and a NaN on one
        # rank stops all of them, instead of leaving the others in the gradient all-reduce.
        observed = observed.clone()
        dist.all_reduce(observed)
        observed /= dist.get_world_size()
    if not torch.isfinite(observed):
        raise NonFiniteLossError(f"loss became {observed.item()} at {where}")

    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    norm = torch.nn.utils.clip_grad_norm_(parameters, clip_norm)
    # A finite loss can still overflow a gradient; clipping would turn it into NaN weights.
    if not torch.isfinite(norm):
        raise NonFiniteLossError(f"gradient norm became {norm.item()} at {where}")
    optimizer.step()
    scheduler.step()
    return observed


def sampled_log_probs(
    logits: torch.Tensor, captions: torch.Tensor, vocab: Vocabulary
) -> torch.Tensor:
    """Log-probability of each sampled caption under the distribution it was drawn from.

    logits: (K, V) from ``model(features, captions, targets_only=True)``.
    captions: (S, L) ``<start>`` followed by the output of ``sample_captions``.
    Returns: (S,) sums over each caption's tokens, ``<end>`` included when drawn. As in
        decoding, ``<start>``, ``<unk>`` and ``<pad>`` are removed from every step's
        distribution and ``<end>`` from the first.
    """
    targets = captions[:, 1:]
    real = targets != vocab.pad_id
    positions = real.nonzero()  # (K, 2): caption, step; the row order of ``logits``
    forbidden = torch.tensor([vocab.start_id, vocab.unk_id, vocab.pad_id], device=logits.device)
    # Half-precision logits (autocast) are promoted: these sums weight the whole gradient.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logits = logits.index_fill(1, forbidden, float("-inf"))
    first = positions[:, 1] == 0
    logits[first, vocab.end_id] = float("-inf")
    token_log_probs = F.log_softmax(logits, dim=1).gather(1, targets[real][:, None])  # (K, 1)
    return token_log_probs.new_zeros(len(captions)).index_add(
        0, positions[:, 0], token_log_probs.view(-1)
    )


def train_self_critical_epoch(
    model: torch.nn.Module,
    batches,
    features: torch.Tensor,
    reward: CiderD,
    vocab: Vocabulary,
    optimizer: torch.optim.Optimizer,
    scheduler,
    *,
    device: torch.device,
    samples_per_image: int = 5,
    max_length: int = 20,
    clip_norm: float = 2.0,
    autocast_dtype: torch.dtype | None = None,
    epoch: int = 0,
    progress: bool = True,
) -> EpochResult:
    """One pass of self-critical sequence training (Rennie et al., 2017) over ``batches``.

    For each image the model draws ``samples_per_image`` captions; each is rewarded with its
    CIDEr-D against the image's human captions, minus the mean reward of the image's other
    samples (the baseline of Luo, 2020), and the loss is REINFORCE's
    ``-(reward - baseline) * log p(caption)``. The model optimises the metric it is judged by,
    and sees its own captions instead of only the human ones.

    batches: lists of image indices, rows of ``features`` (N, F) and images of ``reward``.
    ``model`` is a :class:`Captioner`, possibly inside DistributedDataParallel. Dropout is off
    throughout: the captions are drawn from, and their log-probabilities taken under, the
    same distribution.
    """
    if samples_per_image < 2:
        raise ValueError(f"samples_per_image must be at least 2, got {samples_per_image}")
    captioner = model.module if isinstance(model, DistributedDataParallel) else model
    model.eval()
    start, total_loss, total_reward, steps = time.perf_counter(), 0.0, 0.0, 0
    bar = tqdm(batches, desc=f"epoch {epoch}", unit="batch", disable=not progress, leave=False)
    for images in bar:
        image_features = features[images].to(device).repeat_interleave(samples_per_image, 0)
        sampled = sample_captions(
            captioner,
            image_features,
            **vocab.special_ids,
            max_length=max_length,
        )  # (S, T), S = len(images) * samples_per_image
        words = [
            [vocab.word(word_id) for word_id in row if word_id not in (vocab.end_id, vocab.pad_id)]
            for row in sampled.tolist()
        ]
        image_of_sample = [image for image in images for _ in range(samples_per_image)]
        rewards = torch.tensor(
            [
                reward.score(image, caption)
                for image, caption in zip(image_of_sample, words, strict=True)
            ]
        ).view(len(images), samples_per_image)
        others = (rewards.sum(dim=1, keepdim=True) - rewards) / (samples_per_image - 1)
        advantage = (rewards - others).view(-1).to(device)  # (S,)

        start_column = sampled.new_full((len(sampled), 1), vocab.start_id)
        captions = torch.cat([start_column, sampled], dim=1)  # (S, T + 1)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(image_features, captions, targets_only=True)
        loss = -(advantage * sampled_log_probs(logits, captions, vocab)).mean()
        observed = _step_checked(
            model, loss, optimizer, scheduler, clip_norm, f"epoch {epoch}, step {steps}"
        )

        total_loss += observed.item()
        total_reward += rewards.mean().item()
        steps += 1
        bar.set_postfix(reward=f"{total_reward / steps:.3f}")
    return EpochResult(
        total_loss / max(1, steps),
        steps,
        time.perf_counter() - start,
        reward=total_reward / max(1, steps),
    )


@torch.inference_mode()
def caption_features(
    model: Captioner,
    features: torch.Tensor,
    vocab: Vocabulary,
    *,
    beam_size: int = 3,
    max_length: int = 20,
    length_penalty: float | None = None,
    batch_size: int = 250,
    progress: bool = False,
) -> list[str]:
    """Beam-search one caption for each row of ``features``: (N, F) -> N strings."""
    model.eval()
    device = next(model.parameters()).device
    options = {} if length_penalty is None else {"length_penalty": length_penalty}
    captions = []
    starts = range(0, len(features), batch_size)
    for start in tqdm(starts, desc="decoding", unit="batch", disable=not progress, leave=False):
        batch = features[start : start + batch_size].to(device, torch.float32)
        results = beam_search(
            model,
            batch,
            **vocab.special_ids,
            beam_size=beam_size,
            max_length=max_length,
            **options,
        )
        captions.extend(vocab.decode(best[0].token_ids) for best in results)
    return captions


def evaluate(
    model: Captioner,
    records: Sequence[ImageCaptions],
    features: torch.Tensor,
    vocab: Vocabulary,
    *,
    beam_size: int = 3,
    max_length: int = 20,
    length_penalty: float | None = None,
    metrics: Sequence[str] | None = None,
    skip: set[int] = frozenset(),
    progress: bool = False,
) -> tuple[dict, dict[str, str]]:
    """Caption every image of a split and score against all its human captions.

    Returns:
        (scores, predictions): metric name -> value (None if unavailable), and
        image id -> generated caption.
    """
    keep = [index for index in range(len(records)) if index not in skip]
    captions = caption_features(
        model,
        features[keep],
        vocab,
        beam_size=beam_size,
        max_length=max_length,
        length_penalty=length_penalty,
        progress=progress,
    )
    predictions = {
        records[index].image_id: text for index, text in zip(keep, captions, strict=True)
    }
    references = {records[index].image_id: list(records[index].captions) for index in keep}
    scores = score_captions(predictions, references, metrics=metrics)
    return scores, predictions


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
