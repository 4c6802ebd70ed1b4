"""Caption metrics: BLEU-1..4, METEOR, ROUGE-L and CIDEr, computed by pycocoevalcap.

The numbers are the ones captioning papers report: every caption is tokenised by the Stanford
PTB tokenizer (lower-cased, punctuation removed), each prediction is scored against all the
human captions of its image, and the scorers are pycocoevalcap's ``Bleu(4)``, ``Meteor``,
``Rouge`` and ``Cider``.

Java runs the PTB tokenizer and METEOR. Without a working ``java``, captions are tokenised by
a close Python approximation of the PTB rules, METEOR is reported as unavailable (``None``)
and the other metrics are still computed. SPICE needs a separate download of Stanford CoreNLP
models, so it is always reported as unavailable.

    predictions = {"dog.jpg": "a dog runs", "cat.jpg": "a cat sleeps"}
    references = {"dog.jpg": ["A dog runs.", "A brown dog."], "cat.jpg": ["A cat asleep."]}
    print(format_metrics_table(score_captions(predictions, references)))
"""

import contextlib
import logging
import math
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer

logger = logging.getLogger(__name__)

METRIC_NAMES = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE")
_BLEU_NAMES = METRIC_NAMES[:4]
_CIDER_N = 4

_PTB_JAR = Path(ptbtokenizer.__file__).resolve().parent / ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR

# pycocoevalcap's punctuation list names bracket tokens in upper case ("-LRB-"), but with
# -lowerCase the jar emits "-lrb-", so brackets survive as words in the standard scores. The
# Python tokeniser reproduces that, so scores do not depend on whether Java is present.
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_PUNCTUATION = frozenset(ptbtokenizer.PUNCTUATIONS) | {'"'}
# Where the PTB tokenizer splits one word in two: "dog|'s", "ca|n't", "can|not".
_CLITIC = re.compile(r"(?<=\w)(?=n't\b|'(?:s|m|d|re|ve|ll)\b)|(?<=\bcan)(?=not\b)")
_TOKEN = re.compile(
    r"""n't|'(?:s|m|d|re|ve|ll)\b   # clitics split off by _CLITIC: "dog 's", "ca n't"
    | (?:\w\.){2,}                   # acronyms keep their periods: "u.s."
    | \b(?:mrs?|ms|dr|[js]r|st|vs|[^\W\d_])\.(?!\w)  # and abbreviations, initials: "mr.", "u."
    | \w+(?:[-./:']\w+)*             # words, hyphenated words, numbers: "black-and-white", "3.5"
    | \.\.\.|--                      # multi-character punctuation
    | \S                             # any other symbol on its own
    """,
    re.VERBOSE,
)


def score_captions(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    *,
    metrics: Iterable[str] | None = None,
) -> dict[str, float | None]:
    """Score generated captions against the human captions of the same images.

    Args:
        predictions: image id -> the one generated caption for that image.
        references: image id -> all human captions of that image. Ids without a prediction
            are ignored, so the references of a whole split may be passed.
        metrics: names from ``METRIC_NAMES`` to compute; all of them by default. Ask only for
            what is needed: METEOR starts a Java process that loads its paraphrase tables
            (about 15 s on two CPU cores), the others take well under a second for a few
            thousand images.

    Returns:
        metric name -> score, in ``METRIC_NAMES`` order, for the requested metrics. BLEU,
        METEOR and ROUGE-L lie in [0, 1]; CIDEr in [0, 10]. ``None`` marks a metric that
        cannot be computed here (SPICE always, METEOR without Java).

    CIDEr takes its n-gram document frequencies from the references of the scored images, so
    it is only meaningful for a set of images: with a single image every n-gram appears in
    all documents and CIDEr is 0.

    Raises:
        ValueError: on an unknown metric name, no predictions, a prediction whose image has
            no reference captions.
        TypeError: when an image's references are one string instead of a list of captions.
    """
    wanted = _resolve_metric_names(metrics)
    image_ids = _check_captions(predictions, references)

    captions = [predictions[image_id] for image_id in image_ids]
    captions += [ref for image_id in image_ids for ref in references[image_id]]
    tokenized, java_problem = _tokenize(captions)
    if java_problem is not None:
        unavailable = "METEOR unavailable, " if "METEOR" in wanted else ""
        logger.warning(
            "%s: %stokenising captions in Python instead of the PTB tokenizer",
            java_problem,
            unavailable,
        )

    # pycocoevalcap's layout: image id -> [prediction] and image id -> [reference, ...].
    res = {image_id: [tokenized[position]] for position, image_id in enumerate(image_ids)}
    gts = {}
    start = len(image_ids)
    for image_id in image_ids:
        stop = start + len(references[image_id])
        gts[image_id] = tokenized[start:stop]
        start = stop

    scores: dict[str, float | None] = {}
    if any(name in wanted for name in _BLEU_NAMES):
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        scores.update(zip(_BLEU_NAMES, (float(value) for value in bleu), strict=True))
    if "METEOR" in wanted:
        scores["METEOR"] = None if java_problem is not None else _meteor_score(gts, res)
    if "ROUGE-L" in wanted:
        scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    if "CIDEr" in wanted:
        if len(image_ids) == 1:
            logger.warning("CIDEr of a single image is always 0 (idf over one document)")
        scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if "SPICE" in wanted:
        # Limitation: SPICE is never computed; its jar needs Stanford CoreNLP models that
        # pycocoevalcap downloads on first use, which an offline install cannot do.
        logger.info("SPICE unavailable: it needs a separate Stanford CoreNLP model download")
        scores["SPICE"] = None
    return {name: scores[name] for name in wanted}


