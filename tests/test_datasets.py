import json
import logging
from pathlib import Path

import pytest
from PIL import Image
from shared_data import DATA

from torch_lstmcap.datasets import (
    DatasetError,
    ImageCaptions,
    load_dataset,
    read_coco,
    read_csv,
    read_flickr8k,
    read_karpathy,
)

FLICKR8K = DATA / "flickr8k"
FLICKR8K_TEXT = FLICKR8K / "Flickr8k_text"
FLICKR8K_PHOTOS = FLICKR8K / "Flicker8k_Dataset"
COCO_MINI = DATA / "coco-mini"

needs_flickr8k = pytest.mark.skipif(
    not (FLICKR8K_TEXT / "Flickr8k.token.txt").is_file(),
    reason=f"Flickr8k not found under {DATA} (set LSTMCAP_DATA to the shared data folder)",
)
needs_coco_mini = pytest.mark.skipif(
    not (COCO_MINI / "annotations" / "captions_train2017.json").is_file(),
    reason=f"coco-mini not found under {DATA} (set LSTMCAP_DATA to the shared data folder)",
)

# The photograph the official Flickr8k captions name but the release lacks; one of its caption
# ids carries the stray ".1" suffix.
FLICKR8K_MISSING_PHOTO = "2258277193_586949ec62.jpg"


def summary_line(caplog) -> str:
    """The one line a reader logged."""
    lines = [r.getMessage() for r in caplog.records if r.name == "torch_lstmcap.datasets"]
    assert len(lines) == 1, lines
    return lines[0]


def write_photo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (120, 80, 40)).save(path, format="JPEG")
    return path


def token_file_captions(image_id: str) -> list[str]:
    """The captions of one photograph in "#n" order, parsed straight from the token file."""
    lines = (FLICKR8K_TEXT / "Flickr8k.token.txt").read_text(encoding="utf-8").splitlines()
    numbered = []
    for line in lines:
        key, caption = line.split("\t", 1)
        name, number = key.split("#")
        if name in (image_id, image_id + ".1"):
            numbered.append((int(number), caption.strip()))
    return [caption for _, caption in sorted(numbered)]


@needs_flickr8k
def test_flickr8k_dev_split_is_the_official_id_list(caplog):
    caplog.set_level(logging.INFO, logger="torch_lstmcap.datasets")
    dev_ids = (FLICKR8K_TEXT / "Flickr_8k.devImages.txt").read_text().split()

    dev = read_flickr8k(FLICKR8K, "dev")

    assert [item.image_id for item in dev] == sorted(set(dev_ids))
    assert all(item.image_path.is_absolute() and item.image_path.is_file() for item in dev)
    assert all(item.image_path.name == item.image_id for item in dev)
    assert all(c == c.strip() and c for item in dev for c in item.captions)
    assert list(dev[0].captions) == token_file_captions(dev[0].image_id)
    captions = sum(len(item.captions) for item in dev)
    assert summary_line(caplog) == f"flickr8k dev: {len(dev)} images, {captions} captions"
    assert load_dataset("flickr8k", str(FLICKR8K), "val") == dev


@needs_flickr8k
def test_flickr8k_train_is_disjoint_from_dev_and_never_needs_the_missing_photo():
    train = load_dataset("flickr8k", FLICKR8K, "train")
    dev = load_dataset("flickr8k", FLICKR8K, "dev")

    train_ids = {item.image_id for item in train}
    assert train_ids == set((FLICKR8K_TEXT / "Flickr_8k.trainImages.txt").read_text().split())
    assert not train_ids & {item.image_id for item in dev}
    assert FLICKR8K_MISSING_PHOTO not in train_ids


def flickr8k_folder(root: Path, test_ids: list[str], photos: dict[str, Path], text_dir: str):
    """A Flickr8k folder with only the real token file, a test id list and the given photos."""
    (root / text_dir).mkdir(parents=True, exist_ok=True)
    (root / text_dir / "Flickr8k.token.txt").symlink_to(FLICKR8K_TEXT / "Flickr8k.token.txt")
    (root / text_dir / "Flickr_8k.testImages.txt").write_text("\n".join(test_ids) + "\n")
    for name, source in photos.items():
        (root / "Flicker8k_Dataset").mkdir(exist_ok=True)
        (root / "Flicker8k_Dataset" / name).symlink_to(source)


