"""Tests of safetensors checkpoints: round trips (float32, float16, training state), the
one-line errors for files that cannot be used, atomic writes and loading without pickle."""

import json
import os
import pickle
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import torch_lstmcap.checkpoint as checkpoint_module
from torch_lstmcap.captioner import Captioner, CaptionerConfig
from torch_lstmcap.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    EncoderInfo,
    load_checkpoint,
    save_checkpoint,
)
from torch_lstmcap.encoder import Preprocessing
from torch_lstmcap.vocab import SPECIALS, Vocabulary

VOCAB_SIZE, FEATURE_DIM, HIDDEN_SIZE = 50, 12, 16
ENCODER = EncoderInfo(
    "efficientnet_lite0", "lite0-imagenet-v1", Preprocessing(224, (0.5, 0.5, 0.5), (0.25,) * 3)
)


def make_vocab(size: int = VOCAB_SIZE, first_word: str = "café") -> Vocabulary:
    words = [first_word] + [f"word{index}" for index in range(size - len(SPECIALS) - 1)]
    return Vocabulary([*SPECIALS, *words])


def make_model(seed: int = 0, hidden_size: int = HIDDEN_SIZE) -> Captioner:
    """A small captioner with every weight random (none left at its zero or one init)."""
    torch.manual_seed(seed)
    model = Captioner(CaptionerConfig(VOCAB_SIZE, FEATURE_DIM, hidden_size, dropout=0.25))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return model


