"""Self-contained, pickle-free checkpoints: one ``.safetensors`` file per model.

The file holds the captioner's weights as tensors and, in the safetensors metadata header
(string to string), these JSON documents:

    format        "torch_lstmcap" and FORMAT_VERSION
    vocab         the vocabulary's word list, in id order
    encoder       {"name": ..., "weights": ..., "preprocessing": {...}}
    config        the CaptionerConfig
    training      optional: epoch, optimizer and scheduler state, RNG state, history...

A model trained with a frozen encoder stores only the decoder: the encoder's weights come from
its package, named in the ``encoder`` header. With ``--fine-tune-encoder`` the encoder's
weights changed, so they are stored too, as tensors named ``encoder/<name>``.

Training state may contain tensors (Adam's moments, the RNG state); they are stored as tensors
named ``training/<n>`` and referenced from the JSON, so resuming needs no pickle either.
Loading parses JSON and reads raw tensors: it can never execute code from the file.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .captioner import Captioner, CaptionerConfig
from .encoder import Preprocessing
from .vocab import SPECIALS, Vocabulary

FORMAT_NAME = "torch_lstmcap"
FORMAT_VERSION = 1
_MODEL_PREFIX = "model/"
_TRAINING_PREFIX = "training/"
_ENCODER_PREFIX = "encoder/"


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
    encoder_state: dict[str, torch.Tensor] | None = None


def save_checkpoint(
    path: str | os.PathLike,
    model: Captioner,
    vocab: Vocabulary,
    encoder: EncoderInfo,
    *,
    training: dict | None = None,
    extra: dict | None = None,
    dtype: torch.dtype | None = None,
    encoder_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint atomically (temporary file, then rename).

    Args:
        dtype: store the weights in this dtype (``torch.float16`` halves the file).
        training: JSON-able state for ``--resume``; may contain tensors at any depth.
        extra: small JSON-able facts (metrics, the command line) kept in the header.
        encoder_state: the image encoder's state_dict, when it was fine-tuned.
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
    for name, tensor in (encoder_state or {}).items():
        tensors[_ENCODER_PREFIX + name] = tensor.detach().cpu().contiguous()

    metadata = {
        "format": json.dumps({"name": FORMAT_NAME, "version": FORMAT_VERSION}),
        "vocab": json.dumps(vocab.to_json(), ensure_ascii=False),
        "encoder": json.dumps(encoder.to_dict()),
        "config": json.dumps(model.config.to_dict()),
        "extra": json.dumps(extra or {}),
    }
    if training is not None:
        training_tensors = {}
        metadata["training"] = json.dumps(_pack(training, training_tensors))
        tensors.update(training_tensors)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _create_temporary(path)
    try:
        # A plain open() would keep the mode of the file it overwrites, or give a new one
        # 0o666 less the umask, which the empty temporary file has. safetensors writes through
        # a temporary file of its own, made readable by its owner only, so set the mode back.
        mode = stat.S_IMODE((path if path.exists() else temporary).stat().st_mode)
        save_file(tensors, temporary, metadata=metadata)
        # Without the fsync a crash soon after the rename can leave the new name pointing at
        # a file whose data never reached the disk. It comes before the chmod, which may make
        # the file read-only.
        with open(temporary, "r+b") as written:
            os.fsync(written.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def _create_temporary(path: Path) -> Path:
    """Create an empty, new file beside ``path``, with the mode the umask gives new files."""
    while True:
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return temporary


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
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file")
    if not path.is_file():
        what = "not a regular file" if path.exists() else "no such checkpoint file"
        raise CheckpointError(f"{path}: {what}")
    try:
        # safetensors reports a file it may not read as missing; open() gives the true reason.
        open(path, "rb").close()
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read ({error.strerror})") from None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as reader:
            metadata = reader.metadata() or {}
            tensors = {name: reader.get_tensor(name) for name in reader.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({_one_line(error)})"
        ) from None

    header = _parse_header(path, metadata)
    vocab = header["vocab"]
    if not vocab.num_words:
        raise CheckpointError(f"{path}: its vocabulary holds no words, only {' '.join(SPECIALS)}")
    if expect_vocab is not None and vocab != expect_vocab:
        raise CheckpointError(f"{path}: {_vocab_difference(vocab, expect_vocab)}")
    config = header["config"]
    try:
        # The random initial weights are overwritten below; drawing them must not move the
        # caller's random stream (a resumed run restores that stream after loading).
        with torch.random.fork_rng(devices=[]):
            model = Captioner(config)
    except (TypeError, ValueError, RuntimeError, AssertionError) as error:
        # torch.nn.Embedding asserts, rather than raises, on a padding id out of range.
        raise CheckpointError(
            f"{path}: unusable model config {config} ({_one_line(error)})"
        ) from None
    if config.vocab_size != len(vocab):
        raise CheckpointError(
            f"{path}: config says {config.vocab_size} words but the vocabulary has {len(vocab)}"
        )

    state = {
        name.removeprefix(_MODEL_PREFIX): tensor.float() if tensor.is_floating_point() else tensor
        for name, tensor in tensors.items()
        if name.startswith(_MODEL_PREFIX)
    }
    _check_weights(path, model, state)
    model.load_state_dict(state)
    model.to(device).eval()

    training = None
    if "training" in metadata:
        try:
            training = _unpack(json.loads(metadata["training"]), tensors)
        except (KeyError, ValueError, TypeError, RecursionError) as error:
            raise CheckpointError(
                f"{path}: damaged training state ({type(error).__name__}: {_one_line(error)})"
            ) from None
    encoder_state = {
        name.removeprefix(_ENCODER_PREFIX): tensor
        for name, tensor in tensors.items()
        if name.startswith(_ENCODER_PREFIX)
    }
    return Checkpoint(
        model, vocab, header["encoder"], training, header["extra"], encoder_state or None
    )


def _parse_header(path: Path, metadata: dict) -> dict:
    try:
        file_format = json.loads(metadata["format"])
    except (KeyError, ValueError, RecursionError):
        raise CheckpointError(
            f"{path}: not a {FORMAT_NAME} checkpoint (no format header)"
        ) from None
    if not isinstance(file_format, dict) or file_format.get("name") != FORMAT_NAME:
        raise CheckpointError(f"{path}: not a {FORMAT_NAME} checkpoint")
    if file_format.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {file_format.get('version')!r} is not supported "
            f"(this version reads {FORMAT_VERSION})"
        )
    try:
        header = {
            "vocab": Vocabulary.from_json(json.loads(metadata["vocab"])),
            "encoder": EncoderInfo.from_dict(json.loads(metadata["encoder"])),
            "config": CaptionerConfig.from_dict(json.loads(metadata["config"])),
            "extra": json.loads(metadata.get("extra", "{}")),
        }
        if not isinstance(header["extra"], dict):
            raise TypeError("extra is not a JSON object")
        return header
    except (KeyError, ValueError, TypeError, RecursionError) as error:
        raise CheckpointError(
            f"{path}: damaged header ({type(error).__name__}: {_one_line(error)})"
        ) from None


def _one_line(error: BaseException) -> str:
    """The first line of an error's message; torch's messages can run over many."""
    return str(error).partition("\n")[0]


def _vocab_difference(found: Vocabulary, expected: Vocabulary) -> str:
    """One line naming the first id where two different vocabularies disagree."""
    found_words, expected_words = found.to_json(), expected.to_json()
    shared = min(len(found_words), len(expected_words))
    word_id = next((i for i in range(shared) if found_words[i] != expected_words[i]), shared)
    if word_id == shared:
        where = "one is the other with words added at the end"
    else:
        where = f"id {word_id} is {found_words[word_id]!r}, expected {expected_words[word_id]!r}"
    return (
        f"its vocabulary ({len(found)} words) differs from the expected one "
        f"({len(expected)} words): {where}"
    )


def _check_weights(path: Path, model: Captioner, state: dict) -> None:
    expected_tensors = model.state_dict()
    expected = {name: tuple(tensor.shape) for name, tensor in expected_tensors.items()}
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
        # load_state_dict would quietly cast integer or boolean tensors into the float weights,
        # and NaN weights give NaN scores that no search can rank.
        if not expected_tensors[name].is_floating_point():
            continue
        if not state[name].is_floating_point():
            raise CheckpointError(f"{path}: weight {name} is stored as {state[name].dtype}")
        if not torch.isfinite(state[name]).all():
            raise CheckpointError(f"{path}: weight {name} holds NaN or infinite values")


def _pack(value, tensors: dict):
    """Replace tensors in a nested structure by references into ``tensors``, filled here."""
    if isinstance(value, torch.Tensor):
        name = f"{_TRAINING_PREFIX}{len(tensors)}"
        # A copy: safetensors refuses tensors that share memory, and the same tensor (or two
        # views of one) may appear twice in the state.
        tensors[name] = value.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)
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