@needs_flickr8k
def test_flickr8k_test_split_needs_only_its_own_files(tmp_path, caplog):
    dev_ids = (FLICKR8K_TEXT / "Flickr_8k.devImages.txt").read_text().split()
    present, absent = dev_ids[:3], dev_ids[3]
    photos = {image_id: FLICKR8K_PHOTOS / image_id for image_id in present}
    # The stray-suffix photograph gets a stand-in, so its ".1#0" caption must be read.
    photos[FLICKR8K_MISSING_PHOTO] = FLICKR8K_PHOTOS / dev_ids[4]
    photos["1234567890_abcdef0123.jpg"] = FLICKR8K_PHOTOS / dev_ids[5]
    test_ids = [*present, absent, FLICKR8K_MISSING_PHOTO, "1234567890_abcdef0123.jpg"]
    flickr8k_folder(tmp_path, test_ids, photos, text_dir="Flickr8k_text")
    caplog.set_level(logging.INFO, logger="torch_lstmcap.datasets")

    test = load_dataset("flickr8k", tmp_path, "test")

    assert [item.image_id for item in test] == sorted([*present, FLICKR8K_MISSING_PHOTO])
    assert all(item.image_path.parent == tmp_path / "Flicker8k_Dataset" for item in test)
    stray = next(item for item in test if item.image_id == FLICKR8K_MISSING_PHOTO)
    assert list(stray.captions) == token_file_captions(FLICKR8K_MISSING_PHOTO)
    assert len(stray.captions) == 5
    assert summary_line(caplog) == (
        "flickr8k test: 4 images, 20 captions; "
        "skipped 1 image with no captions, 1 image with missing photograph"
    )
    for split, list_file in (("train", "trainImages"), ("dev", "devImages")):
        with pytest.raises(DatasetError, match=f"Flickr_8k.{list_file}.txt"):
            load_dataset("flickr8k", tmp_path, split)


@needs_flickr8k
def test_flickr8k_files_directly_in_root(tmp_path):
    image_id = (FLICKR8K_TEXT / "Flickr_8k.devImages.txt").read_text().split()[0]
    (tmp_path / "Flickr8k.token.txt").symlink_to(FLICKR8K_TEXT / "Flickr8k.token.txt")
    (tmp_path / "Flickr_8k.testImages.txt").write_text(image_id + "\n")
    (tmp_path / image_id).symlink_to(FLICKR8K_PHOTOS / image_id)

    (item,) = read_flickr8k(tmp_path, "test")

    assert item == ImageCaptions(
        image_id, tmp_path / image_id, tuple(token_file_captions(image_id))
    )


def test_flickr8k_messy_token_file(tmp_path, caplog):
    text = tmp_path / "Flickr8k_text"
    text.mkdir()
    lines = [
        "b.jpg#1\tA dog runs through the snow  ",
        "b.jpg#0\tA dog in snow .",
        "a.jpg#0\tUn café à Paris",
        "a.jpg#1\t   ",
        "a.jpg.1#2\tTwo people wait for the subway",
        "this line is not a caption",
        "c.jpg#0\tA cat .",
        "",
    ]
    (text / "Flickr8k.token.txt").write_text("\r\n".join(lines), encoding="utf-8")
    (text / "Flickr_8k.trainImages.txt").write_text("b.jpg\na.jpg\n\nc.jpg\nd.jpg  \n")
    for name in ("a.jpg", "b.jpg", "d.jpg"):
        write_photo(tmp_path / "Flicker8k_Dataset" / name)
    caplog.set_level(logging.INFO, logger="torch_lstmcap.datasets")

    train = read_flickr8k(tmp_path, "train")

    assert [(item.image_id, item.captions) for item in train] == [
        ("a.jpg", ("Un café à Paris", "Two people wait for the subway")),
        ("b.jpg", ("A dog in snow .", "A dog runs through the snow")),
    ]
    assert summary_line(caplog) == (
        "flickr8k train: 2 images, 4 captions; skipped 1 malformed line, 1 empty caption, "
        "1 image with no captions, 1 image with missing photograph"
    )


