import itertools
import json
import logging
import math
import shutil

import pytest
from shared_data import DATA

from torch_lstmcap import metrics
from torch_lstmcap.metrics import METRIC_NAMES, format_metrics_table, score_captions

JAVA = shutil.which("java")
needs_java = pytest.mark.skipif(JAVA is None, reason="no java on PATH: METEOR and PTB untestable")

# Three images whose scores are worked out by hand below. After tokenisation (lower case,
# punctuation dropped) the captions are:
#   dog:  pred  a dog runs                   (3 words)
#         ref1  a dog runs on the grass      (6)
#         ref2  a brown dog is running       (5)
#   cats: pred  two cats sleep on the sofa   (6)
#         ref1  two cats sleep on a red sofa (7)
#         ref2  two cats are sleeping        (4)
#   cat:  pred  a a a cat                    (4)
#         ref1  a cat                        (2)
#         ref2  a black cat sits on a mat    (7)
TINY_PREDICTIONS = {"dog": "A dog runs", "cats": "Two cats sleep on the sofa.", "cat": "a a a cat"}
TINY_REFERENCES = {
    "dog": ["A dog runs on the grass.", "A brown dog is running."],
    "cats": ["Two cats sleep on a red sofa", "two cats are sleeping ."],
    "cat": ["A cat.", "a black cat sits on a mat"],
}


@pytest.fixture(params=["ptb", "python"])
def tokenizer(request, monkeypatch, tmp_path):
    """Run a test once with Java's PTB tokenizer and once with Java hidden from PATH."""
    if request.param == "ptb" and JAVA is None:
        pytest.skip("no java on PATH: the PTB tokenizer cannot run")
    if request.param == "python":
        monkeypatch.setenv("PATH", str(tmp_path))
    return request.param


def test_bleu_and_rouge_match_hand_computation(tokenizer):
    scores = score_captions(
        TINY_PREDICTIONS, TINY_REFERENCES, metrics=("BLEU-1", "BLEU-2", "ROUGE-L")
    )

    # BLEU pools clipped n-gram matches over all images (corpus BLEU).
    # Unigrams: dog 3/3; cats 5/6 ("the" is in no reference); cat 3/4 ("a" is clipped to 2,
    # its largest count in one reference).
    unigram_precision = (3 + 5 + 3) / (3 + 6 + 4)
    # Bigrams: dog 2/2 (a dog, dog runs); cats 3/5 (two cats, cats sleep, sleep on);
    # cat 1/3 (a cat; "a a" twice is in no reference).
    bigram_precision = (2 + 3 + 1) / (2 + 5 + 3)
    # Brevity penalty against the reference length closest to each prediction's:
    # dog 3 words -> 5 (not 6), cats 6 -> 7 (not 4), cat 4 -> 2 (not 7).
    prediction_length = 3 + 6 + 4
    reference_length = 5 + 7 + 2
    brevity_penalty = math.exp(1 - reference_length / prediction_length)
    assert prediction_length < reference_length
    assert scores["BLEU-1"] == pytest.approx(brevity_penalty * unigram_precision, rel=1e-6)
    assert scores["BLEU-2"] == pytest.approx(
        brevity_penalty * math.sqrt(unigram_precision * bigram_precision), rel=1e-6
    )

    # ROUGE-L per image: the best LCS precision and the best LCS recall over the references
    # (taken separately), combined as F = (1 + b^2) P R / (R + b^2 P) with b = 1.2; then the
    # mean over images.
    def f_score(precision, recall):
        return (1 + 1.2**2) * precision * recall / (recall + 1.2**2 * precision)

    # dog: LCS with ref1 "a dog runs" = 3 -> P 3/3, R 3/6; with ref2 "a dog" = 2 -> 2/3, 2/5.
    dog = f_score(max(3 / 3, 2 / 3), max(3 / 6, 2 / 5))
    # cats: LCS with ref1 "two cats sleep on sofa" = 5 -> P 5/6, R 5/7; ref2 "two cats" = 2.
    cats = f_score(max(5 / 6, 2 / 6), max(5 / 7, 2 / 4))
    # cat: LCS with ref1 "a cat" = 2 -> P 2/4, R 2/2; with ref2 "a cat" = 2 -> 2/4, 2/7.
    cat = f_score(max(2 / 4, 2 / 4), max(2 / 2, 2 / 7))
    assert scores["ROUGE-L"] == pytest.approx((dog + cats + cat) / 3, rel=1e-9)
    assert list(scores) == ["BLEU-1", "BLEU-2", "ROUGE-L"]