class CiderD:
    """CIDEr-D of one caption against its image's human captions, with the n-gram document
    frequencies of a fixed corpus: the reward of self-critical training.

    The formula is pycocoevalcap's ``Cider`` (n-grams of 1 to 4 words, tf-idf vectors, the
    candidate's weights clipped at the reference's, a Gaussian penalty on the length
    difference with sigma 6, the mean over n and over references, times 10). What differs is
    where the document frequencies come from: ``Cider`` counts them over the images it scores,
    which for a training batch of a few dozen images is noise; here they are counted once over
    ``references``, a whole training split.

        scorer = CiderD([[["a", "dog", "runs"], ["a", "brown", "dog"]], ...])
        scorer.score(0, ["a", "dog"])
    """

    def __init__(self, references: Sequence[Sequence[Sequence[str]]], sigma: float = 6.0):
        """references[i]: the tokenised human captions of image i (lists of words)."""
        if not references or not all(references):
            raise ValueError("every image needs at least one reference caption")
        self.sigma = sigma
        counts = [[_ngram_counts(caption) for caption in captions] for captions in references]
        document_frequency: Counter = Counter()
        for image_counts in counts:
            document_frequency.update({ngram for caption in image_counts for ngram in caption})
        self._document_frequency = document_frequency
        self._log_documents = math.log(len(references))
        self._references = [[self._vector(caption) for caption in image] for image in counts]

    def __len__(self) -> int:
        return len(self._references)

    def _vector(self, counts: Counter) -> tuple[list[dict], list[float], int]:
        """n-gram counts -> (tf-idf weights per n, their norms per n, length)."""
        weights: list[dict] = [{} for _ in range(_CIDER_N)]
        for ngram, count in counts.items():
            # An n-gram no reference contains counts as seen once, as in pycocoevalcap.
            seen = max(1, self._document_frequency.get(ngram, 0))
            weights[len(ngram) - 1][ngram] = count * (self._log_documents - math.log(seen))
        norms = [math.sqrt(sum(w * w for w in level.values())) for level in weights]
        # pycocoevalcap measures length in bigrams (words - 1); the penalty compares those.
        length = sum(counts[ngram] for ngram in weights[1])
        return weights, norms, length

    def score(self, image: int, caption: Sequence[str]) -> float:
        """CIDEr-D of ``caption`` (a list of words) against the references of image ``image``."""
        weights, norms, length = self._vector(_ngram_counts(caption))
        total = 0.0
        for ref_weights, ref_norms, ref_length in self._references[image]:
            penalty = math.exp(-((length - ref_length) ** 2) / (2 * self.sigma**2))
            for level in range(_CIDER_N):
                ref_level = ref_weights[level]
                overlap = sum(
                    min(weight, ref_level[ngram]) * ref_level[ngram]
                    for ngram, weight in weights[level].items()
                    if ngram in ref_level
                )
                if norms[level] and ref_norms[level]:
                    overlap /= norms[level] * ref_norms[level]
                total += overlap * penalty
        return 10.0 * total / (_CIDER_N * len(self._references[image]))


def _ngram_counts(words: Sequence[str]) -> Counter:
    """Counts of every n-gram of 1 to 4 words, as tuples."""
    words = tuple(words)
    return Counter(
        words[start : start + n]
        for n in range(1, _CIDER_N + 1)
        for start in range(len(words) - n + 1)
    )


def format_metrics_table(scores: Mapping[str, float | None]) -> str:
    """Two aligned columns, metric and score, with "unavailable" where a score is ``None``."""
    rows = [("Metric", "Score")]
    for name, value in scores.items():
        if value is None:
            shown = "unavailable"
        elif isinstance(value, int):
            shown = str(value)
        else:
            shown = f"{value:.4f}"
        rows.append((name, shown))
    name_width = max(len(name) for name, _ in rows)
    value_width = max(len(shown) for _, shown in rows)
    return "\n".join(f"{name:<{name_width}}  {shown:>{value_width}}" for name, shown in rows)