def test_flickr8k_without_photographs_is_an_error(tmp_path):
    (tmp_path / "Flickr8k.token.txt").write_text("a.jpg#0\tA dog .\n")
    (tmp_path / "Flickr_8k.testImages.txt").write_text("a.jpg\n")

    with pytest.raises(DatasetError, match="no usable images.*1 image with missing photograph"):
        read_flickr8k(tmp_path, "test")


@needs_coco_mini
@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_mini_matches_its_annotations(split, caplog):
    caplog.set_level(logging.INFO, logger="torch_lstmcap.datasets")
    annotations = json.loads((COCO_MINI / "annotations" / f"captions_{split}2017.json").read_text())
    file_names = {image["id"]: image["file_name"] for image in annotations["images"]}
    expected: dict[str, list[str]] = {}
    for annotation in sorted(annotations["annotations"], key=lambda a: a["id"]):
        expected.setdefault(str(annotation["image_id"]), []).append(
            " ".join(annotation["caption"].split())
        )

    dataset = read_coco(COCO_MINI, split)

    assert [item.image_id for item in dataset] == sorted(expected)
    for item in dataset:
        assert list(item.captions) == expected[item.image_id]
        assert item.image_path == COCO_MINI / f"{split}2017" / file_names[int(item.image_id)]
        assert item.image_path.is_file()
    # val2017 also holds photographs that no caption names; they are not part of the split.
    assert len(list((COCO_MINI / f"{split}2017").glob("*.jpg"))) >= len(dataset)
    captions = sum(len(item.captions) for item in dataset)
    assert summary_line(caplog) == f"coco {split}2017: {len(dataset)} images, {captions} captions"


@needs_coco_mini
def test_coco_test_split_and_missing_year_are_clear_errors():
    with pytest.raises(DatasetError, match="no public captions for the test split"):
        load_dataset("coco", COCO_MINI, "test")
    with pytest.raises(DatasetError, match="captions_val2014.json"):
        load_dataset("coco", COCO_MINI, "val", year=2014)


def test_coco_messy_annotations(tmp_path, caplog):
    for name in ("000000000001.jpg", "000000000002.jpg", "000000000004.jpg"):
        write_photo(tmp_path / "train2014" / name)
    images = [
        {"id": 1, "file_name": "000000000001.jpg"},
        {"id": 2, "file_name": "000000000002.jpg"},
        {"id": 3, "file_name": "000000000003.jpg"},
        {"id": 4, "file_name": "000000000004.jpg"},
        {"id": True, "file_name": "000000000005.jpg"},
    ]
    annotations = [
        {"id": 12, "image_id": 1, "caption": "A man\nriding a  wave on top of a surfboard. "},
        {"id": 11, "image_id": 1, "caption": "Un homme sur une planche à voile"},
        {"id": 13, "image_id": 1, "caption": " "},
        {"id": 21, "image_id": 3, "caption": "A photograph nobody kept."},
        {"id": 31, "image_id": 9, "caption": "A caption of an image not listed."},
        {"id": 41, "image_id": 4, "caption": "A kitchen with white cabinets"},
        {"id": 42, "image_id": 4},
    ]
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "captions_train2014.json").write_text(
        json.dumps({"images": images, "annotations": annotations})
    )
    caplog.set_level(logging.INFO, logger="torch_lstmcap.datasets")

    dataset = load_dataset("coco", tmp_path, "train", year=2014)

    assert [(item.image_id, item.captions) for item in dataset] == [
        ("1", ("Un homme sur une planche à voile", "A man riding a wave on top of a surfboard.")),
        ("4", ("A kitchen with white cabinets",)),
    ]
    assert summary_line(caplog) == (
        "coco train2014: 2 images, 3 captions; skipped 2 malformed entries, "
        "1 caption of an unlisted image, 1 empty caption, 1 image with no captions, "
        "1 image with missing photograph"
    )


