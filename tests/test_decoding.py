import math

import pytest
import torch

from torch_lstmcap.decoding import Caption, beam_search, greedy_decode, sample_captions

PAD, START, END, UNK = 0, 1, 2, 3
A, B, C, D = 4, 5, 6, 7
VOCAB_SIZE = 8
SPECIAL_IDS = {"start_id": START, "end_id": END, "unk_id": UNK, "pad_id": PAD}


def transition_table(rules: dict[int, dict[int, float]]) -> torch.Tensor:
    """(V, V) next-word probabilities; row p is the distribution after word p.

    rules[p] sets some probabilities after p; the mass left over is shared evenly by the
    words it does not name.
    """
    table = torch.empty(VOCAB_SIZE, VOCAB_SIZE, dtype=torch.float64)
    for prev in range(VOCAB_SIZE):
        given = rules.get(prev, {})
        others = [word for word in range(VOCAB_SIZE) if word not in given]
        table[prev] = (1.0 - sum(given.values())) / len(others)
        for word, prob in given.items():
            table[prev, word] = prob
    return table


class TableModel:
    """A decoder whose next-word distribution depends only on the previous word.

    Each image picks its table by the index in features[:, 0], and the state carries that
    index, so the images of one batch can follow different tables.
    """

    def __init__(self, *tables: torch.Tensor):
        self.log_tables = torch.stack(tables).log()  # (T, V, V)
        self.steps = 0

    def init_state(self, features):
        return (features[:, 0].long(),)

    def step(self, words, state):
        self.steps += 1
        (table_index,) = state
        return self.log_tables[table_index, words], state


def table_features(*indices: int) -> torch.Tensor:
    return torch.tensor(indices, dtype=torch.float64)[:, None]


