"""Self-contained, pickle-free checkpoints: one ``.safetensors`` file per model.

The file holds the captioner's weights as tensors and, in the safetensors metadata header
(string to string), these JSON documents:

    format        "torch_lstmcap" and FORMAT_VERSION
    vocab         the vocabulary's word list, in id order
    encoder       {"name": ..., "weights": ..., "preprocessing": {...}}
    config        the CaptionerConfig
    training      optional: epoch, optimizer and scheduler state, RNG state, history...

Training state may contain tensors (Adam's moments, the RNG state); they are stored as tensors
named ``training/<n>`` and referenced from the JSON, so resuming needs no pickle either.
Loading parses JSON and reads raw tensors: it can never execute code from the file.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .captioner import Captioner, CaptionerConfig
from .encoder import Preprocessing
from .vocab import Vocabulary

FORMAT_NAME = "torch_lstmcap"
FORMAT_VERSION = 1
_MODEL_PREFIX = "model/"
_TRAINING_PREFIX = "training/"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line for the user."""


@dataclass(frozen=True)
class EncoderInfo:
    """Which image encoder a captioner was trained on, and how its images were prepared."""

    name: str
    weights: str
    preprocessing: Preprocessing

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "weights": self.weights,
            "preprocessing": self.preprocessing.to_dict(),
        }

    @classmethod
    def from_dict(cls, values: dict) -> EncoderInfo:
        return cls(
            values["name"], values["weights"], Preprocessing.from_dict(values["preprocessing"])
        )

    @classmethod
    def of(cls, encoder) -> EncoderInfo:
        return cls(encoder.name, encoder.weights_id, encoder.preprocessing)


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (in eval mode, float32) and everything stored with it."""

    model: Captioner
    vocab: Vocabulary
    encoder: EncoderInfo
    training: dict | None = None
    extra: dict = field(default_factory=dict)


def save_checkpoint(
    path: str | os.PathLike,
    model: Captioner,
    vocab: Vocabulary,
    encoder: EncoderInfo,
    *,
    training: dict | None = None,
    extra: dict | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a checkpoint atomically (temporary file, then rename).

    Args:
        dtype: store the weights in this dtype (``torch.float16`` halves the file).
        training: JSON-able state for ``--resume``; may contain tensors at any depth.
        extra: small JSON-able facts (metrics, the command line) kept in the header.
    """
    if len(vocab) != model.config.vocab_size:
        raise CheckpointError(
            f"vocabulary has {len(vocab)} words but the model expects {model.config.vocab_size}"
        )
    tensors = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[_MODEL_PREFIX + name] = tensor.contiguous()

    metadata = {
        "format": json.dumps({"name": FORMAT_NAME, "version": FORMAT_VERSION}),
        "vocab": json.dumps(vocab.to_json(), ensure_ascii=False),
        "encoder": json.dumps(encoder.to_dict()),
        "config": json.dumps(model.config.to_dict()),
        "extra": json.dumps(extra or {}),
    }
    if training is not None:
        metadata["training"] = json.dumps(_pack(training, tensors))

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        save_file(tensors, temporary, metadata=metadata)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    expect_vocab: Vocabulary | None = None,
) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        CheckpointError: missing or corrupt file, another format or version, a vocabulary that
            differs from ``expect_vocab``, or weights whose shapes do not fit the config.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as reader:
            metadata = reader.metadata() or {}
            tensors = {name: reader.get_tensor(name) for name in reader.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None

    header = _parse_header(path, metadata)
    vocab = header["vocab"]
    if expect_vocab is not None and vocab != expect_vocab:
        raise CheckpointError(
            f"{path}: its vocabulary ({len(vocab)} words) differs from the expected one "
            f"({len(expect_vocab)} words)"
        )
    config = header["config"]
    if config.vocab_size != len(vocab):
        raise CheckpointError(
            f"{path}: config says {config.vocab_size} words but the vocabulary has {len(vocab)}"
        )

    model = Captioner(config)
    state = {
        name.removeprefix(_MODEL_PREFIX): tensor.float() if tensor.is_floating_point() else tensor
        for name, tensor in tensors.items()
        if name.startswith(_MODEL_PREFIX)
    }
    _check_shapes(path, model, state)
    model.load_state_dict(state)
    model.to(device).eval()

    training = None
    if "training" in metadata:
        training = _unpack(json.loads(metadata["training"]), tensors)
    return Checkpoint(model, vocab, header["encoder"], training, header["extra"])


def _parse_header(path: Path, metadata: dict) -> dict:
    try:
        file_format = json.loads(metadata["format"])
    except (KeyError, ValueError):
        raise CheckpointError(
            f"{path}: not a {FORMAT_NAME} checkpoint (no format header)"
        ) from None
    if file_format.get("name") != FORMAT_NAME:
        raise CheckpointError(f"{path}: not a {FORMAT_NAME} checkpoint")
    if file_format.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {file_format.get('version')} is not supported "
            f"(this version reads {FORMAT_VERSION})"
        )
    try:
        return {
            "vocab": Vocabulary.from_json(json.loads(metadata["vocab"])),
            "encoder": EncoderInfo.from_dict(json.loads(metadata["encoder"])),
            "config": CaptionerConfig.from_dict(json.loads(metadata["config"])),
            "extra": json.loads(metadata.get("extra", "{}")),
        }
    except (KeyError, ValueError, TypeError) as error:
        raise CheckpointError(f"{path}: damaged header ({type(error).__name__}: {error})") from None


def _check_shapes(path: Path, model: Captioner, state: dict) -> None:
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match the model (missing: {missing[:3]}, "
            f"unexpected: {unexpected[:3]})"
        )
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise CheckpointError(
                f"{path}: weight {name} has shape {tuple(state[name].shape)}, the model's "
                f"config needs {shape}"
            )


def _pack(value, tensors: dict):
    """Replace tensors in a nested structure by references into ``tensors``."""
    if isinstance(value, torch.Tensor):
        name = f"{_TRAINING_PREFIX}{sum(key.startswith(_TRAINING_PREFIX) for key in tensors)}"
        tensors[name] = value.detach().cpu().contiguous()
        return {"__tensor__": name}
    if isinstance(value, dict):
        if not all(isinstance(key, str | int) for key in value):
            raise TypeError("training state keys must be strings or integers")
        # JSON keys are strings; remember integer keys (optimizer state is keyed by int).
        return {
            "__dict__": [[key, _pack(item, tensors)] for key, item in value.items()],
        }
    if isinstance(value, list | tuple):
        return [_pack(item, tensors) for item in value]
    return value


def _unpack(value, tensors: dict):
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        return {key: _unpack(item, tensors) for key, item in value["__dict__"]}
    if isinstance(value, list):
        return [_unpack(item, tensors) for item in value]
    return value
