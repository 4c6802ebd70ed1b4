"""The Show-and-Tell captioner: image features in, word log-probabilities out.

    features (N, F) -> LayerNorm -> dropout -> Linear -> v (N, E)       image vector
    h0 = tanh(W_h v), c0 = tanh(W_c v)                                   state from the image
    x_t = [embed(w_t) ; v]  (N, T, 2E)                                   the image at every step
    h = LSTM(x, (h0, c0))   (N, T, E)                                    torch_lstmcap.lstm
    logits = dropout(h) @ embed.weight^T + bias   (N, T, V)              tied output layer

The image enters twice: it sets the initial state (Vinyals et al., 2015) and is fed beside every
word, so it is not forgotten over a long sentence. The output layer reuses the word-embedding
matrix (weight tying, Press and Wolf, 2017), which is why the embedding and hidden sizes are one
number: on a corpus the size of Flickr8k it regularises, and halves the checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .lstm import LSTM, lstm_forward, lstm_step


@dataclass(frozen=True)
class CaptionerConfig:
    """Hyper-parameters of :class:`Captioner`; stored in every checkpoint."""

    vocab_size: int
    feature_dim: int = 1280
    hidden_size: int = 512
    dropout: float = 0.5
    pad_id: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> CaptionerConfig:
        return cls(**values)


class Captioner(nn.Module):
    """LSTM caption decoder over pooled image features.

    Training uses :meth:`forward` (teacher forcing, the whole sequence through the LSTM's
    sequence Function); decoding uses :meth:`init_state` and :meth:`step` (the step Function),
    the protocol :mod:`torch_lstmcap.decoding` expects.
    """

    def __init__(self, config: CaptionerConfig):
        super().__init__()
        self.config = config
        size = config.hidden_size
        self.feature_norm = nn.LayerNorm(config.feature_dim)
        self.image_proj = nn.Linear(config.feature_dim, size)
        self.init_h = nn.Linear(size, size)
        self.init_c = nn.Linear(size, size)
        self.embedding = nn.Embedding(config.vocab_size, size, padding_idx=config.pad_id)
        self.lstm = LSTM(2 * size, size)
        self.output_bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.dropout = nn.Dropout(config.dropout)
        nn.init.normal_(self.embedding.weight, std=size**-0.5)

    def image_vector(self, features: torch.Tensor) -> torch.Tensor:
        """features: (N, F) -> v: (N, E)."""
        return self.image_proj(self.dropout(self.feature_norm(features)))

    def init_state(self, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """features: (N, F) -> decoding state (h, c, v), each (N, E)."""
        image = self.image_vector(features)
        return torch.tanh(self.init_h(image)), torch.tanh(self.init_c(image)), image

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (..., E) -> (..., V), through the tied embedding matrix."""
        return F.linear(self.dropout(hidden), self.embedding.weight, self.output_bias)

    def forward(self, features: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits for every next word.

        Args:
            features: (N, F) pooled image features.
            captions: (N, L) word ids ``<start> w1 .. wk <end> <pad>..``.

        Returns:
            (N, L-1, V) logits; position t predicts ``captions[:, t + 1]``.
        """
        prev_h, prev_c, image = self.init_state(features)
        words = self.dropout(self.embedding(captions[:, :-1]))  # (N, T, E), T = L - 1
        image_steps = image.unsqueeze(1).expand(-1, words.shape[1], -1)  # (N, T, E)
        inputs = torch.cat([words, image_steps], dim=2)  # (N, T, 2E)
        lstm = self.lstm
        hidden, _ = lstm_forward(inputs, prev_h, lstm.Wx, lstm.Wh, lstm.b, c0=prev_c)
        return self.logits(hidden)

    def loss(
        self, features: torch.Tensor, captions: torch.Tensor, label_smoothing: float = 0.0
    ) -> torch.Tensor:
        """Mean cross-entropy over the real (non-pad) next words of ``captions``: (N, L)."""
        logits = self(features, captions)
        targets = captions[:, 1:]
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            targets.reshape(-1),
            ignore_index=self.config.pad_id,
            label_smoothing=label_smoothing,
        )

    def step(
        self, words: torch.Tensor, state: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """One decoding step.

        Args:
            words: (B,) previous word ids (``<start>`` first).
            state: (h, c, v), each (B, E).

        Returns:
            log_probs: (B, V) float32; the new state.
        """
        prev_h, prev_c, image = state
        inputs = torch.cat([self.embedding(words), image], dim=1)  # (B, 2E)
        lstm = self.lstm
        next_h, next_c = lstm_step(inputs, prev_h, prev_c, lstm.Wx, lstm.Wh, lstm.b)
        log_probs = F.log_softmax(self.logits(next_h).float(), dim=-1)
        return log_probs, (next_h, next_c, image)

    def extend_vocab(self, new_size: int) -> None:
        """Grow the vocabulary to ``new_size`` words; old rows keep their trained values."""
        old_size = self.config.vocab_size
        if new_size < old_size:
            raise ValueError(f"new_size {new_size} is smaller than the vocabulary ({old_size})")
        size = self.config.hidden_size
        weight = self.embedding.weight
        embedding = nn.Embedding(new_size, size, padding_idx=self.config.pad_id).to(weight)
        nn.init.normal_(embedding.weight, std=size**-0.5)
        bias = torch.zeros(new_size).to(self.output_bias)
        with torch.no_grad():
            embedding.weight[:old_size] = weight
            bias[:old_size] = self.output_bias
        self.embedding = embedding
        self.output_bias = nn.Parameter(bias)
        self.config = CaptionerConfig(**{**self.config.to_dict(), "vocab_size": new_size})
