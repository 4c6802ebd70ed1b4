"""Train, fine-tune or evaluate an LSTM captioner.

On one machine (frozen encoder, features cached once):

    python train.py --data-format flickr8k --data-root ../shared/data/flickr8k --out runs/f8k

On several GPUs or machines, the same command under torchrun:

    torchrun --nproc-per-node 4 train.py --data-format coco --data-root /data/coco --out runs/c

Fine-tune an existing model on new captions, or score a checkpoint:

    python train.py --data-format csv --data-root photos/ --split-file photos/captions.csv \\
        --init-from torch_lstmcap/default_model/flickr8k_lite0.safetensors --extend-vocab --out r
    python train.py --eval-only --checkpoint runs/f8k/best.safetensors --data-format flickr8k \\
        --data-root ../shared/data/flickr8k --split val --metrics-out metrics.json
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from torch_lstmcap.captioner import Captioner, CaptionerConfig
from torch_lstmcap.checkpoint import (
    Checkpoint,
    CheckpointError,
    EncoderInfo,
    load_checkpoint,
    save_checkpoint,
)
from torch_lstmcap.datasets import DATA_FORMATS, DatasetError, ImageCaptions, load_dataset
from torch_lstmcap.decoding import DEFAULT_LENGTH_PENALTY
from torch_lstmcap.encoder import ENCODERS, EncoderError, build_encoder
from torch_lstmcap.features import build_feature_cache
from torch_lstmcap.memory import keep_freed_memory
from torch_lstmcap.metrics import CiderD, format_metrics_table
from torch_lstmcap.report import (
    append_metrics,
    plot_history,
    read_metrics,
    truncate_metrics,
    write_sample_page,
)
from torch_lstmcap.training import (
    CaptionPairs,
    EncoderDecoder,
    LengthBucketSampler,
    NonFiniteLossError,
    collate_captions,
    encode_records,
    evaluate,
    seed_everything,
    train_one_epoch,
    train_self_critical_epoch,
    warmup_cosine,
)
from torch_lstmcap.vocab import Vocabulary, tokenize

log = logging.getLogger("train")

OBJECTIVES = ("cross-entropy", "self-critical")


class OneLineErrorParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, like every other error here."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def get_args_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        description="Train or evaluate a torch_lstmcap captioner.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data-format",
        required=True,
        choices=DATA_FORMATS,
        help="dataset layout (see the README's table)",
    )
    data.add_argument("--data-root", required=True, type=Path, help="dataset folder")
    data.add_argument(
        "--split-file",
        type=Path,
        help="Karpathy JSON or CSV caption file (CSV, when unset: <split>.csv or captions.csv "
        "inside --data-root)",
    )
    data.add_argument(
        "--split",
        default="test",
        help="split scored by --eval-only (val for a Flickr8k copy without its test split)",
    )
    data.add_argument("--year", type=int, default=2017, help="COCO release year")
    data.add_argument("--max-images", type=int, help="use only the first N training images")
    data.add_argument(
        "--max-val-images",
        type=int,
        help="validate (or, with --eval-only, score) only the first N images of the split "
        "(quicker, noisier scores)",
    )
    data.add_argument(
        "--cache-dir",
        type=Path,
        help="feature cache folder (when unset: $LSTMCAP_CACHE, else ~/.cache/torch_lstmcap)",
    )

    model = parser.add_argument_group("model")
    model.add_argument(
        "--encoder",
        default="efficientnet-lite0",
        choices=ENCODERS,
        help="image encoder (frozen unless --fine-tune-encoder)",
    )
    model.add_argument(
        "--hidden-size", type=int, default=512, help="LSTM hidden and word-embedding size"
    )
    model.add_argument(
        "--dropout",
        type=float,
        default=0.5,
        help="dropout on image features, words and LSTM outputs",
    )
    model.add_argument(
        "--image-at-output",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="add the image to the LSTM output before every word prediction, besides "
        "setting the initial state",
    )
    model.add_argument("--min-count", type=int, default=5, help="rarer words become <unk>")
    model.add_argument("--max-length", type=int, default=20, help="words per caption at most")
    model.add_argument("--init-from", type=Path, help="start from this checkpoint's weights")
    model.add_argument(
        "--extend-vocab", action="store_true", help="with --init-from: add the new data's words"
    )

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--out", type=run_dir, help="run directory (checkpoints, logs, plots)")
    optim.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default="cross-entropy",
        help="cross-entropy: teacher forcing on the human captions; self-critical: optimise "
        "CIDEr-D of the model's own sampled captions (fine-tunes an --init-from model)",
    )
    optim.add_argument(
        "--samples-per-image",
        type=int,
        default=5,
        help="self-critical: captions drawn per image; a step covers --batch-size of them",
    )
    optim.add_argument(
        "--epochs", type=int, default=20, help="epochs at most (early stopping may end sooner)"
    )
    optim.add_argument("--batch-size", type=int, default=128, help="captions per step")
    optim.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of the decoder")
    optim.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW weight decay")
    optim.add_argument(
        "--warmup-steps",
        type=int,
        default=300,
        help="steps of linear learning-rate warm-up before the cosine decay (at most a tenth "
        "of the run's steps, so that a short fine-tuning run reaches its --lr)",
    )
    optim.add_argument(
        "--label-smoothing", type=float, default=0.1, help="label smoothing of the cross-entropy"
    )
    optim.add_argument("--clip-norm", type=float, default=2.0, help="gradient-norm clipping")
    optim.add_argument("--patience", type=int, default=4, help="epochs without a better CIDEr")
    optim.add_argument(
        "--fine-tune-encoder",
        action="store_true",
        help="train the CNN too (images go through it every step)",
    )
    optim.add_argument(
        "--encoder-lr",
        type=float,
        default=1e-5,
        help="learning rate of the encoder with --fine-tune-encoder",
    )
    optim.add_argument("--resume", action="store_true", help="continue from OUT/last.safetensors")
    optim.add_argument(
        "--save-dtype",
        choices=("float32", "float16"),
        default="float32",
        help="storage dtype of best.safetensors (float16 halves the file)",
    )
    optim.add_argument("--seed", type=int, default=0, help="random seed")
    optim.add_argument("--num-workers", type=int, default=2, help="image-loading workers")
    optim.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu, cuda or cuda:N",
    )

    decode = parser.add_argument_group("decoding and evaluation")
    decode.add_argument(
        "--beam-size", type=int, default=3, help="beam size for validation and --eval-only"
    )
    decode.add_argument(
        "--length-penalty",
        type=float,
        default=DEFAULT_LENGTH_PENALTY,
        help="length normalisation exponent of beam search",
    )
    decode.add_argument(
        "--eval-only", action="store_true", help="score --checkpoint on --split; no training"
    )
    decode.add_argument("--checkpoint", type=Path, help="checkpoint scored by --eval-only")
    decode.add_argument("--metrics-out", type=Path, help="JSON file for --eval-only scores")
    decode.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


@dataclass
class Split:
    """A split's records and its image features (cached), minus unreadable photographs."""

    records: list[ImageCaptions]
    features: torch.Tensor | None
    skip: set[int]

    @property
    def usable(self) -> list[int]:
        """Indices of the records whose photograph could be read."""
        return [index for index in range(len(self.records)) if index not in self.skip]


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(args) -> Distributed:
    """Join the torchrun process group when launched by torchrun, else run alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        args.device = f"cuda:{local_rank}"
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    return Distributed(dist.get_rank(), world_size)


def load_split(
    args, split: str, encoder, runtime: Distributed, with_features: bool, limit: int | None = None
) -> Split:
    """Read a split (its first ``limit`` images) and, ``with_features``, its cached features."""
    records = load_dataset(args.data_format, args.data_root, split, args.split_file, year=args.year)
    if limit:
        records = records[:limit]
    if not with_features:
        return Split(records, None, set())

    paths = [record.image_path for record in records]
    # Rank 0 encodes; the other ranks wait, then read the finished cache.
    if not runtime.is_main:
        dist.barrier()
    cache = build_feature_cache(
        encoder,
        paths,
        args.cache_dir,
        device=args.device,
        num_workers=args.num_workers,
        progress=not args.quiet and runtime.is_main,
    )
    if runtime.world_size > 1 and runtime.is_main:
        dist.barrier()
    if len(cache.failed) == len(records):
        raise DatasetError(
            f"{split}: none of the {len(records)} photographs could be read "
            f"(the first: {cache.failed[0]})"
        )
    # A copy in memory: Flickr8k's 6,000 rows are 30 MB, and reading a memory map row by row
    # in the training loop would be slower.
    return Split(records, torch.from_numpy(np.array(cache.features)), set(cache.failed))


def build_vocab(args, records: list[ImageCaptions], base: Vocabulary | None) -> Vocabulary:
    captions = [caption for record in records for caption in record.captions]
    if base is None:
        vocab = Vocabulary.build(captions, args.min_count)
    elif args.extend_vocab:
        vocab = base.extend(captions, args.min_count)
    else:
        vocab = base
    if not vocab.num_words:
        raise DatasetError(
            f"no word of the training captions occurs --min-count {args.min_count} times or "
            "more: the vocabulary would hold only its special tokens"
        )
    words = [word for caption in captions for word in tokenize(caption)]
    unknown = sum(word not in vocab for word in words)
    log.info(
        "vocabulary: %d words; %.2f%% of training words are <unk>",
        len(vocab),
        100 * unknown / max(1, len(words)),
    )
    return vocab


def build_model(args, vocab: Vocabulary, encoder, base: Checkpoint | None) -> Captioner:
    """A new captioner, or the ``--init-from`` checkpoint's model ``base``, grown to ``vocab``."""
    if base is None:
        config = CaptionerConfig(
            vocab_size=len(vocab),
            feature_dim=encoder.feature_dim,
            hidden_size=args.hidden_size,
            dropout=args.dropout,
            pad_id=vocab.pad_id,
            image_at_output=args.image_at_output,
        )
        return Captioner(config)
    model = base.model
    if len(vocab) > model.config.vocab_size:
        model.extend_vocab(len(vocab))
    return model


