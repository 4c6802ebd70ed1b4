"""Greedy decoding and batched beam search over a step-wise caption decoder.

Both decoders talk to the model through two calls only:

    state = model.init_state(features)           # features: (B, F) -> tuple of (B, ...) tensors
    log_probs, state = model.step(words, state)  # words: (B,) long -> log_probs: (B, V)

``step`` receives the previous word of each row (``<start>`` on the first call) and returns
log-softmax scores for the next one. Put the model in ``eval()`` mode first: decoding does not
change the model's mode, and dropout left on makes the captions random.

Conventions shared by both decoders:

- ``<start>``, ``<unk>`` and ``<pad>`` are never emitted, and ``<end>`` is not allowed as the
  first token, so every caption has at least one word.
- ``max_length`` is the most tokens generated per caption, ``<end>`` included: a finished
  caption has at most ``max_length - 1`` words, and a caption still open after ``max_length``
  steps is returned as it stands, with ``max_length`` words and ``finished=False``.
- ``Caption.log_prob`` is the sum of the log-probabilities of the generated tokens, ``<end>``
  included when it was emitted. ``Caption.score`` normalises it by length in the style of
  GNMT (Wu et al., 2016): ``log_prob / ((5 + length) / 6) ** length_penalty``, where
  ``length`` counts the same tokens as ``log_prob``. ``length_penalty=0`` ranks by raw
  log-probability, which favours short captions; larger values favour longer ones.
"""

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

DEFAULT_LENGTH_PENALTY = 0.7


@dataclass(frozen=True)
class Caption:
    """One decoded caption.

    token_ids: word ids, without ``<start>`` and ``<end>``; never empty.
    log_prob: sum of the token log-probabilities, ``<end>`` included if emitted.
    score: ``log_prob`` normalised by length (see the module docstring).
    finished: whether the caption ended with ``<end>`` rather than at ``max_length``.
    """

    token_ids: list[int]
    log_prob: float
    score: float
    finished: bool


def _length_penalty_divisor(lengths: torch.Tensor, length_penalty: float) -> torch.Tensor:
    """GNMT length penalty ``((5 + length) / 6) ** length_penalty``; scores are log_prob / it.

    lengths: (N,) number of tokens each log-probability covers.
    Returns: (N,) float divisors, 1 for a single token and for ``length_penalty=0``.
    """
    return ((5 + lengths.to(torch.get_default_dtype())) / 6) ** length_penalty


def _forbidden_ids(
    start_id: int, end_id: int, unk_id: int, pad_id: int | None, device: torch.device
) -> torch.Tensor:
    forbidden = {start_id, unk_id} | ({pad_id} if pad_id is not None else set())
    if end_id in forbidden:
        raise ValueError(f"end_id {end_id} is also the id of <start>, <unk> or <pad>")
    return torch.tensor(sorted(forbidden), dtype=torch.long, device=device)


def _masked_log_probs(
    log_probs: torch.Tensor, forbidden: torch.Tensor, end_id: int, first_step: bool
) -> torch.Tensor:
    """Copy the step's log_probs (R, V), with the tokens that may not be emitted set to -inf.

    Half-precision scores are promoted to float32 so that sums over twenty steps stay exact
    enough to rank hypotheses.
    """
    if first_step:
        vocab_size = log_probs.shape[1]
        if max(forbidden.tolist() + [end_id]) >= vocab_size:
            raise ValueError(f"a special token id is outside the vocabulary of {vocab_size} words")
        if forbidden.numel() + 1 >= vocab_size:
            raise ValueError("the vocabulary has no word that decoding may emit")

    dtype = torch.promote_types(log_probs.dtype, torch.float32)
    masked = log_probs.to(dtype=dtype, copy=True)
    masked.index_fill_(1, forbidden, float("-inf"))
    if first_step:
        masked[:, end_id] = float("-inf")
    return masked


def _check_max_length(max_length: int) -> None:
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")