def test_cider_rewards_consensus_and_ignores_disjoint_words(tokenizer):
    consensus = {
        "beach": "a child builds a sandcastle on the beach",
        "kitchen": "a woman cuts vegetables in a kitchen",
        "street": "two men ride bicycles down a street",
    }
    references = {image_id: [caption] * 3 for image_id, caption in consensus.items()}

    # A prediction equal to every reference has cosine similarity 1 at each n-gram order and
    # no length penalty, so CIDEr = 10 * mean_n(1) = 10 for that image.
    assert score_captions(consensus, references, metrics=["CIDEr"])["CIDEr"] == pytest.approx(10)

    # A prediction sharing no word with its references scores 0; the others still score 10,
    # and the idf weights depend only on the references, so the mean is (10 + 10 + 0) / 3.
    disjoint = dict(consensus, street="purple elephants juggle")
    assert score_captions(disjoint, references, metrics=["CIDEr"])["CIDEr"] == pytest.approx(20 / 3)

    partial = dict(consensus, street="two men walk down a street")
    partial_cider = score_captions(partial, references, metrics=["CIDEr"])["CIDEr"]
    assert 20 / 3 < partial_cider < 10


def test_cider_of_one_image_is_zero_and_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="torch_lstmcap.metrics"):
        scores = score_captions({"a": "a dog"}, {"a": ["a dog", "a dog"]}, metrics=["CIDEr"])
    assert scores["CIDEr"] == 0.0
    assert "single image" in caplog.text


@pytest.mark.slow
@needs_java
def test_all_metrics_with_java(caplog):
    references = {image_id: refs[:1] + ["a photo"] for image_id, refs in TINY_REFERENCES.items()}
    predictions = {image_id: refs[0] for image_id, refs in TINY_REFERENCES.items()}

    with caplog.at_level(logging.INFO, logger="torch_lstmcap.metrics"):
        scores = score_captions(predictions, references)

    assert tuple(scores) == METRIC_NAMES
    # Each prediction repeats one of its references word for word: BLEU-4 is 1 and METEOR is
    # near 1, less its fragmentation penalty 0.5 * (chunks / matches)^3 = 0.5 * (3 / 15)^3.
    assert 0.95 < scores["METEOR"] <= 1.0
    assert scores["BLEU-4"] == pytest.approx(1.0, rel=1e-6)
    assert scores["SPICE"] is None
    assert [record.levelno for record in caplog.records] == [logging.INFO]
    assert "SPICE" in caplog.text


def test_without_java_meteor_is_unavailable_and_the_rest_is_scored(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("PATH", str(tmp_path))

    with caplog.at_level(logging.WARNING, logger="torch_lstmcap.metrics"):
        scores = score_captions(TINY_PREDICTIONS, TINY_REFERENCES)

    assert scores["METEOR"] is None
    assert scores["SPICE"] is None
    for name in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"):
        assert isinstance(scores[name], float) and 0 < scores[name]
    assert len(caplog.records) == 1
    assert "java" in caplog.text and "METEOR unavailable" in caplog.text


def test_failing_java_falls_back_to_python_tokenisation(monkeypatch, tmp_path, caplog):
    fake_java = tmp_path / "java"
    fake_java.write_text("#!/bin/sh\necho 'Error: could not create the Java VM' >&2\nexit 1\n")
    fake_java.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))

    with caplog.at_level(logging.WARNING, logger="torch_lstmcap.metrics"):
        scores = score_captions(TINY_PREDICTIONS, TINY_REFERENCES)

    assert scores["METEOR"] is None
    assert isinstance(scores["CIDEr"], float)
    monkeypatch.undo()
    expected = score_captions(TINY_PREDICTIONS, TINY_REFERENCES, metrics=["BLEU-2", "CIDEr"])
    assert scores["BLEU-2"] == pytest.approx(expected["BLEU-2"])
    assert scores["CIDEr"] == pytest.approx(expected["CIDEr"])
    assert len(caplog.records) == 1
    assert "could not create the Java VM" in caplog.text