def karpathy_coco_json(path: Path) -> None:
    """A file shaped like the Karpathy dataset_coco.json, with its usual fields."""

    def entry(cocoid, filepath, split, raws):
        filename = f"COCO_{filepath}_{cocoid:012d}.jpg"
        sentences = [{"raw": raw, "tokens": raw.lower().split(), "imgid": 0} for raw in raws]
        return {
            "filepath": filepath,
            "filename": filename,
            "cocoid": cocoid,
            "split": split,
            "sentids": list(range(len(raws))),
            "sentences": sentences,
        }

    images = [
        entry(391895, "val2014", "test", ["A man with a red helmet on a small moped."]),
        entry(522418, "val2014", "restval", ["A woman wearing a net on her head cutting a cake."]),
        entry(184613, "train2014", "train", ["A child holding a flowered umbrella ", ""]),
        entry(318219, "train2014", "train", ["A young boy standing in front of a computer."]),
        entry(554625, "val2014", "val", ["A boy wearing headphones using one computer."]),
        entry(60623, "val2014", "extra", ["A caption in a split nobody defined."]),
        {"filepath": "val2014", "split": "train", "sentences": []},
    ]
    images[3]["sentences"] = [{"tokens": ["a", "boy", "at", "a", "computer"]}]
    path.write_text(json.dumps({"dataset": "coco", "images": images}))


def test_karpathy_coco_splits(tmp_path, caplog):
    json_path = tmp_path / "dataset_coco.json"
    karpathy_coco_json(json_path)
    for cocoid, filepath in [(391895, "val2014"), (522418, "val2014"), (184613, "train2014")]:
        write_photo(tmp_path / filepath / f"COCO_{filepath}_{cocoid:012d}.jpg")
    write_photo(tmp_path / "train2014" / "COCO_train2014_000000318219.jpg")
    caplog.set_level(logging.INFO, logger="torch_lstmcap.datasets")

    train = load_dataset("karpathy", tmp_path, "train", split_file=json_path)

    assert [(item.image_id, item.captions) for item in train] == [
        ("184613", ("A child holding a flowered umbrella",)),
        ("318219", ("a boy at a computer",)),
        ("522418", ("A woman wearing a net on her head cutting a cake.",)),
    ]
    assert train[2].image_path == tmp_path / "val2014" / "COCO_val2014_000000522418.jpg"
    assert summary_line(caplog) == (
        "karpathy dataset_coco.json train: 3 images, 3 captions; skipped 1 malformed entry, "
        "1 entry with an unknown split, 1 empty caption"
    )
    (test_item,) = read_karpathy(json_path, tmp_path, "test")
    assert test_item.image_id == "391895"
    with pytest.raises(DatasetError, match="no usable images.*1 image with missing photograph"):
        read_karpathy(json_path, tmp_path, "val")


def test_karpathy_flickr8k_entries_have_no_filepath(tmp_path):
    images = [
        {
            "filename": "1000268201_693b08cb0e.jpg",
            "imgid": 0,
            "split": "train",
            "sentences": [{"raw": "A child in a pink dress is climbing up a set of stairs ."}],
        }
    ]
    json_path = tmp_path / "dataset_flickr8k.json"
    json_path.write_text(json.dumps({"dataset": "flickr8k", "images": images}))
    photo = write_photo(tmp_path / "photos" / "1000268201_693b08cb0e.jpg")

    (item,) = load_dataset("karpathy", tmp_path / "photos", "train", split_file=json_path)

    assert item.image_id == "1000268201_693b08cb0e.jpg"
    assert item.image_path == photo
    # A filepath or cocoid of the wrong type makes the entry malformed, not a crash.
    for field, value in (("filepath", 5), ("cocoid", [1, 2])):
        json_path.write_text(json.dumps({"images": [{**images[0], field: value}]}))
        with pytest.raises(DatasetError, match="1 malformed entry"):
            load_dataset("karpathy", tmp_path / "photos", "train", split_file=json_path)
    with pytest.raises(DatasetError, match="needs a split file"):
        load_dataset("karpathy", tmp_path / "photos", "train")


