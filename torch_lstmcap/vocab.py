"""Tokenisation and the word vocabulary of a captioner.

Captions are lower-cased and split into words; punctuation is dropped, as in the Show and
Tell and Karpathy preprocessing, so the model never spends capacity on full stops and commas
that annotators use inconsistently. English clitics become words of their own ("dog's" is
"dog" "'s"), because Flickr8k ships its captions already split that way ("dog 's") while
COCO does not, and one vocabulary should serve both.

The vocabulary maps words to ids, with four special tokens first: <pad> 0, <start> 1,
<end> 2, <unk> 3. It is stored as its list of words (`to_json`) inside the checkpoint, so a
model always travels with the vocabulary it was trained with.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)

# A word is a run of letters or digits in any script ([^\W_]), which may join further runs
# with a hyphen ("t-shirt") or an apostrophe ("o'clock"), or a clitic ("'s", "'re", ...).
# Anything else is punctuation and is dropped.
_CLITIC_TAIL = r"(?:s|re|ve|ll|d|m|t)(?![^\W_])"
_WORD = re.compile(rf"'{_CLITIC_TAIL}|[^\W_]+(?:(?:-|'(?!{_CLITIC_TAIL}))[^\W_]+)*")
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "`": "'", "\u00b4": "'"})


def tokenize(text: str) -> list[str]:
    """Split a caption into lower-case words, dropping punctuation.

    >>> tokenize("A dog's T-shirt, at 5 o'clock in the Café.")
    ['a', 'dog', "'s", 't-shirt', 'at', '5', "o'clock", 'in', 'the', 'café']
    """
    # NFC composes accents typed as separate marks, so "café" is one word however it was typed;
    # typographic apostrophes become the ASCII one so "man’s" and "man's" are the same word.
    text = unicodedata.normalize("NFC", text).translate(_APOSTROPHES).lower()
    return _WORD.findall(text)


class Vocabulary:
    """The words a captioner knows, each with a fixed id; the specials take ids 0 to 3.

    Words are kept in id order; `to_json` and `from_json` save and restore exactly that order.
    """

    pad_id, start_id, end_id, unk_id = range(len(SPECIALS))

    @property
    def special_ids(self) -> dict[str, int]:
        """The ids decoding needs, as the keyword arguments of beam_search and friends."""
        return {
            "start_id": self.start_id,
            "end_id": self.end_id,
            "unk_id": self.unk_id,
            "pad_id": self.pad_id,
        }

    def __init__(self, words: Iterable[str]) -> None:
        words = tuple(words)
        if words[: len(SPECIALS)] != SPECIALS:
            raise ValueError(
                f"a vocabulary must start with {', '.join(SPECIALS)}; got {list(words[:4])}"
            )
        if not all(isinstance(word, str) and word for word in words):
            raise ValueError("vocabulary words must be non-empty strings")
        if len(set(words)) != len(words):
            duplicates = sorted(word for word, n in Counter(words).items() if n > 1)
            raise ValueError(f"vocabulary words must be unique; repeated: {duplicates[:10]}")
        self._words = words
        self._ids = {word: index for index, word in enumerate(words)}

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 5) -> Vocabulary:
        """The specials, then every word seen at least min_count times, by count then word.

        Ordering by descending count, ties by the word itself, makes the ids independent of
        the order of the captions.
        """
        return cls(SPECIALS + _frequent_words(captions, min_count, exclude=set(SPECIALS)))

    def extend(self, captions: Iterable[str], min_count: int = 5) -> Vocabulary:
        """A new vocabulary with the same ids for every word here, then the new frequent words.

        Used to fine-tune a trained model on new captions: existing embedding and output rows
        keep their meaning, and the new words get new rows at the end.
        """
        return Vocabulary(self._words + _frequent_words(captions, min_count, set(self._words)))

    @property
    def num_words(self) -> int:
        """How many words there are besides the special tokens."""
        return len(self._words) - len(SPECIALS)

    def __len__(self) -> int:
        return len(self._words)

    def __contains__(self, word: object) -> bool:
        return word in self._ids

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Vocabulary):
            return NotImplemented
        return self._words == other._words

    def __hash__(self) -> int:
        return hash(self._words)

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} words)"

    def id(self, word: str) -> int:
        """The id of a word; unk_id for a word the vocabulary does not know."""
        return self._ids.get(word, self.unk_id)

    def word(self, word_id: int) -> str:
        """The word with this id."""
        if not 0 <= word_id < len(self._words):
            raise IndexError(f"word id {word_id} is outside the vocabulary of {len(self)} words")
        return self._words[word_id]

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """Word ids of a caption: [start_id, w1, ..., wn, end_id].

        max_length: keep at most this many words (the <end> id is always kept), so the
            result has at most max_length + 2 ids.
        """
        words = tokenize(text)
        if max_length is not None:
            if max_length < 0:
                raise ValueError(f"max_length must be >= 0; got {max_length}")
            words = words[:max_length]
        return [self.start_id, *(self.id(word) for word in words), self.end_id]

    def decode(self, ids: Iterable[int]) -> str:
        """The caption spelled by a sequence of ids, e.g. a row of a (T,) tensor of ids.

        Reading stops at the first <end>; <start> and <pad> are skipped; unknown words read
        as <unk>; clitics rejoin their word ("dog" "'s" reads "dog's").
        """
        caption = ""
        for word_id in ids:
            word_id = int(word_id)
            if word_id == self.end_id:
                break
            if word_id in (self.start_id, self.pad_id):
                continue
            word = self.word(word_id)
            separator = "" if not caption or word.startswith("'") else " "
            caption += separator + word
        return caption

    def to_json(self) -> list[str]:
        """The words in id order, for saving; `from_json` restores the same vocabulary."""
        return list(self._words)

    @classmethod
    def from_json(cls, words: list[str]) -> Vocabulary:
        """The vocabulary saved by `to_json`; ValueError if the list is not one."""
        if not isinstance(words, list):
            raise ValueError(f"a saved vocabulary is a list of words; got {type(words).__name__}")
        return cls(words)


def _frequent_words(captions: Iterable[str], min_count: int, exclude: set[str]) -> tuple[str, ...]:
    """Words of the captions seen at least min_count times and not in exclude, most common
    first, ties broken by the word."""
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1; got {min_count}")
    counts = Counter(word for caption in captions for word in tokenize(caption))
    frequent = [w for w, n in counts.items() if n >= min_count and w not in exclude]
    return tuple(sorted(frequent, key=lambda word: (-counts[word], word)))