class RandomDecoder:
    """A small recurrent decoder with random weights.

    Its state is a tuple of two tensors, the hidden vector and the step count; <end> grows
    more likely with every step, so captions end at different lengths, and some never do.
    """

    def __init__(self, seed: int, feature_size=6, hidden_size=16, vocab_size=12):
        generator = torch.Generator().manual_seed(seed)

        def weights(*shape):
            return torch.randn(*shape, generator=generator, dtype=torch.float64)

        self.project = weights(feature_size, hidden_size)
        self.recur = weights(hidden_size, hidden_size) * 1.2 / hidden_size**0.5
        self.embed = weights(vocab_size, hidden_size)
        self.to_vocab = weights(hidden_size, vocab_size)

    def to(self, device):
        for name in ("project", "recur", "embed", "to_vocab"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def init_state(self, features):
        steps = torch.zeros(features.shape[0], dtype=features.dtype, device=features.device)
        return torch.tanh(features @ self.project), steps

    def step(self, words, state):
        prev_h, steps = state
        next_h = torch.tanh(prev_h @ self.recur + self.embed[words])
        logits = next_h @ self.to_vocab
        logits[:, END] += 0.3 * steps - 1.0
        return torch.log_softmax(logits, dim=1), (next_h, steps + 1)


def random_features(num_images: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_images, 6, generator=generator, dtype=torch.float64)


def rescore(model, features: torch.Tensor, caption: Caption) -> float:
    """Sum of the model's log-probabilities of the caption, fed back one word at a time."""
    tokens = caption.token_ids + ([END] if caption.finished else [])
    state = model.init_state(features[None])
    previous = START
    total = 0.0
    for word in tokens:
        log_probs, state = model.step(torch.tensor([previous]), state)
        total += float(log_probs[0, word])
        previous = word
    return total


def gnmt_score(caption: Caption, alpha: float) -> float:
    length = len(caption.token_ids) + int(caption.finished)
    return caption.log_prob / ((5 + length) / 6) ** alpha


def has_repeated_ngram(token_ids: list[int], n: int) -> bool:
    ngrams = [tuple(token_ids[i : i + n]) for i in range(len(token_ids) - n + 1)]
    return len(ngrams) != len(set(ngrams))


def test_beam_search_finds_the_sequence_greedy_misses():
    # Greedy takes A (0.5) and then can only end with 0.3; B (0.4) ends with 0.9.
    model = TableModel(
        transition_table(
            {
                START: {A: 0.5, B: 0.4},
                A: {END: 0.3, C: 0.25, D: 0.25, B: 0.19},
                B: {END: 0.9},
            }
        )
    )
    features = table_features(0)

    (greedy,) = greedy_decode(model, features, **SPECIAL_IDS)
    assert greedy.token_ids == [A]
    assert greedy.finished
    assert greedy.log_prob == pytest.approx(math.log(0.5 * 0.3))

    model.steps = 0
    (captions,) = beam_search(model, features, **SPECIAL_IDS, beam_size=2, top_k=2)
    assert [caption.token_ids for caption in captions] == [[B], [A]]
    assert captions[0].finished
    assert captions[0].log_prob == pytest.approx(math.log(0.4) + math.log(0.9))
    assert captions[1].log_prob == pytest.approx(math.log(0.5) + math.log(0.3))
    # Both hypotheses in the beam have ended after two words, so the search stops there
    # rather than running to max_length.
    assert model.steps == 2


def test_length_penalty_changes_the_winner():
    # A <end> has the higher probability (0.30 against 0.45 * 0.85 ** 3 = 0.276), but
    # B C D <end> is longer, so length normalisation prefers it.
    model = TableModel(
        transition_table(
            {
                START: {A: 0.5, B: 0.45},
                A: {END: 0.6, D: 0.3},
                B: {C: 0.85},
                C: {D: 0.85},
                D: {END: 0.85},
            }
        )
    )
    features = table_features(0)
    short_log_prob = math.log(0.5 * 0.6)
    long_log_prob = math.log(0.45 * 0.85**3)

    (raw,) = beam_search(model, features, **SPECIAL_IDS, beam_size=2, top_k=2, length_penalty=0)
    assert [caption.token_ids for caption in raw] == [[A], [B, C, D]]
    assert [caption.log_prob for caption in raw] == pytest.approx([short_log_prob, long_log_prob])

    (normalised,) = beam_search(
        model, features, **SPECIAL_IDS, beam_size=2, top_k=2, length_penalty=0.7
    )
    assert [caption.token_ids for caption in normalised] == [[B, C, D], [A]]
    assert normalised[0].score == pytest.approx(long_log_prob / (9 / 6) ** 0.7)
    assert normalised[1].score == pytest.approx(short_log_prob / (7 / 6) ** 0.7)


def test_unk_pad_and_start_are_never_emitted_even_when_most_likely():
    banned = {UNK: 0.4, PAD: 0.2, START: 0.15}
    model = TableModel(
        transition_table({START: {**banned, A: 0.2}, A: {**banned, END: 0.2}, B: banned})
    )
    features = table_features(0)

    (greedy,) = greedy_decode(model, features, **SPECIAL_IDS)
    assert greedy.token_ids == [A]
    assert greedy.log_prob == pytest.approx(math.log(0.2 * 0.2))

    (captions,) = beam_search(model, features, **SPECIAL_IDS, beam_size=4, top_k=4)
    assert captions[0].token_ids == [A]
    assert len(captions) == 4
    for caption in captions:
        assert not set(caption.token_ids) & {UNK, PAD, START, END}


def test_caption_without_end_stops_at_max_length_unfinished():
    never_end = {prev: {END: 0.0, A: 0.7} for prev in range(VOCAB_SIZE)}
    model = TableModel(transition_table(never_end))
    features = table_features(0)

    (greedy,) = greedy_decode(model, features, **SPECIAL_IDS, max_length=5)
    assert greedy == Caption([A] * 5, greedy.log_prob, greedy.score, False)
    assert greedy.log_prob == pytest.approx(5 * math.log(0.7))

    (captions,) = beam_search(model, features, **SPECIAL_IDS, beam_size=3, top_k=3, max_length=5)
    assert len(captions) == 3
    assert captions[0].token_ids == [A] * 5
    assert captions[0].log_prob == pytest.approx(5 * math.log(0.7))
    for caption in captions:
        assert not caption.finished
        assert len(caption.token_ids) == 5
        assert caption.score == pytest.approx(gnmt_score(caption, 0.7))


def test_first_word_is_never_end_so_captions_are_never_empty():
    model = TableModel(transition_table({START: {END: 0.9, B: 0.05}, B: {END: 0.9}}))
    features = table_features(0)

    (greedy,) = greedy_decode(model, features, **SPECIAL_IDS, max_length=1)
    assert greedy.token_ids == [B]
    assert not greedy.finished

    (captions,) = beam_search(model, features, **SPECIAL_IDS, beam_size=2)
    assert captions[0].token_ids == [B]
    assert captions[0].finished
    assert captions[0].log_prob == pytest.approx(math.log(0.05 * 0.9))


def test_block_repeat_ngram():
    # Left alone the model loops A B A B ...; C and <end> are the ways out.
    model = TableModel(
        transition_table(
            {START: {A: 0.9}, A: {B: 0.9, C: 0.05}, B: {A: 0.9, END: 0.05}, C: {END: 0.9}}
        )
    )
    features = table_features(0)
    search = {**SPECIAL_IDS, "beam_size": 1, "max_length": 8}

    (looping,) = beam_search(model, features, **search)
    assert looping[0].token_ids == [A, B] * 4

    (bigrams,) = beam_search(model, features, **search, block_repeat_ngram=2)
    assert bigrams[0].token_ids == [A, B, A, C]
    assert bigrams[0].log_prob == pytest.approx(math.log(0.9**4 * 0.05))

    (unigrams,) = beam_search(model, features, **search, block_repeat_ngram=1)
    assert unigrams[0].token_ids == [A, B]
    assert unigrams[0].log_prob == pytest.approx(math.log(0.9 * 0.9 * 0.05))

    (wide,) = beam_search(
        model, features, **{**search, "beam_size": 4}, block_repeat_ngram=2, top_k=4
    )
    assert len(wide) == 4
    for caption in wide:
        assert not has_repeated_ngram(caption.token_ids, 2)


def test_greedy_equals_beam_search_with_beam_size_one():
    for seed in range(3):
        model = RandomDecoder(seed)
        features = random_features(6, seed)

        greedy = greedy_decode(model, features, **SPECIAL_IDS, max_length=12)
        beam = beam_search(model, features, **SPECIAL_IDS, beam_size=1, max_length=12)

        assert len(beam) == len(greedy) == 6
        for greedy_caption, (beam_caption,) in zip(greedy, beam, strict=True):
            assert beam_caption.token_ids == greedy_caption.token_ids
            assert beam_caption.finished == greedy_caption.finished
            assert beam_caption.log_prob == pytest.approx(greedy_caption.log_prob, abs=1e-9)
            assert beam_caption.score == pytest.approx(greedy_caption.score, abs=1e-6)
        # The comparison means little unless the captions end at different steps.
        assert len({len(caption.token_ids) for caption in greedy}) > 1


def test_top_k_captions_are_distinct_best_first_and_correctly_scored():
    model = RandomDecoder(seed=1)
    features = random_features(4, seed=1)

    results = beam_search(model, features, **SPECIAL_IDS, beam_size=5, top_k=3, max_length=10)

    assert len(results) == 4
    for image, captions in enumerate(results):
        assert len(captions) == 3
        assert len({tuple(caption.token_ids) for caption in captions}) == 3
        order = [(caption.finished, caption.score) for caption in captions]
        assert order == sorted(order, reverse=True)
        for caption in captions:
            assert caption.token_ids
            assert not set(caption.token_ids) & {UNK, PAD, START, END}
            assert caption.log_prob == pytest.approx(rescore(model, features[image], caption))
            assert caption.score == pytest.approx(gnmt_score(caption, 0.7))


def test_top_k_one_is_the_best_of_a_wider_list():
    model = RandomDecoder(seed=2)
    features = random_features(3, seed=2)
    search = {**SPECIAL_IDS, "beam_size": 4, "max_length": 10}

    best = beam_search(model, features, **search)
    all_four = beam_search(model, features, **search, top_k=4)

    assert [len(captions) for captions in best] == [1, 1, 1]
    assert [captions[0] for captions in best] == [captions[0] for captions in all_four]


@pytest.mark.parametrize("block_repeat_ngram", [0, 2])
def test_batched_beam_search_equals_one_image_at_a_time(block_repeat_ngram):
    model = RandomDecoder(seed=3)
    features = random_features(5, seed=3)
    search = {
        **SPECIAL_IDS,
        "beam_size": 4,
        "top_k": 3,
        "max_length": 10,
        "block_repeat_ngram": block_repeat_ngram,
    }

    batched = beam_search(model, features, **search)
    one_by_one = [beam_search(model, features[i : i + 1], **search)[0] for i in range(5)]

    for together, alone in zip(batched, one_by_one, strict=True):
        assert [caption.token_ids for caption in together] == [
            caption.token_ids for caption in alone
        ]
        assert [caption.log_prob for caption in together] == pytest.approx(
            [caption.log_prob for caption in alone]
        )


def test_batched_images_follow_their_own_tables():
    to_a = transition_table({START: {A: 0.9}, A: {END: 0.9}})
    to_b_c = transition_table({START: {B: 0.9}, B: {C: 0.9}, C: {END: 0.9}})
    model = TableModel(to_a, to_b_c)

    results = beam_search(model, table_features(1, 0, 1), **SPECIAL_IDS, beam_size=3)

    assert [captions[0].token_ids for captions in results] == [[B, C], [A], [B, C]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_beam_search_on_cuda_matches_cpu():
    model = RandomDecoder(seed=4)
    features = random_features(5, seed=4)
    search = {**SPECIAL_IDS, "beam_size": 3, "top_k": 2, "block_repeat_ngram": 2}

    on_cpu = beam_search(model, features, **search)
    on_cuda = beam_search(model.to("cuda"), features.to("cuda"), **search)

    assert [[c.token_ids for c in captions] for captions in on_cuda] == [
        [c.token_ids for c in captions] for captions in on_cpu
    ]


@pytest.mark.parametrize(
    "options",
    [
        {"beam_size": 0},
        {"beam_size": 2, "top_k": 3},
        {"max_length": 0},
        {"block_repeat_ngram": -1},
        {"unk_id": END},
    ],
)
def test_invalid_options_are_refused(options):
    model = TableModel(transition_table({}))
    with pytest.raises(ValueError):
        beam_search(model, table_features(0), **{**SPECIAL_IDS, **options})


def test_special_id_outside_the_vocabulary_is_refused():
    model = TableModel(transition_table({}))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        greedy_decode(model, table_features(0), **{**SPECIAL_IDS, "end_id": VOCAB_SIZE})


def reference_beam_search(model, features, beam_size, max_length, length_penalty, ngram):
    """Beam search over one image as the docstring of beam_search states it, written plainly:
    every allowed one-word extension of every open hypothesis is a candidate, and no row is
    skipped or shared.

    features: (F,) one image.
    Returns: (token_ids, log_prob) of the finished captions, best first, then of the open
        ones at the end, best first.
    """

    def score(log_prob, length):
        return log_prob / ((5 + length) / 6) ** length_penalty

    def repeats(words, word):
        if not ngram or len(words) < ngram - 1:
            return False
        grams = {tuple(words[i : i + ngram]) for i in range(len(words) - ngram + 1)}
        return (*words[len(words) - ngram + 1 :], word) in grams

    # Hypotheses are (words, log_prob, state, finished); candidates add a score in front and
    # whether they are an <end> just chosen at the back.
    beam = [([], 0.0, model.init_state(features[None]), False)]
    completed = []
    for step in range(max_length):
        candidates = []
        for words, log_prob, state, finished in beam:
            if finished:
                candidates.append(
                    (score(log_prob, len(words) + 1), words, log_prob, state, True, False)
                )
                continue
            previous = torch.tensor([words[-1] if words else START])
            log_probs, next_state = model.step(previous, state)
            for word in range(log_probs.shape[1]):
                if word in (START, UNK, PAD) or (word == END and step == 0) or repeats(words, word):
                    continue
                total = log_prob + float(log_probs[0, word])
                ends = word == END
                extended = words if ends else [*words, word]
                candidates.append(
                    (score(total, len(words) + 1), extended, total, next_state, ends, ends)
                )
        candidates.sort(key=lambda candidate: candidate[0], reverse=True)
        chosen = candidates[:beam_size]
        completed += [(words, total) for _, words, total, _, _, new in chosen if new]
        beam = [(words, total, state, done) for _, words, total, state, done, _ in chosen]
        if all(done for *_, done in beam):
            break

    still_open = [(words, total) for words, total, _, done in beam if not done]
    return sorted(completed, key=lambda c: score(c[1], len(c[0]) + 1), reverse=True) + sorted(
        still_open, key=lambda c: score(c[1], len(c[0])), reverse=True
    )


@pytest.mark.parametrize("beam_size", [2, 3, 5])
@pytest.mark.parametrize("length_penalty", [0.0, 0.7, 1.2])
@pytest.mark.parametrize("block_repeat_ngram", [0, 2])
def test_beam_search_equals_a_plain_reference(beam_size, length_penalty, block_repeat_ngram):
    features = random_features(6, seed=beam_size)
    search = {"beam_size": beam_size, "max_length": 9, "length_penalty": length_penalty}

    results = beam_search(
        RandomDecoder(seed=4),
        features,
        **SPECIAL_IDS,
        **search,
        top_k=beam_size,
        block_repeat_ngram=block_repeat_ngram,
    )

    for image, captions in enumerate(results):
        expected = reference_beam_search(
            RandomDecoder(seed=4), features[image], **search, ngram=block_repeat_ngram
        )[:beam_size]
        assert [caption.token_ids for caption in captions] == [words for words, _ in expected]
        assert [caption.log_prob for caption in captions] == pytest.approx(
            [total for _, total in expected], abs=1e-9
        )
    # Unfinished answers (some captions run to max_length) are compared too.
    assert any(not caption.finished for captions in results for caption in captions)


def test_finished_and_empty_hypotheses_are_not_run_through_the_model():
    model = RandomDecoder(seed=2)
    features = random_features(6, seed=2)
    rows_stepped = []
    step = model.step

    def counting_step(words, state):
        rows_stepped.append(words.shape[0])
        return step(words, state)

    model.step = counting_step
    results = beam_search(model, features, **SPECIAL_IDS, beam_size=3, max_length=12)

    # The first step runs one row per image: the other hypotheses of a beam are still empty.
    assert rows_stepped[:2] == [6, 6 * 3]
    # Once hypotheses finish, fewer rows go through the model...
    assert min(rows_stepped[1:]) < 6 * 3
    # ...and the answers are still those of fresh, unshared decoding (checked by rescoring).
    for image, captions in enumerate(results):
        assert rescore(RandomDecoder(seed=2), features[image], captions[0]) == pytest.approx(
            captions[0].log_prob, abs=1e-9
        )


def test_sampling_draws_words_with_the_model_probabilities():
    # After <start>: A 0.5, B 0.3, and the rest spread evenly; after A or B, <end> at once.
    table = transition_table({START: {A: 0.5, B: 0.3}, A: {END: 1.0}, B: {END: 1.0}})
    draws = 4000
    sampled = sample_captions(
        TableModel(table),
        table_features(*[0] * draws),
        **SPECIAL_IDS,
        max_length=5,
        generator=torch.Generator().manual_seed(0),
    )
    first = sampled[:, 0]
    # The six other words share the 0.2 left. <start>, <unk>, <pad> and a first <end> are
    # never drawn, so the probabilities of A, B, C and D renormalise over their sum.
    allowed = 0.5 + 0.3 + 2 * (0.2 / 6)
    assert set(first.tolist()) <= {A, B, C, D}
    assert (first == A).float().mean().item() == pytest.approx(0.5 / allowed, abs=0.025)
    assert (first == B).float().mean().item() == pytest.approx(0.3 / allowed, abs=0.025)
    ended = (first == A) | (first == B)
    assert (sampled[ended, 1] == END).all()
    assert (sampled[ended, 2:] == PAD).all(), "a finished caption is padded after <end>"
    assert sampled.shape[1] <= 5


def test_sampling_stops_at_max_length_and_is_reproducible_with_a_generator():
    table = transition_table({START: {A: 1.0}, A: {A: 1.0}})
    sampled = sample_captions(TableModel(table), table_features(0, 0), **SPECIAL_IDS, max_length=4)
    assert sampled.tolist() == [[A] * 4, [A] * 4]

    model = RandomDecoder(seed=3)
    features = torch.randn(32, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def draw(seed):
        generator = torch.Generator().manual_seed(seed)
        return sample_captions(model, features, **SPECIAL_IDS, generator=generator)

    assert torch.equal(draw(5), draw(5))
    assert not torch.equal(draw(5), draw(6))