def test_csv_kaggle_captions_file(tmp_path, caplog):
    rows = [
        "image,caption",
        "1000268201_693b08cb0e.jpg,A child in a pink dress is climbing up a set of stairs .",
        '1000268201_693b08cb0e.jpg,"A girl , in pink , going into a wooden building ."',
        "1001773457_577c3a7d70.jpg,A black dog and a spotted dog are fighting",
        "1001773457_577c3a7d70.jpg,Two dogs , one black , play on the road",
        "1001773457_577c3a7d70.jpg,",
        "1002674143_1b742ab4b8.jpg,A little girl covered in paint sits in front of a rainbow .",
        "",
    ]
    csv_path = tmp_path / "captions.txt"
    csv_path.write_text("\ufeff" + "\r\n".join(rows), encoding="utf-8")
    for name in ("1001773457_577c3a7d70.jpg", "1000268201_693b08cb0e.jpg"):
        write_photo(tmp_path / "Images" / name)
    caplog.set_level(logging.INFO, logger="torch_lstmcap.datasets")

    dataset = load_dataset("csv", tmp_path / "Images", "train", split_file=csv_path)

    assert [(item.image_id, item.captions) for item in dataset] == [
        (
            "1000268201_693b08cb0e.jpg",
            (
                "A child in a pink dress is climbing up a set of stairs .",
                "A girl , in pink , going into a wooden building .",
            ),
        ),
        (
            "1001773457_577c3a7d70.jpg",
            (
                "A black dog and a spotted dog are fighting",
                "Two dogs , one black , play on the road",
            ),
        ),
    ]
    assert dataset[0].image_path == tmp_path / "Images" / "1000268201_693b08cb0e.jpg"
    assert summary_line(caplog) == (
        "csv captions.txt (whole file as train): 2 images, 4 captions; "
        "skipped 1 empty caption, 1 image with missing photograph"
    )


def test_csv_split_column_and_default_file(tmp_path, caplog):
    (tmp_path / "captions.csv").write_text(
        "caption,image,split\n"
        "A dog on grass,dog.jpg,train\n"
        "A dog running,dog.jpg,train\n"
        "A cat on a sofa,cat.jpg,dev\n"
        "Un gâteau,cake.jpg,val\n"
        "A bird,bird.jpg,holdout\n"
        "A tree,tree.jpg,test\n"
        "only two fields,x.jpg\n"
    )
    for name in ("dog.jpg", "cat.jpg", "cake.jpg", "bird.jpg", "tree.jpg"):
        write_photo(tmp_path / name)
    caplog.set_level(logging.INFO, logger="torch_lstmcap.datasets")

    val = load_dataset("csv", tmp_path, "dev")

    assert [(item.image_id, item.captions) for item in val] == [
        ("cake.jpg", ("Un gâteau",)),
        ("cat.jpg", ("A cat on a sofa",)),
    ]
    assert summary_line(caplog) == (
        "csv captions.csv val: 2 images, 2 captions; "
        "skipped 1 malformed row, 1 entry with an unknown split"
    )
    assert [item.image_id for item in read_csv(tmp_path / "captions.csv", tmp_path)] == [
        "cake.jpg",
        "cat.jpg",
        "dog.jpg",
        "tree.jpg",
    ]

    # A file named after the split takes precedence over captions.csv.
    (tmp_path / "val.csv").write_text("image,caption\ntree.jpg,A tall tree\n")
    (item,) = load_dataset("csv", tmp_path, "val")
    assert item.captions == ("A tall tree",)


def test_csv_flickr30k_pipe_layout(tmp_path):
    (tmp_path / "results.csv").write_text(
        "image_name| comment_number| comment\n"
        "1000092795.jpg| 0| Two young guys with shaggy hair look at their hands .\n"
        "1000092795.jpg| 1| Two young , White males are outside near many bushes .\n"
        "2199200615.jpg| 4 A dog runs across the grass .\n"
    )
    write_photo(tmp_path / "1000092795.jpg")
    write_photo(tmp_path / "2199200615.jpg")

    (item,) = read_csv(tmp_path / "results.csv", tmp_path)

    assert item.captions == (
        "Two young guys with shaggy hair look at their hands .",
        "Two young , White males are outside near many bushes .",
    )