@torch.inference_mode()
def greedy_decode(
    model,
    features: torch.Tensor,
    *,
    start_id: int,
    end_id: int,
    unk_id: int,
    pad_id: int | None = None,
    max_length: int = 20,
    length_penalty: float = DEFAULT_LENGTH_PENALTY,
) -> list[Caption]:
    """Caption each image with its most likely next word at every step.

    features: (B, F) image features, on the model's device.
    length_penalty only sets ``Caption.score``; greedy decoding has no choice to rank.
    Returns: B captions, one per image, in the order of ``features``.
    """
    _check_max_length(max_length)
    batch_size = features.shape[0]
    device = features.device
    forbidden = _forbidden_ids(start_id, end_id, unk_id, pad_id, device)

    state = model.init_state(features)
    words = torch.full((batch_size,), start_id, dtype=torch.long, device=device)
    log_prob = torch.zeros(batch_size, device=device)
    num_words = torch.zeros(batch_size, dtype=torch.long, device=device)
    finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
    emitted = []

    for step in range(max_length):
        log_probs, state = model.step(words, state)
        log_probs = _masked_log_probs(log_probs, forbidden, end_id, first_step=step == 0)
        step_log_prob, words = log_probs.max(dim=1)  # (B,), (B,)

        # Rows that already ended keep stepping with the batch; their outputs are ignored.
        open_rows = ~finished
        log_prob = log_prob + torch.where(open_rows, step_log_prob, 0.0)
        ends = words == end_id
        num_words += (open_rows & ~ends).long()
        finished = finished | ends
        emitted.append(words)
        if bool(finished.all()):
            break

    tokens = torch.stack(emitted, dim=1)  # (B, T)
    lengths = num_words + finished.long()
    scores = log_prob / _length_penalty_divisor(lengths, length_penalty)
    return [
        Caption(row[:count], lp, score, done)
        for row, count, lp, score, done in zip(
            tokens.tolist(),
            num_words.tolist(),
            log_prob.tolist(),
            scores.tolist(),
            finished.tolist(),
            strict=True,
        )
    ]


