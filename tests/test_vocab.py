import os
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from torch_lstmcap.datasets import read_flickr8k
from torch_lstmcap.vocab import END, PAD, START, UNK, Vocabulary, tokenize

DATA = Path(
    os.environ.get("LSTMCAP_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data")
)
FLICKR8K = DATA / "flickr8k"

CAPTIONS = [
    "A dog runs on the grass.",
    "A dog  jumps over a log",
    "The dog's ball is red .",
    "A black dog runs",
    "a cat sleeps",
]


@pytest.mark.parametrize(
    "text, words",
    [
        ("A child in a pink dress .", ["a", "child", "in", "a", "pink", "dress"]),
        ("Dog, running; fast!  ", ["dog", "running", "fast"]),
        (
            "A boy in a T-shirt and a well - worn cap",
            ["a", "boy", "in", "a", "t-shirt", "and", "a", "well", "worn", "cap"],
        ),
        # Flickr8k writes clitics apart, COCO does not; both give the same words.
        ("The dog 's ball", ["the", "dog", "'s", "ball"]),
        ("The dog's ball", ["the", "dog", "'s", "ball"]),
        ("The dog\u2019s ball", ["the", "dog", "'s", "ball"]),
        ("They're at 5 o'clock", ["they", "'re", "at", "5", "o'clock"]),
        ("The dogs' 'toys'", ["the", "dogs", "toys"]),
        ("Un CAFÉ crème à Zürich", ["un", "café", "crème", "à", "zürich"]),
        ("cafe\u0301 \u6771\u4eac", ["caf\u00e9", "\u6771\u4eac"]),
        ("snake_case", ["snake", "case"]),
        (" . , ", []),
    ],
)
def test_tokenize(text, words):
    assert tokenize(text) == words


def test_specials_take_the_first_ids():
    vocab = Vocabulary.build(CAPTIONS, min_count=1)

    assert [vocab.word(i) for i in range(4)] == [PAD, START, END, UNK]
    assert (vocab.pad_id, vocab.start_id, vocab.end_id, vocab.unk_id) == (0, 1, 2, 3)
    assert all(vocab.id(word) == i for i, word in enumerate([PAD, START, END, UNK]))


def test_build_orders_by_count_then_word_whatever_the_caption_order():
    counts = Counter(word for caption in CAPTIONS for word in tokenize(caption))
    expected = sorted((w for w, n in counts.items() if n >= 2), key=lambda w: (-counts[w], w))
    shuffled = CAPTIONS[:]
    random.Random(0).shuffle(shuffled)

    vocab = Vocabulary.build(CAPTIONS, min_count=2)

    assert vocab.to_json()[4:] == expected
    assert Vocabulary.build(shuffled, min_count=2) == vocab
    assert "dog" in vocab and "cat" not in vocab
    assert len(vocab) == 4 + len(expected)
    with pytest.raises(ValueError, match="min_count"):
        Vocabulary.build(CAPTIONS, min_count=0)


def test_encode_decode_round_trip():
    vocab = Vocabulary.build(CAPTIONS, min_count=1)

    ids = vocab.encode("The dog's ball runs.")

    assert ids[0] == vocab.start_id and ids[-1] == vocab.end_id
    assert ids[1:-1] == [vocab.id(w) for w in ["the", "dog", "'s", "ball", "runs"]]
    assert vocab.decode(ids) == "the dog's ball runs"
    assert vocab.decode(torch.tensor(ids + [vocab.pad_id] * 3)) == "the dog's ball runs"


def test_encode_maps_unknown_words_and_truncates_keeping_end():
    vocab = Vocabulary.build(CAPTIONS, min_count=1)

    ids = vocab.encode("A zebra runs on the grass", max_length=3)

    assert ids == [vocab.start_id, vocab.id("a"), vocab.unk_id, vocab.id("runs"), vocab.end_id]
    assert vocab.id("zebra") == vocab.unk_id
    assert vocab.decode(ids) == f"a {UNK} runs"
    assert vocab.encode("", max_length=5) == [vocab.start_id, vocab.end_id]
    with pytest.raises(ValueError, match="max_length"):
        vocab.encode("a dog", max_length=-1)


def test_decode_stops_at_end_and_skips_start_and_pad():
    vocab = Vocabulary.build(CAPTIONS, min_count=1)
    dog, runs = vocab.id("dog"), vocab.id("runs")

    ids = [vocab.pad_id, vocab.start_id, dog, vocab.pad_id, runs, vocab.end_id, dog, dog]

    assert vocab.decode(ids) == "dog runs"
    assert vocab.decode([vocab.end_id, dog]) == ""
    with pytest.raises(IndexError, match="outside the vocabulary"):
        vocab.decode([len(vocab)])


def test_json_round_trip_and_validation():
    vocab = Vocabulary.build(CAPTIONS, min_count=1)

    assert Vocabulary.from_json(vocab.to_json()) == vocab
    with pytest.raises(ValueError, match="must start with <pad>, <start>, <end>, <unk>"):
        Vocabulary.from_json([START, PAD, END, UNK, "dog"])
    with pytest.raises(ValueError, match="must start with"):
        Vocabulary.from_json(["dog"])
    with pytest.raises(ValueError, match="repeated: \\['dog'\\]"):
        Vocabulary.from_json([PAD, START, END, UNK, "dog", "cat", "dog"])
    with pytest.raises(ValueError, match="non-empty strings"):
        Vocabulary.from_json([PAD, START, END, UNK, ""])
    with pytest.raises(ValueError, match="list of words"):
        Vocabulary.from_json({"words": [PAD, START, END, UNK]})


def test_extend_keeps_old_ids_and_appends_new_words():
    vocab = Vocabulary.build(CAPTIONS, min_count=2)
    new_captions = ["A zebra runs", "A zebra eats", "a giraffe", "the dog"]

    extended = vocab.extend(new_captions, min_count=2)

    assert extended.to_json()[: len(vocab)] == vocab.to_json()
    assert extended.to_json()[len(vocab) :] == ["zebra"]
    assert vocab.id("zebra") == vocab.unk_id
    assert extended.decode(extended.encode("a zebra runs")) == "a zebra runs"


@pytest.mark.skipif(
    not (FLICKR8K / "Flickr8k_text" / "Flickr8k.token.txt").is_file(),
    reason=f"Flickr8k not found under {DATA} (set LSTMCAP_DATA to the shared data folder)",
)
def test_flickr8k_dev_vocabulary():
    captions = [caption for item in read_flickr8k(FLICKR8K, "dev") for caption in item.captions]
    counts = Counter(word for caption in captions for word in tokenize(caption))

    vocab = Vocabulary.build(captions, min_count=5)

    assert set(vocab.to_json()[4:]) == {w for w, n in counts.items() if n >= 5}
    assert vocab.word(4) == counts.most_common(1)[0][0]
    words = [word for caption in captions for word in tokenize(caption)]
    unknown = sum(vocab.id(word) == vocab.unk_id for word in words)
    assert unknown == sum(n for n in counts.values() if n < 5)
    assert not any(tokenize(word) != [word] for word in vocab.to_json()[4:])
