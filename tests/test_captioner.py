"""Tests of the Captioner: shapes, the masked loss, the hand-written LSTM Functions on both the
sequence and the step path, gradients, the decoding protocol, vocabulary growth, dropout and
bfloat16 autocast."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_lstmcap.captioner as captioner_module
from torch_lstmcap import products
from torch_lstmcap.captioner import Captioner, CaptionerConfig
from torch_lstmcap.decoding import beam_search, greedy_decode

PAD, START, END, UNK = 0, 1, 2, 3
VOCAB_SIZE, FEATURE_DIM, HIDDEN_SIZE = 50, 12, 16
SPECIAL_IDS = {"start_id": START, "end_id": END, "unk_id": UNK, "pad_id": PAD}


def make_model(seed: int = 0, dropout: float = 0.3, image_at_output: bool = False) -> Captioner:
    """A small captioner whose output bias is random too, so no parameter starts at zero."""
    torch.manual_seed(seed)
    config = CaptionerConfig(
        vocab_size=VOCAB_SIZE,
        feature_dim=FEATURE_DIM,
        hidden_size=HIDDEN_SIZE,
        dropout=dropout,
        pad_id=PAD,
        image_at_output=image_at_output,
    )
    model = Captioner(config)
    with torch.no_grad():
        model.output_bias.normal_(std=0.5)
    return model


def make_batch(lengths: tuple[int, ...], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """features: (N, F) and captions: (N, L), rows ``<start> w.. <end> <pad>..`` of ``lengths``
    words each, L = max(lengths) + 2."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(len(lengths), FEATURE_DIM, generator=generator)
    captions = torch.full((len(lengths), max(lengths) + 2), PAD, dtype=torch.long)
    for row, length in enumerate(lengths):
        words = torch.randint(UNK + 1, VOCAB_SIZE, (length,), generator=generator)
        captions[row, : length + 2] = torch.cat([torch.tensor([START]), words, torch.tensor([END])])
    return features, captions


def graph_nodes(tensor: torch.Tensor) -> set[str]:
    """Class names of every node in the autograd graph behind ``tensor``."""
    names, seen, stack = set(), set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def test_shapes():
    model = make_model().eval()
    features, captions = make_batch((3, 5, 1))

    logits = model(features, captions)
    assert logits.shape == (3, captions.shape[1] - 1, VOCAB_SIZE)

    state = model.init_state(features)
    assert [tuple(tensor.shape) for tensor in state] == [(3, HIDDEN_SIZE)] * 2
    log_probs, next_state = model.step(captions[:, 0], state)
    assert log_probs.shape == (3, VOCAB_SIZE)
    assert log_probs.dtype == torch.float32
    torch.testing.assert_close(log_probs.exp().sum(1), torch.ones(3))
    assert [tuple(tensor.shape) for tensor in next_state] == [(3, HIDDEN_SIZE)] * 2


def test_loss_is_cross_entropy_over_real_words_only():
    model = make_model().eval()
    features, captions = make_batch((2, 6, 4))

    logits = model(features, captions)
    targets = captions[:, 1:]
    real = targets != PAD
    token_log_probs = logits.log_softmax(-1).gather(2, targets[..., None]).squeeze(2)
    expected = -(token_log_probs * real).sum() / real.sum()
    torch.testing.assert_close(model.loss(features, captions), expected)

    # Padding the batch further only adds pad targets, which must count for nothing.
    longer = F.pad(captions, (0, 5), value=PAD)
    torch.testing.assert_close(model.loss(features, longer), expected)


def test_targets_only_logits_are_the_full_logits_at_real_targets():
    model = make_model().eval()
    features, captions = make_batch((2, 6, 4))
    pad_targets = captions[:, 1:] == PAD
    assert pad_targets.any() and not pad_targets.all()

    full = model(features, captions)  # (N, T, V)
    targets_only = model(features, captions, targets_only=True)  # (K, V)
    assert targets_only.shape == (int((~pad_targets).sum()), VOCAB_SIZE)
    torch.testing.assert_close(targets_only, full[~pad_targets])


def test_label_smoothing_is_masked_too():
    model = make_model().eval()
    features, captions = make_batch((2, 6, 4))
    smoothing = 0.1

    log_probs = model(features, captions).log_softmax(-1)  # (N, T, V)
    targets = captions[:, 1:]
    real = targets != PAD
    nll = -log_probs.gather(2, targets[..., None]).squeeze(2)
    uniform = -log_probs.mean(-1)
    expected = (((1 - smoothing) * nll + smoothing * uniform) * real).sum() / real.sum()

    longer = F.pad(captions, (0, 3), value=PAD)
    torch.testing.assert_close(model.loss(features, captions, label_smoothing=smoothing), expected)
    torch.testing.assert_close(model.loss(features, longer, label_smoothing=smoothing), expected)