def make_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """features: (4, F) and captions: (4, 7) without padding."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(4, FEATURE_DIM, generator=generator)
    words = torch.randint(len(SPECIALS), VOCAB_SIZE, (4, 5), generator=generator)
    start = torch.full((4, 1), Vocabulary.start_id)
    end = torch.full((4, 1), Vocabulary.end_id)
    return features, torch.cat([start, words, end], dim=1)


def assert_one_line_error(path, match: str, **kwargs) -> str:
    with pytest.raises(CheckpointError, match=match) as error:
        load_checkpoint(path, **kwargs)
    message = str(error.value)
    assert "\n" not in message
    assert str(path) in message
    return message


def rewrite(source, target, *, tensors=None, metadata=None):
    """Copy the checkpoint at source to target with some tensors or header entries replaced;
    a None value removes the entry."""
    with safe_open(str(source), framework="pt") as reader:
        stored = {name: reader.get_tensor(name) for name in reader.keys()}
        header = reader.metadata()
    for entries, changes in ((stored, tensors), (header, metadata)):
        for name, value in (changes or {}).items():
            if value is None:
                del entries[name]
            else:
                entries[name] = value
    save_file(stored, str(target), metadata=header)
    return target


@pytest.fixture
def saved(tmp_path):
    """(path, model) of a checkpoint saved without training state."""
    model = make_model()
    path = save_checkpoint(
        tmp_path / "model.safetensors", model, make_vocab(), ENCODER, extra={"cider": 0.75}
    )
    return path, model


def test_round_trip(saved):
    path, model = saved
    loaded = load_checkpoint(path)

    assert loaded.vocab == make_vocab()
    assert loaded.vocab.word(len(SPECIALS)) == "café"
    assert loaded.encoder == ENCODER
    assert loaded.model.config == model.config
    assert loaded.extra == {"cider": 0.75}
    assert loaded.training is None
    assert not loaded.model.training

    state, loaded_state = model.state_dict(), loaded.model.state_dict()
    assert state.keys() == loaded_state.keys()
    for name, tensor in state.items():
        assert torch.equal(loaded_state[name], tensor), name

    features, captions = make_batch()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model(features, captions), model.eval()(features, captions), rtol=0, atol=0
        )


def test_float16_storage(tmp_path, saved):
    full_path, model = saved
    path = save_checkpoint(
        tmp_path / "half.safetensors", model, make_vocab(), ENCODER, dtype=torch.float16
    )
    with safe_open(str(path), framework="pt") as reader:
        assert {reader.get_tensor(name).dtype for name in reader.keys()} == {torch.float16}
    assert path.stat().st_size < 0.6 * full_path.stat().st_size

    loaded = load_checkpoint(path)
    for name, tensor in model.state_dict().items():
        loaded_tensor = loaded.model.state_dict()[name]
        assert loaded_tensor.dtype == torch.float32, name
        torch.testing.assert_close(loaded_tensor, tensor, rtol=1e-3, atol=1e-4)


def train_one_step(model, optimizer, scheduler, features, captions) -> None:
    optimizer.zero_grad()
    model.loss(features, captions).backward()
    optimizer.step()
    scheduler.step()


def make_optimizer(model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
    return optimizer, scheduler


def test_training_state_resumes_exactly(tmp_path):
    model = make_model().train()
    optimizer, scheduler = make_optimizer(model)
    features, captions = make_batch()
    for _ in range(2):
        train_one_step(model, optimizer, scheduler, features, captions)

    training = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": torch.get_rng_state(),
        "epoch": 2,
        "history": [{"epoch": 1, "cider": 0.5, "lrs": (0.01, 0.005)}, {"epoch": 2}],
        "keys": {7: "int", "7": "str"},
    }
    path = save_checkpoint(
        tmp_path / "last.safetensors", model, make_vocab(), ENCODER, training=training
    )
    loaded = load_checkpoint(path)
    resumed_training = loaded.training

    assert resumed_training["epoch"] == 2
    assert resumed_training["history"] == [
        {"epoch": 1, "cider": 0.5, "lrs": [0.01, 0.005]},
        {"epoch": 2},
    ]
    assert resumed_training["keys"] == {7: "int", "7": "str"}
    assert torch.equal(resumed_training["rng"], training["rng"])
    assert all(isinstance(key, int) for key in resumed_training["optimizer"]["state"])

    # The original run goes on; the resumed one restores everything and must take the same
    # step, dropout masks included.
    train_one_step(model, optimizer, scheduler, features, captions)

    resumed = loaded.model.train()
    resumed_optimizer, resumed_scheduler = make_optimizer(resumed)
    resumed_optimizer.load_state_dict(resumed_training["optimizer"])
    resumed_scheduler.load_state_dict(resumed_training["scheduler"])
    torch.set_rng_state(resumed_training["rng"])
    train_one_step(resumed, resumed_optimizer, resumed_scheduler, features, captions)

    assert resumed_scheduler.get_last_lr() == scheduler.get_last_lr()
    for (name, parameter), resumed_parameter in zip(
        model.named_parameters(), resumed.parameters(), strict=True
    ):
        torch.testing.assert_close(resumed_parameter, parameter, rtol=0, atol=0, msg=name)


def test_loading_leaves_the_random_stream_alone(saved):
    path, _ = saved
    state = torch.get_rng_state()
    load_checkpoint(path)
    assert torch.equal(torch.get_rng_state(), state)


def test_training_state_may_repeat_a_tensor(tmp_path, saved):
    _, model = saved
    rng = torch.get_rng_state()
    weights = torch.arange(6.0)
    training = {"rng": rng, "same_rng": rng, "view": weights[2:4], "whole": weights}
    path = save_checkpoint(
        tmp_path / "repeat.safetensors", model, make_vocab(), ENCODER, training=training
    )
    loaded = load_checkpoint(path).training
    assert torch.equal(loaded["rng"], rng) and torch.equal(loaded["same_rng"], rng)
    assert torch.equal(loaded["view"], weights[2:4]) and torch.equal(loaded["whole"], weights)


def test_vocab_mismatch(saved):
    path, _ = saved
    message = assert_one_line_error(
        path, "differs from the expected", expect_vocab=make_vocab(first_word="tea")
    )
    assert "id 4" in message and "'café'" in message and "'tea'" in message
    assert_one_line_error(path, "differs from the expected", expect_vocab=make_vocab(60))
    assert load_checkpoint(path, expect_vocab=make_vocab()).vocab == make_vocab()


def test_vocab_of_special_tokens_only_is_refused(tmp_path):
    model = Captioner(CaptionerConfig(len(SPECIALS), FEATURE_DIM, HIDDEN_SIZE))
    path = save_checkpoint(tmp_path / "x.safetensors", model, Vocabulary(SPECIALS), ENCODER)
    assert_one_line_error(path, "its vocabulary holds no words, only <pad> <start> <end> <unk>")


def test_save_refuses_a_vocab_of_another_size(tmp_path):
    with pytest.raises(CheckpointError, match="vocabulary has 49 words"):
        save_checkpoint(tmp_path / "x.safetensors", make_model(), make_vocab(49), ENCODER)
    assert list(tmp_path.iterdir()) == []


def test_weight_of_wrong_shape(tmp_path, saved):
    path, _ = saved
    tampered = rewrite(
        path, tmp_path / "shape.safetensors", tensors={"model/lstm.Wh": torch.zeros(17, 64)}
    )
    message = assert_one_line_error(tampered, "weight lstm.Wh has shape")
    assert "(17, 64)" in message and "(16, 64)" in message


def test_config_that_does_not_fit_the_weights(tmp_path, saved):
    path, model = saved
    config = {**model.config.to_dict(), "hidden_size": 2 * HIDDEN_SIZE}
    tampered = rewrite(
        path, tmp_path / "config.safetensors", metadata={"config": json.dumps(config)}
    )
    assert_one_line_error(tampered, "the model's config needs")


def test_missing_and_unexpected_weights(tmp_path, saved):
    path, _ = saved
    tampered = rewrite(
        path,
        tmp_path / "missing.safetensors",
        tensors={"model/output_bias": None, "model/extra.weight": torch.zeros(3)},
    )
    message = assert_one_line_error(tampered, "weights do not match")
    assert "output_bias" in message and "extra.weight" in message


@pytest.mark.parametrize(
    "config_change",
    [
        {"hidden_size": "16"},
        {"hidden_size": -3},
        {"hidden_size": 0},
        {"dropout": 2.0},
        {"dropout": float("nan")},
        {"pad_id": VOCAB_SIZE + 9},
        {"image_at_output": "yes"},
    ],
    ids=["string", "negative", "zero", "dropout", "dropout-nan", "pad-id-out-of-range", "merge"],
)
def test_unusable_config(tmp_path, saved, config_change):
    path, model = saved
    config = {**model.config.to_dict(), **config_change}
    tampered = rewrite(path, tmp_path / "bad.safetensors", metadata={"config": json.dumps(config)})
    assert_one_line_error(tampered, "unusable model config")


def test_config_that_disagrees_with_the_vocabulary(tmp_path, saved):
    path, model = saved
    config = {**model.config.to_dict(), "vocab_size": VOCAB_SIZE + 1}
    tampered = rewrite(path, tmp_path / "bad.safetensors", metadata={"config": json.dumps(config)})
    assert_one_line_error(tampered, f"config says {VOCAB_SIZE + 1} words")


def test_missing_file(tmp_path):
    assert_one_line_error(tmp_path / "nowhere.safetensors", "no such checkpoint file")


def test_folder_is_not_a_checkpoint(tmp_path):
    assert_one_line_error(tmp_path, "is a folder, not a checkpoint file")


def test_unreadable_file_says_so_rather_than_missing(tmp_path, saved):
    path, _ = saved
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("this user reads files whatever their mode (root)")
        assert_one_line_error(path, "cannot read \\(Permission denied\\)")
    finally:
        path.chmod(0o644)


@pytest.mark.parametrize(
    "value, match",
    [
        (float("nan"), "holds NaN or infinite values"),
        (float("inf"), "holds NaN or infinite values"),
        (None, "is stored as torch.int32"),
    ],
    ids=["nan", "inf", "int32"],
)
def test_weights_that_cannot_caption_are_refused(tmp_path, saved, value, match):
    path, model = saved
    bias = model.output_bias.detach().clone()
    if value is None:
        bias = bias.to(torch.int32)
    else:
        bias[3] = value
    tampered = rewrite(path, tmp_path / "bad.safetensors", tensors={"model/output_bias": bias})
    assert_one_line_error(tampered, f"weight output_bias {match}")


@pytest.mark.parametrize(
    "content",
    [b"", b"PK\x03\x04 this is a zip file, not a checkpoint", bytes(range(256)) * 4],
    ids=["empty", "text", "binary"],
)
def test_garbage_file(tmp_path, content):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(content)
    assert_one_line_error(path, "not a readable safetensors file")


def test_truncated_file(tmp_path, saved):
    path, _ = saved
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert_one_line_error(truncated, "not a readable safetensors file")


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}, {"format": '["torch_lstmcap"]'}])
def test_safetensors_file_of_another_kind(tmp_path, metadata):
    path = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2, 3)}, str(path), metadata=metadata)
    assert_one_line_error(path, "not a torch_lstmcap checkpoint")


def test_other_format_version(tmp_path, saved):
    path, _ = saved
    header = json.dumps({"name": "torch_lstmcap", "version": FORMAT_VERSION + 1})
    tampered = rewrite(path, tmp_path / "v2.safetensors", metadata={"format": header})
    assert_one_line_error(tampered, f"format version {FORMAT_VERSION + 1} is not supported")


@pytest.mark.parametrize(
    "change",
    [
        {"vocab": json.dumps(["<pad>", "a"])},
        {"vocab": None},
        {"encoder": json.dumps({"name": "x"})},
        *(
            {"encoder": json.dumps({**ENCODER.to_dict(), "preprocessing": preprocessing})}
            for preprocessing in (
                {"image_size": 0, "mean": [0.5] * 3, "std": [0.25] * 3},
                {"image_size": 100_000, "mean": [0.5] * 3, "std": [0.25] * 3},
                {"image_size": 224, "mean": [0.5] * 2, "std": [0.25] * 3},
                {"image_size": 224, "mean": "abc", "std": [0.25] * 3},
                {"image_size": 224, "mean": [0.5] * 3, "std": [0.0] * 3},
                {"image_size": 8, "mean": [0.5] * 3, "std": [0.25] * 3},
                {"image_size": 224, "mean": [0.5] * 3, "std": [1e-300] * 3},
                {"image_size": 224, "mean": [1e300] * 3, "std": [0.25] * 3},
            )
        ),
        {"vocab": "[" * 100_000 + "]" * 100_000},
        {"extra": "[1, 2]"},
        {"config": "{not json"},
        {"config": json.dumps({"vocab_size": VOCAB_SIZE, "layers": 2})},
        {"training": json.dumps({"__tensor__": "training/99"})},
        {"training": json.dumps({"__dict__": 5})},
    ],
    ids=[
        "bad-vocab",
        "no-vocab",
        "bad-encoder",
        "image-size-0",
        "image-size-huge",
        "two-means",
        "mean-string",
        "std-zero",
        "image-size-8",
        "std-tiny",
        "mean-huge",
        "deeply-nested",
        "extra-not-an-object",
        "bad-config",
        "unknown-config-field",
        "dangling-tensor",
        "bad-training",
    ],
)
def test_damaged_header(tmp_path, saved, change):
    path, _ = saved
    tampered = rewrite(path, tmp_path / "tampered.safetensors", metadata=change)
    assert_one_line_error(tampered, "damaged (header|training state) ")


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, saved, monkeypatch):
    path, model = saved
    before = path.read_bytes()

    def write_half_then_fail(tensors, filename, metadata=None):
        with open(filename, "wb") as partial:
            partial.write(b'\x10\x00\x00\x00\x00\x00\x00\x00{"__metadata__"')
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint_module, "save_file", write_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, make_model(seed=1), make_vocab(), ENCODER)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path / "new.safetensors", make_model(seed=1), make_vocab(), ENCODER)

    assert sorted(entry.name for entry in tmp_path.iterdir()) == [path.name]
    assert path.read_bytes() == before
    loaded = load_checkpoint(path)
    assert torch.equal(loaded.model.lstm.Wh, model.lstm.Wh)


def test_save_replaces_the_previous_checkpoint(tmp_path, saved):
    path, _ = saved
    newer = make_model(seed=1)
    save_checkpoint(path, newer, make_vocab(), ENCODER, extra={"epoch": 2})
    loaded = load_checkpoint(path)
    assert loaded.extra == {"epoch": 2}
    assert torch.equal(loaded.model.lstm.Wh, newer.lstm.Wh)
    assert sorted(entry.name for entry in tmp_path.iterdir()) == [path.name]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes")
def test_file_mode_is_that_of_a_plain_write(tmp_path):
    path = tmp_path / "model.safetensors"
    previous = os.umask(0o027)
    try:
        save_checkpoint(path, make_model(), make_vocab(), ENCODER)
        assert path.stat().st_mode & 0o777 == 0o640
        # Replacing a checkpoint keeps the mode its owner gave it.
        path.chmod(0o604)
        save_checkpoint(path, make_model(seed=1), make_vocab(), ENCODER)
        assert path.stat().st_mode & 0o777 == 0o604
    finally:
        os.umask(previous)


def test_loading_never_unpickles(tmp_path, saved, monkeypatch):
    _, model = saved
    optimizer, scheduler = make_optimizer(model)
    train_one_step(model, optimizer, scheduler, *make_batch())
    training = {"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}
    path = save_checkpoint(
        tmp_path / "last.safetensors", model, make_vocab(), ENCODER, training=training
    )

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling on the loading path")

    for module, name in [
        (pickle, "loads"),
        (pickle, "load"),
        (pickle, "Unpickler"),
        (torch, "load"),
    ]:
        monkeypatch.setattr(module, name, refuse)
    loaded = load_checkpoint(path)
    assert loaded.training["optimizer"]["state"].keys() == optimizer.state_dict()["state"].keys()