@needs_java
def test_failing_meteor_jar_is_reported_not_raised(monkeypatch, tmp_path, caplog):
    # A java that runs the tokenizer but dies on "-jar meteor-1.5.jar", as when the 2 GiB heap
    # METEOR asks for cannot be reserved.
    fake_java = tmp_path / "java"
    fake_java.write_text(
        f'#!/bin/sh\ncase " $* " in *" -jar "*) exit 1;; esac\nexec "{JAVA}" "$@"\n'
    )
    fake_java.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))

    with caplog.at_level(logging.WARNING, logger="torch_lstmcap.metrics"):
        scores = score_captions(TINY_PREDICTIONS, TINY_REFERENCES, metrics=["METEOR", "CIDEr"])

    assert scores["METEOR"] is None
    assert isinstance(scores["CIDEr"], float)
    assert "METEOR jar failed" in caplog.text


def test_subset_of_metrics_does_not_start_meteor(monkeypatch):
    def refuse_meteor():
        raise AssertionError("METEOR started although it was not requested")

    monkeypatch.setattr(metrics, "Meteor", refuse_meteor)
    scores = score_captions(TINY_PREDICTIONS, TINY_REFERENCES, metrics=["CIDEr", "BLEU-4"])

    assert list(scores) == ["BLEU-4", "CIDEr"]
    assert all(isinstance(value, float) for value in scores.values())


def test_line_breaks_inside_captions_do_not_shift_other_captions():
    flat_references = dict(TINY_REFERENCES, cats=["Two cats sleep on a red sofa"] * 2)
    broken_references = dict(TINY_REFERENCES, cats=["Two cats sleep\r\non a red sofa"] * 2)
    broken_predictions = dict(TINY_PREDICTIONS, dog="A dog\nruns")

    flat = score_captions(TINY_PREDICTIONS, flat_references, metrics=["BLEU-4", "CIDEr"])
    broken = score_captions(broken_predictions, broken_references, metrics=["BLEU-4", "CIDEr"])
    assert broken == flat


def test_python_tokeniser_follows_ptb_rules():
    assert (
        metrics._python_tokenize("A man's dog, \"Rex\", can't stop... (U.S. Mr. Smith) 3.5-inch!")
        == "a man 's dog rex ca n't stop -lrb- u.s. mr. smith -rrb- 3.5-inch"
    )


@needs_java
def test_python_tokeniser_agrees_with_ptb_on_real_captions():
    annotations = DATA / "coco-mini" / "annotations"
    token_file = DATA / "flickr8k" / "Flickr8k_text" / "Flickr8k.token.txt"
    if not annotations.is_dir() or not token_file.is_file():
        pytest.skip(f"real captions not found under {DATA} (set LSTMCAP_DATA)")
    captions = []
    for split in ("train2017", "val2017"):
        with open(annotations / f"captions_{split}.json", encoding="utf-8") as file:
            captions += [entry["caption"] for entry in json.load(file)["annotations"]]
    with open(token_file, encoding="utf-8") as file:
        captions += [line.split("\t", 1)[1] for line in itertools.islice(file, 5000)]

    ptb = metrics._ptb_tokenize(JAVA, captions)
    python = [metrics._python_tokenize(caption) for caption in captions]

    disagreements = sum(a != b for a, b in zip(ptb, python, strict=True))
    assert disagreements <= len(captions) // 1000