def _python_tokenize(caption: str) -> str:
    """Tokenise one caption like the PTB tokenizer plus pycocoevalcap's punctuation removal.

    Lower-cases, splits off punctuation and the clitics "'s", "n't", "'re" and the like, and
    drops punctuation tokens; returns the tokens joined by single spaces.
    """
    # Limitation: an approximation of the PTB rules, not a port: it differs from the jar on
    # rare forms such as "slip 'n' slide" (2 of the 36,255 Flickr8k and coco-mini captions).
    text = _CLITIC.sub(" ", caption.lower())
    tokens = (_BRACKETS.get(token, token) for token in _TOKEN.findall(text))
    return " ".join(token for token in tokens if token not in _PUNCTUATION)


def _resolve_metric_names(metrics: Iterable[str] | None) -> tuple[str, ...]:
    if metrics is None:
        return METRIC_NAMES
    if isinstance(metrics, str):
        metrics = (metrics,)
    requested = set(metrics)
    unknown = sorted(requested - set(METRIC_NAMES))
    if unknown or not requested:
        raise ValueError(
            f"unknown or no metric names {unknown}; choose from {', '.join(METRIC_NAMES)}"
        )
    return tuple(name for name in METRIC_NAMES if name in requested)


def _check_captions(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> list[str]:
    """Validate the inputs and return the image ids to score, in prediction order."""
    if not predictions:
        raise ValueError("no predictions to score")
    unreferenced = [image_id for image_id in predictions if not references.get(image_id)]
    if unreferenced:
        shown = ", ".join(repr(image_id) for image_id in unreferenced[:5])
        raise ValueError(
            f"{len(unreferenced)} predicted image(s) have no reference captions: {shown}"
        )
    for image_id in predictions:
        if isinstance(references[image_id], str):
            raise TypeError(
                f"references[{image_id!r}] is a string; give a list of captions per image"
            )
    return list(predictions)


def _tokenize(captions: list[str]) -> tuple[list[str], str | None]:
    """Tokenise captions with the PTB jar, or in Python when Java cannot run it.

    Returns the tokenised captions and, when Java was not used, the reason why.
    """
    java = shutil.which("java")
    if java is None:
        return [_python_tokenize(caption) for caption in captions], "no java executable on PATH"
    try:
        return _ptb_tokenize(java, captions), None
    except (OSError, RuntimeError) as error:
        return [_python_tokenize(caption) for caption in captions], f"java failed ({error})"


def _ptb_tokenize(java: str, captions: list[str]) -> list[str]:
    """Run pycocoevalcap's PTB tokenizer jar, one caption per line, through stdin and stdout.

    Same jar, flags and punctuation list as ``pycocoevalcap.tokenizer.ptbtokenizer``, whose
    ``PTBTokenizer.tokenize`` writes its input to a temporary file inside the installed
    package: that fails on a read-only install, and piping avoids it.
    """
    # -preserveLines keeps one output line per input line, so a line break inside a caption
    # would shift every later caption onto the wrong image.
    lines = "".join(" ".join(caption.splitlines()) + "\n" for caption in captions)
    command = [java, "-cp", str(_PTB_JAR), "edu.stanford.nlp.process.PTBTokenizer"]
    command += ["-preserveLines", "-lowerCase", "-encoding", "utf-8"]
    result = subprocess.run(command, input=lines.encode("utf-8"), capture_output=True)
    if result.returncode != 0:
        detail = result.stderr.decode("utf-8", "replace").strip().splitlines()
        raise RuntimeError(f"exit status {result.returncode}: {' '.join(detail[-1:])}")

    tokenized = result.stdout.decode("utf-8").split("\n")
    if len(tokenized) < len(captions) or any(tokenized[len(captions) :]):
        raise RuntimeError(f"{len(captions)} captions in, {len(tokenized)} lines out")
    return [
        " ".join(token for token in line.split() if token not in _PUNCTUATION)
        for line in tokenized[: len(captions)]
    ]


def _meteor_score(gts: dict[str, list[str]], res: dict[str, list[str]]) -> float | None:
    """METEOR through pycocoevalcap's jar wrapper, or ``None`` with a warning if the jar fails.

    The jar is started with ``-Xmx2G``, so each call may take up to 2 GiB of memory.
    """
    meteor = Meteor()
    try:
        return float(meteor.compute_score(gts, res)[0])
    except (OSError, ValueError) as error:
        logger.warning("METEOR unavailable: the METEOR jar failed (%r)", error)
        return None
    finally:
        # The wrapper's __del__ closes only the jar's stdin, and it takes the lock that
        # compute_score still holds when the jar dies mid-way: release it and close every pipe
        # here, so cleanup neither hangs nor leaks file handles.
        if meteor.lock.locked():
            meteor.lock.release()
        meteor.meteor_p.kill()
        meteor.meteor_p.wait()
        for pipe in (meteor.meteor_p.stdin, meteor.meteor_p.stdout, meteor.meteor_p.stderr):
            with contextlib.suppress(OSError):
                pipe.close()