def test_csv_errors(tmp_path):
    (tmp_path / "no_caption.csv").write_text("image,label\na.jpg,dog\n")
    with pytest.raises(DatasetError, match="none of the columns caption, comment, text"):
        read_csv(tmp_path / "no_caption.csv", tmp_path)
    with pytest.raises(DatasetError, match="file not found: .*captions.csv"):
        load_dataset("csv", tmp_path, "train")
    (tmp_path / "captions.csv").write_text("image,caption\ngone.jpg,A photograph nobody kept\n")
    with pytest.raises(DatasetError, match="no usable images"):
        load_dataset("csv", tmp_path, "train")
    (tmp_path / "huge.csv").write_text('image,caption\na.jpg,"' + "word " * 30_000 + '"\n')
    with pytest.raises(DatasetError, match=r"huge.csv: line 2: field larger than field limit"):
        read_csv(tmp_path / "huge.csv", tmp_path)
    # A quote left open would otherwise make the rest of the file one caption.
    (tmp_path / "open.csv").write_text(
        'image,caption\na.jpg,"A dog\nb.jpg,A cat\n\nc.jpg,"A bird"\n'
    )
    with pytest.raises(
        DatasetError,
        match=r"open.csv: line 2: a quoted field runs on over rows such as 'b.jpg,A cat'; is a",
    ):
        read_csv(tmp_path / "open.csv", tmp_path)
    # Every field quoted, as pandas writes with QUOTE_ALL: the next row's quote closes it.
    (tmp_path / "quoted.csv").write_text(
        '"image","caption"\n"a.jpg","A dog\n"b.jpg","A cat"\n"c.jpg","A bird"\n'
    )
    with pytest.raises(DatasetError, match=r"quoted.csv: line 2: a quoted field runs on over"):
        read_csv(tmp_path / "quoted.csv", tmp_path)
    # In a long file it reaches the csv module's field limit first; the line is still its own.
    rows = "".join(f"{index}.jpg,A dog runs on the beach\n" for index in range(6000))
    (tmp_path / "long.csv").write_text('image,caption\na.jpg,"A dog\n' + rows)
    with pytest.raises(DatasetError, match=r"long.csv: line 2: a quoted field runs on to line"):
        read_csv(tmp_path / "long.csv", tmp_path)


def test_csv_caption_may_span_lines_when_quoted(tmp_path):
    # As csv.writer and spreadsheets write a caption holding a line break (some COCO captions
    # do); a line separator inside an unquoted caption does not end its row either.
    write_photo(tmp_path / "a.jpg")
    write_photo(tmp_path / "b.jpg")
    (tmp_path / "captions.csv").write_text(
        'image,caption\na.jpg,"A dog runs,\nfast"\nb.jpg,A cat\u2028sleeps\n', encoding="utf-8"
    )
    dataset = read_csv(tmp_path / "captions.csv", tmp_path)
    assert [(item.image_id, item.captions) for item in dataset] == [
        ("a.jpg", ("A dog runs, fast",)),
        ("b.jpg", ("A cat sleeps",)),
    ]


def test_karpathy_json_nested_too_deeply_is_one_error(tmp_path):
    split_file = tmp_path / "dataset_deep.json"
    split_file.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DatasetError, match="cannot parse .*dataset_deep.json: nested too deeply"):
        load_dataset("karpathy", tmp_path, "train", split_file=split_file)


def test_load_dataset_rejects_unknown_names(tmp_path):
    with pytest.raises(DatasetError, match="expected one of flickr8k, coco, karpathy, csv"):
        load_dataset("voc", tmp_path, "train")
    with pytest.raises(DatasetError, match=r"unknown split 'validation'.*train, val \(or dev\)"):
        load_dataset("flickr8k", tmp_path, "validation")
    with pytest.raises(DatasetError, match="takes no split file"):
        load_dataset("coco", tmp_path, "train", split_file=tmp_path / "dataset_coco.json")
