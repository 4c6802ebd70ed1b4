"""The bundled Flickr8k model captions real photographs sensibly."""

import re

import pytest
from shared_data import DATA

from torch_lstmcap import ImageCaptioner, default_checkpoint_path, tokenize
from torch_lstmcap.datasets import read_flickr8k

FLICKR8K = DATA / "flickr8k"

pytestmark = pytest.mark.skipif(
    not (FLICKR8K / "Flickr8k_text").is_dir(), reason=f"Flickr8k not found under {FLICKR8K}"
)


@pytest.fixture(scope="module")
def captioner():
    return ImageCaptioner.from_checkpoint(default_checkpoint_path())


@pytest.fixture(scope="module")
def dev_records():
    return read_flickr8k(FLICKR8K, "dev")


def unanimous(records, words: set[str], count: int):
    """The first ``count`` photographs all five of whose human captions use one of ``words``."""
    chosen = [
        record
        for record in records
        if len(record.captions) == 5
        and all(words & set(tokenize(caption)) for caption in record.captions)
    ]
    return chosen[:count]


def test_bundled_model_is_small_and_loads():
    path = default_checkpoint_path()
    assert path.is_file(), f"the default model is missing: {path}"
    assert path.stat().st_size <= 16 * 1024 * 1024
    assert path.with_name("MODEL_CARD.md").is_file()


def test_captions_are_well_formed_and_differ(captioner, dev_records):
    records = dev_records[:24]
    results = list(captioner.caption_files([record.image_path for record in records]))
    captions = [result.captions[0].text for result in results]

    for caption in captions:
        words = caption.split()
        assert 3 <= len(words) <= 20, caption
        assert re.fullmatch(r"[a-z0-9' -]+", caption), caption
        assert all(word in captioner.vocab for word in tokenize(caption)), caption
        assert "<unk>" not in caption
    # Different photographs get different sentences: far from one caption for everything.
    assert len(set(captions)) >= len(captions) * 2 // 3, captions


@pytest.mark.parametrize(
    ("subject", "words"),
    [("dog", {"dog", "dogs", "puppy"}), ("water", {"water", "pool", "ocean", "lake", "river"})],
)
def test_mentions_the_subject_humans_agree_on(captioner, dev_records, subject, words):
    records = unanimous(dev_records, words, count=10)
    assert len(records) == 10, f"fewer than 10 dev photographs whose captions all say {subject}"
    results = captioner.caption_files([record.image_path for record in records])
    captions = [result.captions[0].text for result in results]
    mentioned = [bool(words & set(tokenize(caption))) for caption in captions]
    assert sum(mentioned) >= 7, list(zip([r.image_id for r in records], captions, strict=True))


def test_caption_files_takes_one_path_as_one_file_and_refuses_a_batch_size_of_zero(
    captioner, dev_records
):
    path = dev_records[0].image_path
    [single] = list(captioner.caption_files(str(path)))
    [from_list] = list(captioner.caption_files([path]))
    assert single.error is None
    assert single.captions[0].text == from_list.captions[0].text
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        list(captioner.caption_files([path], batch_size=0))