@torch.no_grad()
def sample_captions(
    model,
    features: torch.Tensor,
    *,
    start_id: int,
    end_id: int,
    unk_id: int,
    pad_id: int,
    max_length: int = 20,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one caption per row of ``features`` from the model's own distribution.

    Each next word is sampled from the step's probabilities, with the tokens decoding never
    emits removed (the conventions above), which is what self-critical training needs.

    features: (B, F) image features; repeat rows to draw several captions of one image.
    Returns: (B, T) word ids, T <= max_length; ``<end>`` closes a finished caption, and
        ``pad_id`` fills the rest of its row.
    """
    _check_max_length(max_length)
    batch_size = features.shape[0]
    device = features.device
    forbidden = _forbidden_ids(start_id, end_id, unk_id, pad_id, device)

    state = model.init_state(features)
    words = torch.full((batch_size,), start_id, dtype=torch.long, device=device)
    finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
    emitted = []
    for step in range(max_length):
        log_probs, state = model.step(words, state)
        log_probs = _masked_log_probs(log_probs, forbidden, end_id, first_step=step == 0)
        # argmax of p / E with E ~ Exponential(1) is a draw from p (the exponential race),
        # several times faster than torch.multinomial on (B, V) rows. E is kept above zero,
        # where a word of probability 0 would win with 0 / 0.
        race = torch.empty_like(log_probs).exponential_(generator=generator)
        race.clamp_(min=torch.finfo(race.dtype).tiny)
        words = (log_probs.exp() / race).argmax(dim=1)  # (B,)
        emitted.append(words.masked_fill(finished, pad_id))
        finished = finished | (words == end_id)
        if bool(finished.all()):
            break
    return torch.stack(emitted, dim=1)


def _select_rows(state: tuple[torch.Tensor, ...], rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(tensor.index_select(0, rows) for tensor in state)


def _step_live_rows(
    model, words: torch.Tensor, state: tuple[torch.Tensor, ...], live: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """``model.step`` on the live rows only (open hypotheses with a finite log-probability).

    A finished hypothesis only ever carries itself forward and a dead one (log-probability
    -inf: the spare rows of a beam at the first step) is never chosen over a live one, so
    their state is never read again and the model need not run on them: at the first step
    that is all rows but one per beam, and late in a search most rows are finished.

    Returns:
        rows: (L,) the live rows, log_probs: (L, V) their log-probabilities, and the state of
        all rows, updated at the live ones.
    """
    if bool(live.all()):
        log_probs, state = model.step(words, state)
        return torch.arange(words.shape[0], device=words.device), log_probs, state
    rows = live.nonzero().view(-1)
    log_probs, live_state = model.step(words[rows], _select_rows(state, rows))
    state = tuple(
        whole.index_copy(0, rows, part) for whole, part in zip(state, live_state, strict=True)
    )
    return rows, log_probs, state


def _best_first(captions: list[Caption]) -> list[Caption]:
    return sorted(captions, key=lambda caption: caption.score, reverse=True)


def _repeated_ngram_mask(tokens: torch.Tensor, n: int, vocab_size: int) -> torch.Tensor:
    """Words that would complete an n-gram already present in each row.

    tokens: (R, T) words emitted so far in each row.
    Returns: (R, V) bool, True where the next word would repeat an n-gram.
    """
    rows, length = tokens.shape
    banned = torch.zeros(rows, vocab_size, dtype=torch.long, device=tokens.device)
    if length < n:
        return banned.bool()

    # Every n-gram of the row whose first n-1 words equal the row's last n-1 words bans its
    # last word. For n=1 the prefix is empty, so every word already emitted is banned.
    ngrams = tokens.unfold(1, n, 1)  # (R, T - n + 1, n)
    last_words = tokens[:, None, length - n + 1 :]  # (R, 1, n - 1)
    matches = (ngrams[:, :, :-1] == last_words).all(dim=2)  # (R, T - n + 1)
    banned.scatter_add_(1, ngrams[:, :, -1], matches.long())
    return banned > 0


@torch.inference_mode()
def beam_search(
    model,
    features: torch.Tensor,
    *,
    start_id: int,
    end_id: int,
    unk_id: int,
    pad_id: int | None = None,
    beam_size: int = 3,
    max_length: int = 20,
    length_penalty: float = DEFAULT_LENGTH_PENALTY,
    block_repeat_ngram: int = 0,
    top_k: int = 1,
) -> list[list[Caption]]:
    """Caption all images at once, each with its own beam of ``beam_size`` hypotheses.

    features: (B, F) image features, on the model's device.
    block_repeat_ngram: if n > 0, no n-gram of words may appear twice in a caption.
    top_k: how many captions to return per image, at most ``beam_size``.
    Returns: for each image, ``top_k`` captions, best first. Finished captions come before
        unfinished ones, each group ordered by score; fewer than ``top_k`` come back only
        when the vocabulary allows fewer distinct captions.

    The model runs on B * beam_size rows. At each step the beam of an image keeps the
    ``beam_size`` best hypotheses by score, among the one-word extensions of its open
    hypotheses and its finished ones, which stay in the beam until better ones push them
    out. Every hypothesis that finishes is kept as a candidate answer, pushed out or not.
    The search stops once every beam holds only finished hypotheses, or after
    ``max_length`` steps. With ``beam_size=1`` this is exactly greedy decoding.
    """
    _check_max_length(max_length)
    if beam_size < 1:
        raise ValueError(f"beam_size must be at least 1, got {beam_size}")
    if not 1 <= top_k <= beam_size:
        raise ValueError(f"top_k must be between 1 and beam_size={beam_size}, got {top_k}")
    if block_repeat_ngram < 0:
        raise ValueError(f"block_repeat_ngram must be 0 or more, got {block_repeat_ngram}")
    batch_size = features.shape[0]
    num_rows = batch_size * beam_size
    device = features.device
    forbidden = _forbidden_ids(start_id, end_id, unk_id, pad_id, device)

    # Row b * beam_size + k holds hypothesis k of image b.
    first_row = torch.arange(batch_size, device=device)[:, None] * beam_size  # (B, 1)
    image_of_row = torch.arange(batch_size, device=device).repeat_interleave(beam_size)
    state = _select_rows(model.init_state(features), image_of_row)
    words = torch.full((num_rows,), start_id, dtype=torch.long, device=device)
    # Only the first hypothesis of each beam is open at the start; the others would
    # otherwise propose the same words and fill the beam with copies.
    beam_log_prob = torch.full((batch_size, beam_size), float("-inf"), device=device)
    beam_log_prob[:, 0] = 0.0
    beam_log_prob = beam_log_prob.view(-1)  # (B * K,)
    num_words = torch.zeros(num_rows, dtype=torch.long, device=device)
    finished = torch.zeros(num_rows, dtype=torch.bool, device=device)
    tokens = torch.zeros(num_rows, 0, dtype=torch.long, device=device)  # (B * K, t)
    completed: list[list[Caption]] = [[] for _ in range(batch_size)]

    # Limitation: most of a search's time is the step's two matrix products (the recurrent one
    # and the output layer), already on oneDNN in float32 on packed weights; on 2 CPU cores
    # beam search still costs a folder a quarter or more of the encoder's time
    # (benchmarks/caption_speed.py, caption_tensor against the encoder alone).
    live = beam_log_prob.isfinite()  # open hypotheses that can still be chosen
    for step in range(max_length):
        live_rows, log_probs, state = _step_live_rows(model, words, state, live)
        log_probs = _masked_log_probs(log_probs, forbidden, end_id, first_step=step == 0)
        vocab_size = log_probs.shape[1]
        if block_repeat_ngram:
            repeats = _repeated_ngram_mask(tokens[live_rows], block_repeat_ngram, vocab_size)
            log_probs.masked_fill_(repeats, float("-inf"))

        # A row's one-word extensions all add the row's log-probability and share its length,
        # so their order within the row is the order of the words' log-probabilities: the
        # beam's best extensions are among the beam_size best words of each of its rows.
        width = min(beam_size, vocab_size)
        best_log_probs, best_words = log_probs.topk(width, dim=1)  # (L, width)
        # (B * K, width) extensions of every row. A finished hypothesis has a single
        # candidate, itself, written as an <end> that adds nothing, so that choosing it again
        # reads the same as choosing <end>; a dead row has none.
        extension = best_log_probs.new_full((num_rows, width), float("-inf"))
        extension[finished, 0] = 0.0
        extension.index_copy_(0, live_rows, best_log_probs)
        extension_words = torch.full_like(extension, end_id, dtype=torch.long)
        extension_words.index_copy_(0, live_rows, best_words)
        candidates = beam_log_prob[:, None] + extension

        # Every candidate of a row covers num_words + 1 tokens: one more word, or <end>, or
        # (for a finished row) the words and the <end> it already has.
        scores = candidates / _length_penalty_divisor(num_words + 1, length_penalty)[:, None]
        top_scores, top_index = scores.view(batch_size, -1).topk(beam_size, dim=1)  # (B, K)
        source_rows = (first_row + top_index // width).view(-1)  # (B * K,)
        words = extension_words.view(batch_size, -1).gather(1, top_index).view(-1)
        beam_log_prob = candidates.view(batch_size, -1).gather(1, top_index).view(-1)

        ends = words == end_id
        was_finished = finished[source_rows]
        newly_finished = ends & ~was_finished & beam_log_prob.isfinite()
        finished = was_finished | ends
        num_words = num_words[source_rows] + (~ends).long()
        tokens = torch.cat([tokens[source_rows], words[:, None]], dim=1)
        state = _select_rows(state, source_rows)

        if bool(newly_finished.any()):
            rows = newly_finished.nonzero().view(-1)
            for row, ids, count, lp, score in zip(
                rows.tolist(),
                tokens[rows].tolist(),
                num_words[rows].tolist(),
                beam_log_prob[rows].tolist(),
                top_scores.view(-1)[rows].tolist(),
                strict=True,
            ):
                completed[row // beam_size].append(Caption(ids[:count], lp, score, True))

        live = ~finished & beam_log_prob.isfinite()
        if not bool(live.any()):
            break
    logger.debug("beam search ran %d of at most %d steps", step + 1, max_length)

    open_row_ids = live.nonzero().view(-1)
    open_scores = beam_log_prob / _length_penalty_divisor(num_words, length_penalty)
    partial: list[list[Caption]] = [[] for _ in range(batch_size)]
    for row, ids, count, lp, score in zip(
        open_row_ids.tolist(),
        tokens[open_row_ids].tolist(),
        num_words[open_row_ids].tolist(),
        beam_log_prob[open_row_ids].tolist(),
        open_scores[open_row_ids].tolist(),
        strict=True,
    ):
        partial[row // beam_size].append(Caption(ids[:count], lp, score, False))

    return [
        (_best_first(done) + _best_first(still_open))[:top_k]
        for done, still_open in zip(completed, partial, strict=True)
    ]