def test_decoder_runs_on_the_hand_written_lstm_functions(monkeypatch):
    model = make_model().train()
    features, captions = make_batch((3, 5))
    calls = {"lstm_forward": 0, "lstm_step": 0}

    def counted(name):
        function = getattr(captioner_module, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        return wrapper

    for name in calls:
        monkeypatch.setattr(captioner_module, name, counted(name))

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.nn.LSTM must not be used")

    monkeypatch.setattr(nn.LSTM, "forward", forbidden)

    logits = model(features, captions)
    assert calls == {"lstm_forward": 1, "lstm_step": 0}
    nodes = graph_nodes(logits)
    assert "LSTMSequenceFunctionBackward" in nodes
    assert "LSTMStepFunctionBackward" not in nodes

    log_probs, _ = model.step(captions[:, 0], model.init_state(features))
    assert calls == {"lstm_forward": 1, "lstm_step": 1}
    nodes = graph_nodes(log_probs)
    assert "LSTMStepFunctionBackward" in nodes
    assert "LSTMSequenceFunctionBackward" not in nodes


@pytest.mark.parametrize("image_at_output", [False, True])
def test_teacher_forcing_equals_step_by_step_decoding(image_at_output):
    model = make_model(image_at_output=image_at_output).eval()
    features, captions = make_batch((3, 7, 5))

    with torch.no_grad():
        sequence_log_probs = model(features, captions).log_softmax(-1)  # (N, T, V)
        targets = model(features, captions, targets_only=True).log_softmax(-1)  # (K, V)
        real = captions[:, 1:] != PAD
        torch.testing.assert_close(targets, sequence_log_probs[real], atol=1e-5, rtol=1e-5)
        state = model.init_state(features)
        for t in range(captions.shape[1] - 1):
            step_log_probs, state = model.step(captions[:, t], state)
            torch.testing.assert_close(
                step_log_probs, sequence_log_probs[:, t], atol=1e-5, rtol=1e-5
            )


def test_decoding_weights_are_made_once_and_again_when_the_weights_change():
    model = make_model().eval()
    features, captions = make_batch((4, 6))
    words = captions[:, 1]

    def step_both_ways():
        state = model.init_state(features)
        with torch.enable_grad():
            multiplied, _ = model.step(words, state)  # grad on: x @ Wx + b each step
        with torch.no_grad():
            looked_up, _ = model.step(words, state)  # no grad: a row of the table
        return multiplied.detach(), looked_up

    multiplied, looked_up = step_both_ways()
    torch.testing.assert_close(looked_up, multiplied, atol=1e-6, rtol=1e-6)
    weights = model.decoding_weights()
    assert weights.input_gates.shape == (VOCAB_SIZE, 4 * HIDDEN_SIZE)
    if products.onednn_linear() is not None:
        # Both products of a step read weights packed once for oneDNN.
        assert weights.packed_Wh.shape == (4 * HIDDEN_SIZE, HIDDEN_SIZE)
        assert weights.packed_embedding.shape == (VOCAB_SIZE, HIDDEN_SIZE)
    assert model.decoding_weights() is weights, "kept between steps"
    # Packed weights cannot be copied; a copy of the model makes its own and decodes the same.
    copied = copy.deepcopy(model)
    with torch.no_grad():
        state = model.init_state(features)
        torch.testing.assert_close(copied.step(words, state)[0], model.step(words, state)[0])

    # A training step changes the weights in place; the table must follow.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    model.loss(features, captions).backward()
    optimizer.step()
    model.eval()
    multiplied_after, looked_up_after = step_both_ways()
    assert not torch.allclose(multiplied_after, multiplied, atol=1e-3)
    torch.testing.assert_close(looked_up_after, multiplied_after, atol=1e-6, rtol=1e-6)

    assert model.decoding_weights() is not weights

    model.double()
    weights = model.decoding_weights()
    assert weights.input_gates.dtype == torch.float64
    assert weights.packed_Wh is None and weights.packed_embedding is None, "oneDNN is float32"
    with torch.no_grad():
        model.step(words, model.init_state(features.double()))


def test_a_model_made_under_inference_mode_decodes_as_any_other():
    # Its tensors have no version counter, which the decoding weights' key otherwise reads.
    features, captions = make_batch((2, 3))
    with torch.inference_mode():
        model = make_model().eval()
        got, _ = model.step(captions[:, 0], model.init_state(features))
    reference = make_model().eval()
    with torch.no_grad():
        expected, _ = reference.step(captions[:, 0], reference.init_state(features))
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


@pytest.mark.skipif(products.onednn_linear() is None, reason="this torch build has no oneDNN")
def test_decoding_steps_read_the_packed_weights(monkeypatch):
    model = make_model().eval()
    features, captions = make_batch((2, 3))
    received = {}

    def spy(name, function, position):
        def wrapper(*args):
            received[name] = args[position]
            return function(*args)

        return wrapper

    monkeypatch.setattr(
        captioner_module, "lstm_step", spy("packed_Wh", captioner_module.lstm_step, 6)
    )
    monkeypatch.setattr(captioner_module, "linear", spy("packed", captioner_module.linear, 3))
    with torch.no_grad():
        model.step(captions[:, 0], model.init_state(features))
    weights = model.decoding_weights()
    assert received["packed_Wh"] is weights.packed_Wh is not None
    assert received["packed"] is weights.packed_embedding is not None


@pytest.mark.parametrize("image_at_output", [False, True])
def test_gradients_reach_every_parameter(image_at_output):
    model = make_model(image_at_output=image_at_output).train()
    features, captions = make_batch((3, 5, 2))
    model.loss(features, captions).backward()

    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_decoding_protocol_with_greedy_and_beam_search():
    model = make_model().eval()
    features, _ = make_batch((1, 1, 1, 1))
    max_length = 6

    greedy = greedy_decode(model, features, max_length=max_length, **SPECIAL_IDS)
    beams = beam_search(model, features, beam_size=4, top_k=2, max_length=max_length, **SPECIAL_IDS)
    single_beam = beam_search(model, features, beam_size=1, max_length=max_length, **SPECIAL_IDS)

    assert len(greedy) == len(beams) == len(single_beam) == features.shape[0]
    assert [captions[0] for captions in single_beam] == greedy
    for image, caption in enumerate(greedy):
        assert 1 <= len(caption.token_ids) <= max_length
        assert all(UNK < word < VOCAB_SIZE for word in caption.token_ids)
        assert len(beams[image]) == 2

        # The reported log-probability is the model's own, step by step along the caption.
        words = [START, *caption.token_ids] + ([END] if caption.finished else [])
        state = model.init_state(features[image : image + 1])
        total = 0.0
        with torch.no_grad():
            for previous, word in zip(words[:-1], words[1:], strict=True):
                log_probs, state = model.step(torch.tensor([previous]), state)
                total += log_probs[0, word].item()
        assert caption.log_prob == pytest.approx(total, abs=1e-4)


def test_extend_vocab_keeps_old_words():
    model = make_model().eval()
    features, captions = make_batch((3, 5))
    old_embedding = model.embedding.weight.detach().clone()
    old_bias = model.output_bias.detach().clone()
    with torch.no_grad():
        old_logits = model(features, captions)

    new_size = VOCAB_SIZE + 7
    model.extend_vocab(new_size)

    assert model.config.vocab_size == new_size
    assert model.embedding.weight.shape == (new_size, HIDDEN_SIZE)
    assert model.embedding.padding_idx == PAD
    assert torch.equal(model.embedding.weight[:VOCAB_SIZE], old_embedding)
    assert torch.equal(model.output_bias[:VOCAB_SIZE], old_bias)
    assert model.embedding.weight.requires_grad and model.output_bias.requires_grad
    # Probabilities change (the softmax now spreads over more words); the old words' logits
    # must not.
    with torch.no_grad():
        new_logits = model(features, captions)
    assert new_logits.shape[-1] == new_size
    torch.testing.assert_close(new_logits[..., :VOCAB_SIZE], old_logits)

    captions[0, 1] = new_size - 1
    model.train()
    model.loss(features, captions).backward()
    assert model.embedding.weight.grad[new_size - 1].abs().sum() > 0


def test_extend_vocab_keeps_dtype_and_refuses_to_shrink():
    model = make_model().double()
    model.extend_vocab(VOCAB_SIZE + 1)
    assert model.embedding.weight.dtype == model.output_bias.dtype == torch.float64
    with pytest.raises(ValueError, match="smaller"):
        model.extend_vocab(VOCAB_SIZE - 1)


def test_dropout_only_in_training():
    model = make_model(dropout=0.5)
    features, captions = make_batch((3, 5))

    model.train()
    assert not torch.equal(model(features, captions), model(features, captions))

    model.eval()
    torch.testing.assert_close(model(features, captions), model(features, captions), rtol=0, atol=0)
    state = model.init_state(features)
    first, _ = model.step(captions[:, 0], state)
    second, _ = model.step(captions[:, 0], state)
    assert torch.equal(first, second)


def test_bfloat16_autocast_on_cpu():
    model = make_model().train()
    features, captions = make_batch((3, 5))
    with torch.no_grad():
        reference = model.eval()(features, captions)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(features, captions)
        log_probs, _ = model.step(captions[:, 0], model.init_state(features))
        model.train()
        loss = model.loss(features, captions)
    assert logits.dtype == torch.bfloat16
    assert log_probs.dtype == torch.float32
    torch.testing.assert_close(logits.float(), reference, atol=0.1, rtol=0.05)

    assert torch.isfinite(loss)
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.dtype == torch.float32, name
        assert torch.isfinite(parameter.grad).all(), name
