"""Self-critical training: the log-probabilities it weights and the reward it raises."""

import pytest
import torch

from torch_lstmcap.captioner import Captioner, CaptionerConfig
from torch_lstmcap.decoding import sample_captions
from torch_lstmcap.metrics import CiderD
from torch_lstmcap.training import (
    LengthBucketSampler,
    sampled_log_probs,
    train_self_critical_epoch,
    warmup_cosine,
)
from torch_lstmcap.vocab import SPECIALS as SPECIAL_WORDS
from torch_lstmcap.vocab import Vocabulary

WORDS = ["a", "dog", "cat", "runs", "sleeps", "on", "grass", "sofa", "red", "ball"]
VOCAB = Vocabulary([*SPECIAL_WORDS, *WORDS])
SPECIALS = {
    "start_id": VOCAB.start_id,
    "end_id": VOCAB.end_id,
    "unk_id": VOCAB.unk_id,
    "pad_id": VOCAB.pad_id,
}


def small_model(seed: int = 0) -> Captioner:
    torch.manual_seed(seed)
    config = CaptionerConfig(vocab_size=len(VOCAB), feature_dim=8, hidden_size=32, dropout=0.3)
    return Captioner(config).double()


def test_sampled_log_probs_equal_the_step_by_step_probabilities_of_the_same_captions():
    # The gradient pass runs the sampled captions through the sequence Function at once; it
    # must score them exactly as the step-wise decoder that drew them did.
    model = small_model().eval()
    features = torch.randn(12, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    sampled = sample_captions(
        model, features, **SPECIALS, max_length=6, generator=torch.Generator().manual_seed(2)
    )
    captions = torch.cat([torch.full((12, 1), VOCAB.start_id), sampled], dim=1)
    logits = model(features, captions, targets_only=True)
    ours = sampled_log_probs(logits, captions, VOCAB)

    expected = torch.zeros(12, dtype=torch.float64)
    state = model.init_state(features)
    forbidden = [VOCAB.start_id, VOCAB.unk_id, VOCAB.pad_id]
    with torch.no_grad():
        for step in range(sampled.shape[1]):
            log_probs, state = model.step(captions[:, step], state)
            log_probs = log_probs.double()
            log_probs[:, forbidden] = float("-inf")
            if step == 0:
                log_probs[:, VOCAB.end_id] = float("-inf")
            log_probs = log_probs.log_softmax(dim=1)
            drawn = sampled[:, step]
            real = drawn != VOCAB.pad_id
            expected[real] += log_probs[real, drawn[real]]
    assert torch.isfinite(ours).all()
    assert torch.allclose(ours, expected, atol=1e-10)

    ours.sum().backward()
    assert model.embedding.weight.grad is not None
    assert model.lstm.Wh.grad.abs().sum() > 0


def test_self_critical_epochs_raise_the_reward_of_sampled_captions():
    # Four "images", each with its own two references; a model that starts out random must
    # learn, from its own samples and their CIDEr-D alone, to say what each image shows.
    references = [
        [["a", "dog", "runs", "on", "grass"], ["a", "dog", "runs"]],
        [["a", "cat", "sleeps", "on", "a", "sofa"], ["a", "cat", "sleeps"]],
        [["a", "red", "ball"], ["a", "red", "ball", "on", "grass"]],
        [["a", "dog", "sleeps", "on", "a", "sofa"], ["a", "dog", "sleeps"]],
    ]
    reward = CiderD(references)
    features = torch.eye(4, 8, dtype=torch.float64) * 3
    model = small_model(seed=4)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(20, 1))
    sampler = LengthBucketSampler([0] * 4, batch_size=4)

    rewards = []
    for epoch in range(1, 21):
        sampler.set_epoch(epoch)
        result = train_self_critical_epoch(
            model, list(sampler), features, reward, VOCAB, optimizer, scheduler,
            device=torch.device("cpu"), samples_per_image=8, max_length=8, epoch=epoch,
            progress=False,
        )  # fmt: skip
        rewards.append(result.reward)
    assert result.steps == 1
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.5, rewards
    assert not model.training, "dropout stays off: samples and their scores share one model"


def test_self_critical_needs_two_samples_per_image():
    with pytest.raises(ValueError, match="at least 2"):
        train_self_critical_epoch(
            small_model(), [[0]], torch.zeros(1, 8), CiderD([[["a"]]]), VOCAB, None, None,
            device=torch.device("cpu"), samples_per_image=1,
        )  # fmt: skip