def test_format_metrics_table():
    table = format_metrics_table({"BLEU-4": 0.28123, "METEOR": None, "CIDEr": 0.9, "images": 5})
    lines = table.splitlines()

    assert lines[0].split() == ["Metric", "Score"]
    assert lines[1].split() == ["BLEU-4", "0.2812"]
    assert lines[2].split() == ["METEOR", "unavailable"]
    assert lines[3].split() == ["CIDEr", "0.9000"]
    assert lines[4].split() == ["images", "5"]
    assert len({len(line) for line in lines}) == 1


def test_errors():
    with pytest.raises(ValueError, match="no predictions"):
        score_captions({}, TINY_REFERENCES)
    with pytest.raises(ValueError, match="'horse'"):
        score_captions(dict(TINY_PREDICTIONS, horse="a horse"), TINY_REFERENCES)
    with pytest.raises(ValueError, match="'dog'"):
        score_captions(TINY_PREDICTIONS, dict(TINY_REFERENCES, dog=[]))
    with pytest.raises(TypeError, match="'dog'"):
        score_captions(TINY_PREDICTIONS, dict(TINY_REFERENCES, dog="A dog runs."))
    with pytest.raises(ValueError, match="CIDEr-D.*choose from BLEU-1"):
        score_captions(TINY_PREDICTIONS, TINY_REFERENCES, metrics=["CIDEr-D"])


def _flickr8k_dev_references(count: int) -> list[list[list[str]]]:
    from torch_lstmcap.datasets import load_dataset
    from torch_lstmcap.vocab import tokenize

    root = DATA / "flickr8k"
    if not (root / "Flickr8k_text" / "Flickr8k.token.txt").is_file():
        pytest.skip(f"Flickr8k not found under {DATA} (set LSTMCAP_DATA)")
    records = load_dataset("flickr8k", root, "val")[:count]
    return [[tokenize(caption) for caption in record.captions] for record in records]


def test_cider_d_reward_equals_pycocoevalcap_cider_on_its_own_corpus():
    # Scored as its own corpus, CiderD must give pycocoevalcap's per-image CIDEr exactly:
    # candidates are shifted references of other images, cut to various lengths, so every
    # term (clipping, the length penalty, unseen n-grams) is exercised.
    from pycocoevalcap.cider.cider import Cider

    references = _flickr8k_dev_references(120)
    candidates = [
        references[(image + 1) % len(references)][image % 5][: 1 + image % 12]
        for image in range(len(references))
    ]
    candidates[0] = ["zebra", "quantum"]  # no reference has these words
    scorer = metrics.CiderD(references)

    gts = {image: [" ".join(ref) for ref in refs] for image, refs in enumerate(references)}
    res = {image: [" ".join(words)] for image, words in enumerate(candidates)}
    _, expected = Cider().compute_score(gts, res)
    ours = [scorer.score(image, words) for image, words in enumerate(candidates)]
    assert ours == pytest.approx(list(expected), abs=1e-12)
    assert ours[0] == 0.0
    assert max(ours) > 0.5


def test_cider_d_rewards_agreement_with_the_image_own_references():
    references = [
        [["a", "dog", "runs", "on", "the", "grass"], ["a", "brown", "dog", "runs"]],
        [["a", "man", "rides", "a", "bike"], ["a", "cyclist", "on", "a", "road"]],
        [["two", "children", "play", "in", "the", "sand"], ["kids", "on", "a", "beach"]],
    ]
    scorer = metrics.CiderD(references)
    assert len(scorer) == 3
    own = scorer.score(0, ["a", "brown", "dog", "runs"])
    other = scorer.score(1, ["a", "brown", "dog", "runs"])
    assert own > 1.0 > other
    # Same words, far longer: the Gaussian length penalty takes most of the reward away.
    assert scorer.score(0, ["a", "brown", "dog", "runs"] * 4) < 0.2 * own
    assert scorer.score(0, []) == 0.0
    with pytest.raises(ValueError, match="at least one reference"):
        metrics.CiderD([[["a", "dog"]], []])
