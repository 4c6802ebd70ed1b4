"""The Show-and-Tell captioner: image features in, word log-probabilities out.

    features (N, F) -> LayerNorm -> dropout -> Linear -> v (N, E)       image vector
    h0 = tanh(W_h v), c0 = tanh(W_c v)                                   state from the image
    x_t = embed(w_t)        (N, T, E)                                    words
    h = LSTM(x, (h0, c0))   (N, T, E)                                    torch_lstmcap.lstm
    logits = dropout(h + W_o v) @ embed.weight^T + bias   (N, T, V)      tied output layer

The image sets the initial state (Vinyals et al., 2015). With ``image_at_output`` it also
reaches every word prediction directly, through W_o ("merge", Tanti et al., 2018): the
LSTM need not carry what the photograph shows through the whole sentence.

The output layer reuses the word-embedding matrix (weight tying, Press and Wolf, 2017),
which is why the embedding and hidden sizes are one number: on a corpus the size of Flickr8k
it regularises, and it halves the checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .lstm import LSTM, lstm_forward, lstm_step
from .products import linear, pack_weight, values_key


@dataclass(frozen=True)
class CaptionerConfig:
    """Hyper-parameters of :class:`Captioner`; stored in every checkpoint."""

    vocab_size: int
    feature_dim: int = 1280
    hidden_size: int = 512
    dropout: float = 0.5
    pad_id: int = 0
    image_at_output: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> CaptionerConfig:
        return cls(**values)

    def check(self) -> None:
        """Refuse values no model can be built from (a checkpoint header is checked, not
        trusted).

        Raises:
            ValueError: sizes below 1, a dropout outside [0, 1), a pad id outside the
                vocabulary.
        """
        for name in ("vocab_size", "feature_dim", "hidden_size", "pad_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an integer of at least 0: {value!r}")
        if min(self.vocab_size, self.feature_dim, self.hidden_size) < 1:
            raise ValueError("vocab_size, feature_dim and hidden_size must be at least 1")
        if not isinstance(self.dropout, int | float) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be a number in [0, 1): {self.dropout!r}")
        if self.pad_id >= self.vocab_size:
            raise ValueError(f"pad_id {self.pad_id} is outside the vocabulary")
        if not isinstance(self.image_at_output, bool):
            raise ValueError(f"image_at_output must be true or false: {self.image_at_output!r}")


@dataclass(frozen=True)
class DecodingWeights:
    """What a decoding step reads in place of the captioner's own weights, made once.

    input_gates: (V, 4E) ``embed(w) @ Wx + b`` for every word w, the input part of the LSTM
        gates: a step reads B rows of it instead of multiplying (B, E) by (E, 4E).
    packed_Wh: (4E, E) the recurrent weight, and packed_embedding: (V, E) the tied output
        layer's, in oneDNN's own layout (``products.pack_weight``), or None off oneDNN: the
        products of a step then skip copying them into it, most of their work when a search
        has few rows.
    """

    input_gates: torch.Tensor
    packed_Wh: torch.Tensor | None
    packed_embedding: torch.Tensor | None


class Captioner(nn.Module):
    """LSTM caption decoder over pooled image features.

    Training uses :meth:`forward` (teacher forcing, the whole sequence through the LSTM's
    sequence Function); decoding uses :meth:`init_state` and :meth:`step` (the step Function),
    the protocol :mod:`torch_lstmcap.decoding` expects.
    """

    def __init__(self, config: CaptionerConfig):
        super().__init__()
        config.check()
        self.config = config
        size = config.hidden_size
        self.feature_norm = nn.LayerNorm(config.feature_dim)
        self.image_proj = nn.Linear(config.feature_dim, size)
        self.init_h = nn.Linear(size, size)
        self.init_c = nn.Linear(size, size)
        self.embedding = nn.Embedding(config.vocab_size, size, padding_idx=config.pad_id)
        self.lstm = LSTM(size, size)
        self.output_bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.dropout = nn.Dropout(config.dropout)
        self.image_to_output = nn.Linear(size, size) if config.image_at_output else None
        nn.init.normal_(self.embedding.weight, std=size**-0.5)
        self._decoding_weights: DecodingWeights | None = None
        self._decoding_weights_key: tuple | None = None

    def image_vector(self, features: torch.Tensor) -> torch.Tensor:
        """features: (N, F) -> v: (N, E)."""
        return self.image_proj(self.dropout(self.feature_norm(features)))

    def init_state(self, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """features: (N, F) -> decoding state (h, c), each (N, E); with ``image_at_output``
        (h, c, W_o v), the image's term of every output, carried along with the rows."""
        image = self.image_vector(features)
        state = (torch.tanh(self.init_h(image)), torch.tanh(self.init_c(image)))
        if self.image_to_output is not None:
            state += (self.image_to_output(image),)
        return state

    def logits(
        self,
        hidden: torch.Tensor,
        image_term: torch.Tensor | None = None,
        packed_embedding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden: (..., E), plus image_term W_o v broadcast to it -> (..., V), through the
        tied embedding matrix (or its packed copy, see :class:`DecodingWeights`)."""
        if image_term is not None:
            hidden = hidden + image_term
        weight = self.embedding.weight
        return linear(self.dropout(hidden), weight, self.output_bias, packed_embedding)

    def forward(
        self, features: torch.Tensor, captions: torch.Tensor, targets_only: bool = False
    ) -> torch.Tensor:
        """Teacher-forced logits for every next word.

        Args:
            features: (N, F) pooled image features.
            captions: (N, L) word ids ``<start> w1 .. wk <end> <pad>..``.
            targets_only: return logits only where the next word is not padding, as
                (K, V) in row-major order of ``captions[:, 1:]``; the output layer, the
                largest product of a training step, then skips the padding.

        Returns:
            (N, L-1, V) logits, position t predicting ``captions[:, t + 1]``; or (K, V).
        """
        prev_h, prev_c, *image_term = self.init_state(features)
        words = self.dropout(self.embedding(captions[:, :-1]))  # (N, T, E), T = L - 1
        lstm = self.lstm
        hidden, _ = lstm_forward(words, prev_h, lstm.Wx, lstm.Wh, lstm.b, c0=prev_c)
        image_term = image_term[0][:, None].expand_as(hidden) if image_term else None
        if targets_only:
            real = captions[:, 1:] != self.config.pad_id
            hidden = hidden[real]  # (K, E)
            image_term = None if image_term is None else image_term[real]
        return self.logits(hidden, image_term)

    def loss(
        self, features: torch.Tensor, captions: torch.Tensor, label_smoothing: float = 0.0
    ) -> torch.Tensor:
        """Mean cross-entropy over the real (non-pad) next words of ``captions``: (N, L)."""
        return caption_loss(
            self(features, captions, targets_only=True), captions, self.config, label_smoothing
        )

    def step(
        self, words: torch.Tensor, state: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """One decoding step.

        Args:
            words: (B,) previous word ids (``<start>`` first).
            state: (h, c), each (B, E), and the image term W_o v with ``image_at_output``.

        Returns:
            log_probs: (B, V) float32; the new state.
        """
        prev_h, prev_c, *image_term = state
        image_term = image_term[0] if image_term else None
        lstm = self.lstm
        if torch.is_grad_enabled() or self.training:
            x = self.dropout(self.embedding(words))
            next_h, next_c = lstm_step(x, prev_h, prev_c, lstm.Wx, lstm.Wh, lstm.b)
            logits = self.logits(next_h, image_term)
        else:
            # Decoding: each word's input gates are a row of the table, not a product.
            weights = self.decoding_weights()
            input_gates = weights.input_gates.index_select(0, words)  # (B, 4E)
            next_h, next_c = lstm_step(
                input_gates, prev_h, prev_c, None, lstm.Wh, None, weights.packed_Wh
            )
            logits = self.logits(next_h, image_term, weights.packed_embedding)
        next_state = (next_h, next_c) if image_term is None else (next_h, next_c, image_term)
        return F.log_softmax(logits.float(), dim=-1), next_state

    def decoding_weights(self) -> DecodingWeights:
        """The :class:`DecodingWeights` of the current weights.

        Kept between calls and made again after any change to the weights they come from
        (training steps, ``to()``, loading).
        """
        sources = (self.embedding.weight, self.lstm.Wx, self.lstm.b, self.lstm.Wh)
        key = tuple(values_key(t) for t in sources)
        if key != self._decoding_weights_key:
            with torch.no_grad():
                self._decoding_weights = DecodingWeights(
                    input_gates=torch.addmm(self.lstm.b, self.embedding.weight, self.lstm.Wx),
                    packed_Wh=pack_weight(self.lstm.Wh.t()),
                    packed_embedding=pack_weight(self.embedding.weight),
                )
            self._decoding_weights_key = key
        return self._decoding_weights

    def __getstate__(self) -> dict:
        # oneDNN's packed tensors cannot be copied or pickled: a copy makes its own.
        return {**self.__dict__, "_decoding_weights": None, "_decoding_weights_key": None}

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


def caption_loss(
    target_logits: torch.Tensor,
    captions: torch.Tensor,
    config: CaptionerConfig,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Mean cross-entropy of ``forward(..., targets_only=True)`` logits (K, V) against the
    non-pad next words of ``captions`` (N, L)."""
    targets = captions[:, 1:]
    targets = targets[targets != config.pad_id]  # (K,)
    return F.cross_entropy(target_logits.float(), targets, label_smoothing=label_smoothing)
