"""An on-disk cache of pooled image features, so a frozen encoder sees each photograph once.

A cache is two files in the cache folder, named by a key that hashes everything the features
depend on (encoder name, weights file, preprocessing, and the ordered list of images with each
file's size, so that a photograph replaced in place is read again):

    <encoder>-<key>.npy    (N, C) float32, memory-mapped; row i belongs to image i
    <encoder>-<key>.json   progress: rows finished so far, images that failed to load

Rows are computed in order and the progress file is rewritten (atomically) after each batch,
so an interrupted build resumes at the first unfinished batch instead of starting over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .encoder import ImageEncoder, iter_image_batches

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$LSTMCAP_CACHE`` if set, else ``~/.cache/torch_lstmcap``."""
    override = os.environ.get("LSTMCAP_CACHE")
    if override:
        return Path(override)
    return Path.home() / ".cache" / "torch_lstmcap"


@dataclass
class FeatureCache:
    """Features for an ordered list of images.

    Attributes:
        features: (N, C) float32 memory-mapped array; rows of failed images are zeros.
        failed: image index -> reason it could not be read.
        path: the .npy file.
    """

    features: np.ndarray
    failed: dict[int, str]
    path: Path


def cache_key(encoder: ImageEncoder, image_paths: list[Path]) -> str:
    """Hash of what the features depend on; any change gives a new cache file."""
    description = {
        "encoder": encoder.name,
        "weights": encoder.weights_id,
        "preprocessing": encoder.preprocessing.to_dict(),
        "images": [_file_identity(path) for path in image_paths],
    }
    encoded = json.dumps(description, sort_keys=True).encode()
    return hashlib.sha256(encoded).hexdigest()[:20]


def _file_identity(path: str | os.PathLike) -> list:
    """[resolved path, size in bytes], or the path alone if it cannot be read.

    Not the modification time: copies of a dataset on the nodes of a torchrun job have their
    own, and every rank must find the cache the first rank built.
    """
    resolved = Path(path).resolve()
    try:
        return [str(resolved), resolved.stat().st_size]
    except OSError:
        return [str(resolved)]


def build_feature_cache(
    encoder: ImageEncoder,
    image_paths: list[Path],
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    num_workers: int = 2,
    progress: bool = True,
) -> FeatureCache:
    """Compute (or reuse, or resume) pooled features for ``image_paths``.

    Args:
        encoder: the frozen image encoder.
        image_paths: N photographs, in the order rows will have.
        cache_dir: folder for the cache files (default :func:`default_cache_dir`).

    Returns:
        A :class:`FeatureCache` whose ``features`` has shape (N, encoder.feature_dim).
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{encoder.name}-{cache_key(encoder, image_paths)}"
    array_path = cache_dir / f"{stem}.npy"
    progress_path = cache_dir / f"{stem}.json"
    shape = (len(image_paths), encoder.feature_dim)

    state = _read_progress(progress_path)
    features = None
    if state is not None:
        # A finished cache is only read, so it may live in a read-only folder.
        finished = state["done"] >= len(image_paths)
        features = _open_rows(array_path, shape, "r" if finished else "r+")
    if features is None:
        features = np.lib.format.open_memmap(array_path, mode="w+", dtype=np.float32, shape=shape)
        state = {"done": 0, "failed": {}}
        _write_progress(progress_path, state)

    done = state["done"]
    if done >= len(image_paths):
        log.info(
            "feature cache %s: reusing %d images, %d of them unreadable",
            array_path.name,
            len(image_paths),
            len(state["failed"]),
        )
    else:
        if done:
            log.info("feature cache %s: resuming at image %d", array_path.name, done)
        _fill(
            encoder,
            image_paths,
            features,
            state,
            progress_path,
            batch_size,
            device,
            num_workers,
            progress,
        )
        log.info(
            "feature cache %s: %d images encoded, %d unreadable",
            array_path.name,
            len(image_paths) - len(state["failed"]),
            len(state["failed"]),
        )

    failed = {int(index): reason for index, reason in state["failed"].items()}
    features = np.load(array_path, mmap_mode="r")
    return FeatureCache(features, failed, array_path)


def _fill(
    encoder, image_paths, features, state, progress_path, batch_size, device, num_workers, progress
):
    encoder = encoder.for_inference(device)

    start = state["done"]
    batches = iter_image_batches(
        image_paths,
        encoder.preprocessing,
        batch_size,
        num_workers,
        start=start,
        read_ahead=encoder.device().type != "cpu",  # see iter_image_batches
    )
    bar = tqdm(
        total=len(image_paths), initial=start, unit="img", desc="features", disable=not progress
    )
    with torch.inference_mode(), bar:
        for batch in batches:
            for index, reason in batch.errors.items():
                log.warning("skipping %s", reason)
                state["failed"][str(index)] = reason
                features[index] = 0.0
            if batch.indices:
                pooled = encoder.encode(batch.pixels).cpu().numpy()  # (B, C)
                features[batch.indices] = pooled
            count = len(batch.indices) + len(batch.errors)
            features.flush()
            state["done"] = max(state["done"], max([*batch.indices, *batch.errors]) + 1)
            _write_progress(progress_path, state)
            bar.update(count)


def _open_rows(path: Path, shape: tuple[int, int], mode: str) -> np.ndarray | None:
    """The memory-mapped array at ``path``; None if it is missing, damaged or another shape."""
    try:
        features = np.load(path, mmap_mode=mode)
    except (OSError, ValueError):
        return None
    if features.shape != shape or features.dtype != np.float32:
        return None
    return features


def _read_progress(path: Path) -> dict | None:
    try:
        state = json.loads(path.read_text())
        return {"done": int(state["done"]), "failed": dict(state["failed"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_progress(path: Path, state: dict) -> None:
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(state))
    os.replace(temporary, path)