def build_optimizer(
    args, model: Captioner, encoder, steps_per_epoch: int, warmup_steps: int | None = None
):
    """AdamW and its warm-up-then-cosine schedule over ``args.epochs``.

    warmup_steps: the warm-up of the run being resumed; a new run warms up for --warmup-steps,
        at most a tenth of its steps. A resumed run keeps its own, whatever --epochs says now.
    Returns: optimizer, scheduler and the warm-up's length in steps.
    """
    groups = [{"params": list(model.parameters()), "lr": args.lr}]
    if args.fine_tune_encoder:
        groups.append({"params": list(encoder.parameters()), "lr": args.encoder_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=args.weight_decay)
    total_steps = args.epochs * steps_per_epoch
    if warmup_steps is None:
        warmup_steps = min(args.warmup_steps, total_steps // 10)
        if warmup_steps < args.warmup_steps:
            log.info("warm-up shortened to %d steps, a tenth of the run", warmup_steps)
    factor = warmup_cosine(total_steps, warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return optimizer, scheduler, warmup_steps


def make_loader(args, split: Split, vocab: Vocabulary, encoder, runtime: Distributed):
    if args.fine_tune_encoder:
        pairs = CaptionPairs(split.records, vocab, args.max_length, encoder=encoder)
    else:
        pairs = CaptionPairs(
            split.records,
            vocab,
            args.max_length,
            features=split.features.numpy(),
            skip=split.skip,
        )
    sampler = LengthBucketSampler(
        [len(ids) for _, ids in pairs.pairs],
        args.batch_size,
        seed=args.seed,
        rank=runtime.rank,
        world_size=runtime.world_size,
    )
    return DataLoader(
        pairs,
        batch_sampler=sampler,
        num_workers=args.num_workers if args.fine_tune_encoder else 0,
        collate_fn=functools.partial(collate_captions, pad_id=vocab.pad_id),
    )


def make_self_critical_batches(args, split: Split, runtime: Distributed):
    """Batches of images for self-critical training, and the CIDEr-D reward of the split.

    The batches are the same length-bucketed sampler as teacher forcing uses, over images of
    one length, i.e. shuffled afresh each epoch; they index ``split.usable``.
    """
    sampler = LengthBucketSampler(
        [0] * len(split.usable),
        max(1, args.batch_size // args.samples_per_image),
        seed=args.seed,
        rank=runtime.rank,
        world_size=runtime.world_size,
    )
    references = [[tokenize(caption) for caption in record.captions] for record in split.records]
    return sampler, CiderD(references)


def save_run(args, path: Path, model, vocab, encoder, training=None, dtype=None, extra=None):
    # A fine-tuned encoder is part of the model; a frozen one comes from its package.
    encoder_state = encoder.state_dict() if args.fine_tune_encoder else None
    save_checkpoint(
        path,
        model,
        vocab,
        EncoderInfo.of(encoder),
        training=training,
        dtype=dtype,
        extra=extra,
        encoder_state=encoder_state,
    )


def train(args, runtime: Distributed) -> int:
    device = torch.device(args.device)
    last_path, best_path = args.out / "last.safetensors", args.out / "best.safetensors"
    # Checkpoints are read before the features are computed, which can take a while.
    resumed = base = None
    if args.resume:
        if not last_path.is_file():
            raise CheckpointError(f"--resume: {last_path} does not exist yet")
        resumed = load_checkpoint(last_path)
        if resumed.training is None:
            raise CheckpointError(f"--resume: {last_path} holds no training state")
        check_resume_settings(args, resumed)
    else:
        # A new run here would overwrite the old run's checkpoints and mix the two logs.
        existing = [path.name for path in (last_path, best_path) if path.exists()]
        if existing:
            raise CheckpointError(
                f"{args.out} already holds a run ({', '.join(existing)}); continue it with "
                "--resume, or choose another --out"
            )
        if args.init_from:
            base = load_checkpoint(args.init_from)
    seed_everything(args.seed + runtime.rank)
    if base is not None and base.encoder.name != args.encoder:
        # Before the encoder is built (its weights may need a download) or used.
        raise CheckpointError(
            f"{args.init_from} was trained on encoder {base.encoder.name}, "
            f"not {args.encoder}; pass --encoder {base.encoder.name}"
        )
    encoder = build_encoder(args.encoder)
    train_split = load_split(
        args, "train", encoder, runtime, not args.fine_tune_encoder, limit=args.max_images
    )
    val_split = load_split(args, "val", encoder, runtime, True, limit=args.max_val_images)
    trained_on = {record.image_path for record in train_split.records}
    shared = sum(record.image_path in trained_on for record in val_split.records)
    if shared and runtime.is_main:
        # A CSV without a split column, given for both splits, is the usual way here.
        log.warning(
            "warning: %d of the %d validation photographs are also training photographs: "
            "best.safetensors is chosen on data it was trained on",
            shared,
            len(val_split.records),
        )

    if resumed is not None:
        vocab, model = resumed.vocab, resumed.model
        if resumed.encoder_state is not None:
            encoder.load_state_dict(resumed.encoder_state)
    else:
        vocab = build_vocab(args, train_split.records, base.vocab if base else None)
        model = build_model(args, vocab, encoder, base)
        if base is not None and base.encoder_state is not None:
            encoder.load_state_dict(base.encoder_state)

    model.to(device)
    encoder.to(device)
    if device.type == "cpu":
        encoder.to(memory_format=torch.channels_last)  # the layout oneDNN's convolutions take
    if not args.fine_tune_encoder:
        encoder.requires_grad_(False)
    self_critical = args.objective == "self-critical"
    if self_critical:
        loader, reward = make_self_critical_batches(args, train_split, runtime)
        units = f"{loader.lengths.numel()} images, {args.samples_per_image} captions each"
    else:
        loader = make_loader(args, train_split, vocab, encoder, runtime)
        units = f"{len(loader.dataset)} captions"
    if len(loader) == 0:
        raise DatasetError(
            f"--batch-size {args.batch_size} leaves no full batch: the training split has "
            + units
            + (f" for {runtime.world_size} processes" if runtime.world_size > 1 else "")
            + "; use a smaller --batch-size"
        )
    # Runs saved before warm-up was capped warmed up for their full --warmup-steps.
    warmup = resumed.training.get("warmup_steps", args.warmup_steps) if resumed else None
    optimizer, scheduler, warmup = build_optimizer(args, model, encoder, len(loader), warmup)
    wrapped = EncoderDecoder(encoder, model) if args.fine_tune_encoder else model
    if runtime.world_size > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(wrapped)

    state = {"epoch": 0, "best_cider": -1.0, "bad_epochs": 0}
    if resumed is not None:
        training = resumed.training
        optimizer.load_state_dict(training["optimizer"])
        scheduler.load_state_dict(training["scheduler"])
        torch.set_rng_state(training["rng"])
        if device.type == "cuda" and "cuda_rng" in training:
            torch.cuda.set_rng_state(training["cuda_rng"], device)
        state = {key: training[key] for key in state}
        log.info("resuming after epoch %d (best CIDEr %.3f)", state["epoch"], state["best_cider"])
        if state["epoch"] >= args.epochs and runtime.is_main:
            log.warning(
                "warning: the run already has %d epochs, --epochs %d: no epoch to train",
                state["epoch"],
                args.epochs,
            )
    if runtime.is_main:
        # Epochs logged after the last checkpoint go; a fresh run also drops the log of an
        # attempt killed before its first checkpoint.
        truncate_metrics(args.out / "metrics.jsonl", state["epoch"])

    autocast = torch.bfloat16 if device.type == "cuda" else None
    metrics_path = args.out / "metrics.jsonl"
    usable = train_split.usable
    for epoch in range(state["epoch"] + 1, args.epochs + 1):
        progress = not args.quiet and runtime.is_main
        if self_critical:
            loader.set_epoch(epoch)
            result = train_self_critical_epoch(
                wrapped,
                [[usable[i] for i in batch] for batch in loader],
                train_split.features,
                reward,
                vocab,
                optimizer,
                scheduler,
                device=device,
                samples_per_image=args.samples_per_image,
                max_length=args.max_length,
                clip_norm=args.clip_norm,
                autocast_dtype=autocast,
                epoch=epoch,
                progress=progress,
            )
        else:
            loader.batch_sampler.set_epoch(epoch)
            result = train_one_epoch(
                wrapped,
                loader,
                optimizer,
                scheduler,
                device=device,
                clip_norm=args.clip_norm,
                label_smoothing=args.label_smoothing,
                autocast_dtype=autocast,
                epoch=epoch,
                progress=progress,
            )

        stop = torch.zeros(1)
        if runtime.is_main:
            if args.fine_tune_encoder:
                # The cached validation features belong to the encoder before tuning.
                features, failed = encode_records(encoder, val_split.records)
                val_split = Split(val_split.records, features, failed)
            scores, predictions = evaluate(
                model,
                val_split.records,
                val_split.features,
                vocab,
                beam_size=args.beam_size,
                max_length=args.max_length,
                length_penalty=args.length_penalty,
                metrics=("BLEU-4", "CIDEr"),
                skip=val_split.skip,
            )
            cider = scores["CIDEr"]
            improved = cider > state["best_cider"]
            state["epoch"] = epoch
            state["bad_epochs"] = 0 if improved else state["bad_epochs"] + 1
            if improved:
                state["best_cider"] = cider
                save_run(
                    args,
                    best_path,
                    model,
                    vocab,
                    encoder,
                    dtype=getattr(torch, args.save_dtype),
                    extra={"epoch": epoch, "val": scores, "args": _args_json(args)},
                )
            record = {
                "epoch": epoch,
                "train_loss": result.loss,
                **({"train_reward": result.reward} if self_critical else {}),
                "seconds": round(result.seconds, 1),
                "lr": scheduler.get_last_lr()[0],
                "val": scores,
            }
            # Logged before the checkpoint: a kill in between leaves an extra record, which
            # --resume drops, rather than a gap in the log.
            append_metrics(metrics_path, record)
            training = {
                **state,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "warmup_steps": warmup,
                "rng": torch.get_rng_state(),
            }
            if device.type == "cuda":
                # Dropout on the GPU draws from the device's generator, not the CPU one.
                training["cuda_rng"] = torch.cuda.get_rng_state(device)
            save_run(
                args,
                last_path,
                model,
                vocab,
                encoder,
                training=training,
                extra={"args": _args_json(args)},
            )
            plot_history(read_metrics(metrics_path), args.out / "metrics.png")
            write_sample_page(
                args.out / "samples.html", val_split.records, predictions, f"epoch {epoch}"
            )
            print(
                f"epoch {epoch}: loss {result.loss:.3f}, "
                + (f"reward {result.reward:.3f}, " if self_critical else "")
                + f"{result.seconds:.0f}s, "
                f"val BLEU-4 {scores['BLEU-4']:.3f} CIDEr {cider:.3f}"
                + (" (best)" if improved else ""),
                flush=True,
            )
            stop[0] = float(state["bad_epochs"] >= args.patience)
        else:
            state["epoch"] = epoch
        if runtime.world_size > 1:
            dist.broadcast(stop, src=0)
        if stop.item():
            if runtime.is_main:
                print(f"early stop: no better CIDEr for {args.patience} epochs", flush=True)
            break

    if runtime.world_size > 1:
        fingerprints = replica_fingerprints(model, runtime)
        if runtime.is_main:
            if len(set(fingerprints)) > 1:
                print(f"error: ranks ended with different weights: {fingerprints}", file=sys.stderr)
                return 1
            print(
                f"weights identical on all {runtime.world_size} ranks "
                f"(sha256 {fingerprints[0][:16]})",
                flush=True,
            )
    if runtime.is_main:
        print(f"best val CIDEr {state['best_cider']:.3f}; model at {best_path}", flush=True)
    return 0


def replica_fingerprints(model: Captioner, runtime: Distributed) -> list[str]:
    """SHA-256 of each rank's weights, gathered on every rank.

    DistributedDataParallel promises identical replicas (same start, same averaged gradients,
    same steps); comparing fingerprints at the end checks that promise for a few bytes of
    traffic instead of gathering the weights themselves.
    """
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().cpu().numpy().tobytes())
    fingerprints = [""] * runtime.world_size
    dist.all_gather_object(fingerprints, digest.hexdigest())
    return fingerprints


def evaluate_checkpoint(args) -> int:
    """--eval-only: decode a split with beam search and score it with every metric."""
    checkpoint = load_checkpoint(args.checkpoint, device=args.device)
    if args.metrics_out:
        # Checked before the split is decoded, which can take a while.
        if args.metrics_out.is_dir():
            raise DatasetError(f"--metrics-out {args.metrics_out} is a folder, not a file")
        if args.metrics_out.exists() and args.metrics_out.samefile(args.checkpoint):
            raise DatasetError(f"--metrics-out {args.metrics_out} is the checkpoint being scored")
        args.metrics_out.parent.mkdir(parents=True, exist_ok=True)
    encoder = build_encoder(checkpoint.encoder.name)
    encoder.preprocessing = checkpoint.encoder.preprocessing
    if checkpoint.encoder_state is None:
        split = load_split(
            args, args.split, encoder, Distributed(), True, limit=args.max_val_images
        )
    else:
        # A fine-tuned encoder's features belong to this checkpoint alone: not cached.
        encoder.load_state_dict(checkpoint.encoder_state)
        split = load_split(
            args, args.split, encoder, Distributed(), False, limit=args.max_val_images
        )
        features, failed = encode_records(encoder.to(args.device), split.records)
        split = Split(split.records, features, failed)
    start = time.perf_counter()
    scores, _ = evaluate(
        checkpoint.model,
        split.records,
        split.features,
        checkpoint.vocab,
        beam_size=args.beam_size,
        max_length=args.max_length,
        length_penalty=args.length_penalty,
        skip=split.skip,
        progress=not args.quiet,
    )
    scores = {
        **scores,
        "images": len(split.records) - len(split.skip),
        "beam_size": args.beam_size,
    }
    print(format_metrics_table(scores))
    print(f"{scores['images']} images scored in {time.perf_counter() - start:.0f}s")
    if args.metrics_out:
        args.metrics_out.write_text(json.dumps(scores, indent=2) + "\n")
    return 0


# Settings a resumed run must keep: the features, the optimizer's parameter groups and the
# loss all depend on them.
RESUME_SETTINGS = ("encoder", "fine_tune_encoder", "objective")


def check_resume_settings(args, resumed) -> None:
    """Refuse to --resume a run with settings that change what it trains."""
    saved_args = resumed.extra.get("args")
    started = {
        **(saved_args if isinstance(saved_args, dict) else {}),
        "encoder": resumed.encoder.name,
    }
    for key in RESUME_SETTINGS:
        if key in started and started[key] != getattr(args, key):
            flag = "--" + key.replace("_", "-")
            if isinstance(started[key], bool):
                setting = f"{'with' if started[key] else 'without'} {flag}"
            else:
                setting = f"with {flag} {started[key]}, not {getattr(args, key)}"
            raise CheckpointError(
                f"--resume: the run in {args.out} was started {setting}; resume it with the "
                "same setting"
            )


def _args_json(args) -> dict:
    return {
        key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()
    }


def _out_of_memory(error: BaseException) -> bool:
    # torch reports a failed CPU allocation as a plain RuntimeError.
    if isinstance(error, MemoryError | torch.OutOfMemoryError):
        return True
    return "can't allocate memory" in str(error)


def run_dir(text: str) -> Path:
    """--out: an empty name would put the run's files in the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("needs the name of a folder, got an empty one")
    return Path(text)


def check_ranges(parser: argparse.ArgumentParser, args) -> None:
    """Refuse values that would only fail later, after the features were computed."""
    at_least = {
        "--epochs": (args.epochs, 1),
        "--batch-size": (args.batch_size, 1),
        "--beam-size": (args.beam_size, 1),
        "--hidden-size": (args.hidden_size, 1),
        "--max-length": (args.max_length, 1),
        "--min-count": (args.min_count, 1),
        "--patience": (args.patience, 1),
        "--warmup-steps": (args.warmup_steps, 0),
        "--samples-per-image": (args.samples_per_image, 2),
        "--max-images": (args.max_images, 1),
        "--max-val-images": (args.max_val_images, 1),
        "--num-workers": (args.num_workers, 0),
    }
    for flag, (value, low) in at_least.items():
        if value is not None and value < low:
            parser.error(f"{flag} must be at least {low}, got {value}")
    if not 0 <= args.seed < 2**32:
        parser.error(f"--seed must be in [0, 2**32), got {args.seed}")
    if not 0 <= args.dropout < 1:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if not 0 <= args.label_smoothing < 1:
        parser.error(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")
    positive = {"--lr": args.lr, "--encoder-lr": args.encoder_lr, "--clip-norm": args.clip_norm}
    for flag, value in positive.items():
        if not (value > 0 and np.isfinite(value)):
            parser.error(f"{flag} must be a positive number, got {value}")
    not_negative = {"--weight-decay": args.weight_decay, "--length-penalty": args.length_penalty}
    for flag, value in not_negative.items():
        if not (value >= 0 and np.isfinite(value)):
            parser.error(f"{flag} must be a number of at least 0, got {value}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a device; use cpu or cuda")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device!r} is not supported; use cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but no CUDA GPU is available")


def _os_error_message(error: OSError) -> str:
    """An OSError as "path: reason", without Python's "[Errno N]" prefix."""
    if error.filename is None or error.strerror is None:
        return str(error)
    return f"{error.filename}: {error.strerror}"


def main(argv=None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.eval_only and args.checkpoint is None:
        parser.error("--eval-only needs --checkpoint")
    if not args.eval_only and args.out is None:
        parser.error("training needs --out RUN_DIR")
    if not args.eval_only and args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file, not a run folder")
    if args.extend_vocab and args.init_from is None:
        parser.error("--extend-vocab needs --init-from")
    if args.objective == "self-critical":
        if args.init_from is None and not args.resume:
            parser.error(
                "--objective self-critical fine-tunes a trained model: pass --init-from "
                "CHECKPOINT (train one with the default cross-entropy objective first)"
            )
        if args.fine_tune_encoder:
            parser.error(
                "--objective self-critical trains on cached features, not with --fine-tune-encoder"
            )
    check_ranges(parser, args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    keep_freed_memory()

    runtime = Distributed()
    made_out = not args.eval_only and not args.out.exists()
    try:
        if args.eval_only:
            return evaluate_checkpoint(args)
        runtime = setup_distributed(args)
        if runtime.is_main:
            # A run to --resume already has its folder; a missing one is reported in train().
            if not args.resume:
                args.out.mkdir(parents=True, exist_ok=True)
        else:
            # Every rank reads the same data; one copy of the log is enough.
            logging.getLogger().setLevel(logging.WARNING)
        return train(args, runtime)
    except NonFiniteLossError as error:
        last = args.out / "last.safetensors"
        kept = f"{last} is kept" if last.is_file() else "no checkpoint was saved yet"
        if runtime.is_main:
            print(f"error: {error}; training stopped, {kept}", file=sys.stderr)
        return 1
    except (DatasetError, CheckpointError, EncoderError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"error: {_os_error_message(error)}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as error:
        if not _out_of_memory(error):
            raise
        hint = (
            ""
            if args.eval_only
            else "; a smaller --batch-size, --hidden-size or --samples-per-image needs less"
        )
        print(f"error: out of memory{hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if args.eval_only:
            print("interrupted", file=sys.stderr)
        elif (args.out / "last.safetensors").is_file():
            print("interrupted; rerun with --resume to continue", file=sys.stderr)
        else:
            # Before the first checkpoint; the feature cache keeps what was computed.
            print("interrupted; rerun the same command to continue", file=sys.stderr)
        return 130
    finally:
        if runtime.world_size > 1:
            dist.destroy_process_group()
        if made_out and runtime.is_main and args.out.is_dir() and not any(args.out.iterdir()):
            args.out.rmdir()  # a run that failed before writing anything leaves no folder


if __name__ == "__main__":
    sys.exit(main())
