"""Readers for the caption datasets people actually have: Flickr8k, COCO, Karpathy splits, CSV.

Every reader returns the images of one split as a list of `ImageCaptions`, sorted by
`image_id`, each with at least one caption and a photograph that exists on disk. Real caption
files are messy, so a reader skips what it cannot use (malformed lines, empty captions,
captions whose photograph is missing, images with no captions), counts each reason, and logs
one summary line such as

    flickr8k dev: 1000 images, 5000 captions; skipped 1 image with no captions

It raises `DatasetError` when a file it needs is missing or when nothing usable is left.

Layouts, with `root` the folder passed as `--data-root`:

    flickr8k  root/Flickr8k_text/Flickr8k.token.txt and Flickr_8k.{train,dev,test}Images.txt,
              root/Flicker8k_Dataset/*.jpg (the official download; the text files and the
              photographs may also lie directly in root). Only the token file and the list
              of the split being read are needed.
    coco      root/annotations/captions_{train,val}{year}.json, root/{train,val}{year}/*.jpg
    karpathy  split_file is dataset_coco.json, dataset_flickr8k.json, ...; photographs are
              root/<filepath>/<filename> (root/<filename> when an entry has no filepath)
    csv       split_file (default root/<split>.csv, else root/captions.csv) with a header row
              naming an image column and a caption column, one row per caption; image paths
              are relative to root. See `read_csv` for how the split is chosen.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

DATA_FORMATS = ("flickr8k", "coco", "karpathy", "csv")
SPLITS = ("train", "val", "test")

# Split names as they appear in the formats' own files, mapped to ours. Karpathy's "restval"
# is the part of COCO val2014 that the Karpathy split gives to training.
_SPLIT_VALUES = {"train": "train", "val": "val", "dev": "val", "test": "test", "restval": "train"}

# Reasons for skipping, as (singular, plural) phrases for the summary line.
_MALFORMED_LINE = ("malformed line", "malformed lines")
_MALFORMED_ENTRY = ("malformed entry", "malformed entries")
_MALFORMED_ROW = ("malformed row", "malformed rows")
_EMPTY_CAPTION = ("empty caption", "empty captions")
_UNKNOWN_IMAGE = ("caption of an unlisted image", "captions of unlisted images")
_UNKNOWN_SPLIT = ("entry with an unknown split", "entries with an unknown split")
_NO_CAPTIONS = ("image with no captions", "images with no captions")
_MISSING_FILE = ("image with missing photograph", "images with missing photograph")
# The order reasons appear in the summary, whatever order the file met them in.
_REASONS = (
    _MALFORMED_LINE,
    _MALFORMED_ENTRY,
    _MALFORMED_ROW,
    _UNKNOWN_SPLIT,
    _UNKNOWN_IMAGE,
    _EMPTY_CAPTION,
    _NO_CAPTIONS,
    _MISSING_FILE,
)

_FLICKR8K_TOKEN_FILE = "Flickr8k.token.txt"
_FLICKR8K_SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
# The official archive spells the photograph folder "Flicker"; some mirrors correct it.
_FLICKR8K_IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset")
# "<id>.jpg#<n>\t<caption>". One id of the official file carries a stray ".1" after ".jpg";
# it names the same photograph, so the suffix is dropped rather than the caption.
_FLICKR8K_TOKEN_LINE = re.compile(
    r"(?P<image_id>[^#\s]+?\.jpg)(?:\.\d+)?#(?P<number>\d+)(?:\s+(?P<caption>.*))?",
    re.IGNORECASE,
)

_CSV_DELIMITERS = (",", "\t", "|", ";")
_CSV_IMAGE_COLUMNS = ("image", "image_name", "filename", "file_name")
_CSV_CAPTION_COLUMNS = ("caption", "comment", "text")
_IMAGE_NAME = re.compile(r"\.(jpe?g|png|webp|bmp|gif|tiff?|mpo)$", re.IGNORECASE)
_CSV_SPLIT_COLUMN = "split"


class DatasetError(ValueError):
    """A dataset cannot be read: a required file is missing, or nothing usable is left."""


@dataclass(frozen=True)
class ImageCaptions:
    """One photograph and its human captions.

    image_id: stable id in the format's own terms (Flickr8k: "1000268201_693b08cb0e.jpg",
        COCO and Karpathy COCO: the COCO image id as a string, CSV: the image column).
    image_path: absolute path to the photograph.
    captions: the captions as written, with surrounding and repeated whitespace removed.
    """

    image_id: str
    image_path: Path
    captions: tuple[str, ...]


def load_dataset(
    data_format: str,
    root: str | os.PathLike,
    split: str,
    split_file: str | os.PathLike | None = None,
    *,
    year: int = 2017,
) -> list[ImageCaptions]:
    """Read one split of a dataset in any supported format.

    data_format: one of DATA_FORMATS.
    root: the dataset folder (the image root for karpathy and csv).
    split: "train", "val" (or "dev") or "test".
    split_file: the Karpathy JSON (required for karpathy) or the CSV file (csv only).
    year: the COCO release, 2014 or 2017 (coco only).
    """
    if data_format not in DATA_FORMATS:
        raise DatasetError(
            f"unknown data format {data_format!r}; expected one of {', '.join(DATA_FORMATS)}"
        )
    if split_file is not None and data_format in ("flickr8k", "coco"):
        raise DatasetError(f"{data_format} takes no split file; it is only for karpathy and csv")

    root = _absolute(root)
    if data_format == "flickr8k":
        return read_flickr8k(root, split)
    if data_format == "coco":
        return read_coco(root, split, year=year)
    if data_format == "karpathy":
        if split_file is None:
            raise DatasetError("karpathy needs a split file, such as dataset_coco.json")
        return read_karpathy(split_file, root, split)

    split = _split_argument(split)
    if split_file is None:
        split_file = root / f"{split}.csv"
        if not split_file.is_file():
            split_file = root / "captions.csv"
    return read_csv(split_file, root, split=split)


def read_flickr8k(root: str | os.PathLike, split: str) -> list[ImageCaptions]:
    """Read a split of Flickr8k from its official text files ("dev" and "val" are the same)."""
    split = _split_argument(split)
    root = _absolute(root)
    label = f"flickr8k {'dev' if split == 'val' else split}"
    text_dir = root / "Flickr8k_text" if (root / "Flickr8k_text").is_dir() else root
    image_dir = next((root / name for name in _FLICKR8K_IMAGE_DIRS if (root / name).is_dir()), root)
    skipped: Counter[tuple[str, str]] = Counter()

    split_ids = dict.fromkeys(_read_lines(text_dir / _FLICKR8K_SPLIT_FILES[split], label))
    numbered_captions: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for line in _read_lines(text_dir / _FLICKR8K_TOKEN_FILE, label):
        match = _FLICKR8K_TOKEN_LINE.fullmatch(line)
        if match is None:
            skipped[_MALFORMED_LINE] += 1
            continue
        if match["image_id"] not in split_ids:
            continue
        caption = _clean(match["caption"] or "")
        if not caption:
            skipped[_EMPTY_CAPTION] += 1
            continue
        numbered_captions[match["image_id"]].append((int(match["number"]), caption))

    # Captions are listed by their "#n" number; the sort is stable for repeated numbers.
    captions = {
        image_id: [caption for _, caption in sorted(numbered, key=lambda item: item[0])]
        for image_id, numbered in numbered_captions.items()
    }
    paths = {image_id: image_dir / image_id for image_id in split_ids}
    return _assemble(label, paths, captions, skipped, image_dir)


def read_coco(root: str | os.PathLike, split: str, year: int = 2017) -> list[ImageCaptions]:
    """Read COCO's official captions JSON for the train or val split of the given year."""
    split = _split_argument(split)
    if split == "test":
        raise DatasetError(
            "coco has no public captions for the test split; evaluate on val, or use the "
            "Karpathy split (data format karpathy) for a held-out test set"
        )
    root = _absolute(root)
    label = f"coco {split}{year}"
    data = _read_json(root / "annotations" / f"captions_{split}{year}.json", label)
    image_dir = _require_dir(root / f"{split}{year}", label)
    images = _json_list(data, "images", label)
    annotations = _json_list(data, "annotations", label)
    skipped: Counter[tuple[str, str]] = Counter()

    paths: dict[str, Path] = {}
    for image in images:
        if not _has_fields(image, id=int, file_name=str):
            skipped[_MALFORMED_ENTRY] += 1
            continue
        paths[str(image["id"])] = image_dir / image["file_name"]

    # Annotation ids give a caption order that does not depend on how the file was written.
    captions: dict[str, list[str]] = defaultdict(list)
    well_formed = [a for a in annotations if _has_fields(a, id=int, image_id=int, caption=str)]
    skipped[_MALFORMED_ENTRY] += len(annotations) - len(well_formed)
    for annotation in sorted(well_formed, key=lambda a: a["id"]):
        image_id = str(annotation["image_id"])
        caption = _clean(annotation["caption"])
        if image_id not in paths:
            skipped[_UNKNOWN_IMAGE] += 1
        elif not caption:
            skipped[_EMPTY_CAPTION] += 1
        else:
            captions[image_id].append(caption)
    return _assemble(label, paths, captions, skipped, image_dir)


def read_karpathy(
    json_path: str | os.PathLike, image_root: str | os.PathLike, split: str
) -> list[ImageCaptions]:
    """Read one split of a Karpathy split JSON (dataset_coco.json, dataset_flickr8k.json, ...).

    Entries whose split is "restval" belong to train. An entry's image id is its "cocoid"
    when it has one (so it matches `read_coco`), else its file name (matching `read_flickr8k`).
    The photograph is image_root/filepath/filename, or image_root/filename without filepath.
    """
    split = _split_argument(split)
    json_path = _absolute(json_path)
    label = f"karpathy {json_path.name} {split}"
    data = _read_json(json_path, label)
    image_root = _require_dir(_absolute(image_root), label)
    skipped: Counter[tuple[str, str]] = Counter()

    paths: dict[str, Path] = {}
    captions: dict[str, list[str]] = defaultdict(list)
    for entry in _json_list(data, "images", label):
        if (
            not _has_fields(entry, filename=str, split=str, sentences=list)
            or not isinstance(entry.get("filepath", ""), str)
            or not isinstance(entry.get("cocoid", ""), int | str)
        ):
            skipped[_MALFORMED_ENTRY] += 1
            continue
        entry_split = _SPLIT_VALUES.get(entry["split"])
        if entry_split is None:
            skipped[_UNKNOWN_SPLIT] += 1
            continue
        if entry_split != split:
            continue
        image_id = str(entry["cocoid"]) if "cocoid" in entry else entry["filename"]
        paths[image_id] = image_root / entry.get("filepath", "") / entry["filename"]
        for sentence in entry["sentences"]:
            caption = _clean(_karpathy_raw(sentence))
            if caption:
                captions[image_id].append(caption)
            else:
                skipped[_EMPTY_CAPTION] += 1
    return _assemble(label, paths, captions, skipped, image_root)


def read_csv(
    csv_path: str | os.PathLike, image_root: str | os.PathLike, split: str | None = None
) -> list[ImageCaptions]:
    """Read a CSV of image and caption columns, one row per caption (the Kaggle layout).

    The header names the image column (image, image_name, filename or file_name) and the
    caption column (caption, comment or text); the delimiter is the first of , tab | ; found
    in the header. Image paths are relative to image_root, or absolute.

    Splits: with a "split" column, only the rows whose split matches `split` are read (dev
    counts as val, restval as train; `split=None` reads all rows). Without one, the file
    describes a single split and all its rows are read whatever `split` says, so keep one
    file per split (`load_dataset` looks for root/<split>.csv first).
    """
    if split is not None:
        split = _split_argument(split)
    csv_path = _absolute(csv_path)
    label = f"csv {csv_path.name}"
    image_root = _require_dir(_absolute(image_root), label)
    text = _read_text(csv_path, label)
    if not text.strip():
        raise DatasetError(f"{label}: the file is empty: {csv_path}")
    delimiter = next((d for d in _CSV_DELIMITERS if d in text.partition("\n")[0]), ",")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    read = []
    try:
        for row in reader:
            first_line = read[-1][0] + 1 if read else 1
            if reader.line_num > first_line:
                # A quoted caption may hold line breaks, but not what looks like a next row:
                # that is a quote left open, which would swallow the rows after it.
                _check_no_rows_inside(row, delimiter, label, first_line)
            read.append((reader.line_num, row))
    except csv.Error as error:
        first_line = read[-1][0] + 1 if read else 1
        if reader.line_num > first_line:
            raise DatasetError(
                f"{label}: line {first_line}: a quoted field runs on to line "
                f"{reader.line_num} ({error}); is a quote left open?"
            ) from None
        raise DatasetError(f"{label}: line {reader.line_num}: {error}") from None
    rows = iter(row for _, row in read)
    header = [name.strip().lower() for name in next(rows)]
    image_column = _csv_column(header, _CSV_IMAGE_COLUMNS, label)
    caption_column = _csv_column(header, _CSV_CAPTION_COLUMNS, label)
    split_column = header.index(_CSV_SPLIT_COLUMN) if _CSV_SPLIT_COLUMN in header else None
    if split is not None:
        label += f" {split}" if split_column is not None else f" (whole file as {split})"
    skipped: Counter[tuple[str, str]] = Counter()

    paths: dict[str, Path] = {}
    captions: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        if not any(field.strip() for field in row):
            continue
        # An unquoted caption holding the delimiter spills into extra fields; when the
        # caption is the last column, those fields are its words.
        if len(row) > len(header) and caption_column == len(header) - 1:
            row = row[:caption_column] + [delimiter.join(row[caption_column:])]
        if len(row) != len(header) or not row[image_column].strip():
            skipped[_MALFORMED_ROW] += 1
            continue
        if split_column is not None:
            row_split = _SPLIT_VALUES.get(row[split_column].strip().lower())
            if row_split is None:
                skipped[_UNKNOWN_SPLIT] += 1
                continue
            if split is not None and row_split != split:
                continue
        image_id = row[image_column].strip()
        paths[image_id] = image_root / image_id
        caption = _clean(row[caption_column])
        if caption:
            captions[image_id].append(caption)
        else:
            skipped[_EMPTY_CAPTION] += 1
    return _assemble(label, paths, captions, skipped, image_root)


def _assemble(
    label: str,
    paths: dict[str, Path],
    captions: dict[str, list[str]],
    skipped: Counter[tuple[str, str]],
    image_dir: Path,
) -> list[ImageCaptions]:
    """Keep the images that have captions and a photograph, log the summary, sort by id.

    image_dir: where the photographs were looked for, named when nothing is usable.
    """
    dataset = []
    for image_id in sorted(paths):
        if not captions.get(image_id):
            skipped[_NO_CAPTIONS] += 1
        elif not paths[image_id].is_file():
            skipped[_MISSING_FILE] += 1
        else:
            dataset.append(ImageCaptions(image_id, paths[image_id], tuple(captions[image_id])))

    reasons = ", ".join(
        f"{count} {singular if count == 1 else plural}"
        for (singular, plural), count in ((reason, skipped[reason]) for reason in _REASONS)
        if count
    )
    if not dataset:
        raise DatasetError(
            f"{label}: no usable images (photographs in {image_dir})"
            + (f"; skipped {reasons}" if reasons else "")
        )
    caption_count = sum(len(item.captions) for item in dataset)
    summary = f"{label}: {len(dataset)} images, {caption_count} captions"
    logger.info(summary + (f"; skipped {reasons}" if reasons else ""))
    return dataset


def _split_argument(split: str) -> str:
    """Map a --split value to one of SPLITS, accepting "dev" for val."""
    if split == "dev":
        return "val"
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; expected one of train, val (or dev), test")
    return split


def _absolute(path: str | os.PathLike) -> Path:
    # abspath rather than resolve: symlinked photographs keep the path the user gave.
    return Path(os.path.abspath(os.path.expanduser(path)))


def _check_no_rows_inside(row: list[str], delimiter: str, label: str, line: int) -> None:
    """Refuse a field spanning lines when one of its later lines starts like a row does: with
    an image file name, quoted or not."""
    ends_name = re.compile(f'["{re.escape(delimiter)}]')
    for field in row:
        for later in field.splitlines()[1:]:
            name = ends_name.split(later.strip().lstrip('"'), maxsplit=1)[0]
            if _IMAGE_NAME.search(name.strip()):
                raise DatasetError(
                    f"{label}: line {line}: a quoted field runs on over rows such as "
                    f"{later.strip()[:60]!r}; is a quote left open?"
                )


def _clean(caption: str) -> str:
    return " ".join(caption.split())


def _require_dir(path: Path, label: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{label}: image folder not found: {path}")
    return path


def _read_text(path: Path, label: str) -> str:
    # utf-8-sig drops the byte-order mark spreadsheets write; undecodable bytes become U+FFFD
    # rather than stopping the read, and the tokenizer later ignores them.
    try:
        return path.read_text(encoding="utf-8-sig", errors="replace")
    except FileNotFoundError:
        raise DatasetError(f"{label}: file not found: {path}") from None


def _read_lines(path: Path, label: str) -> list[str]:
    """The non-blank lines of a text file, stripped."""
    lines = _read_text(path, label).splitlines()
    return [line.strip() for line in lines if line.strip()]


def _read_json(path: Path, label: str) -> object:
    try:
        with open(path, encoding="utf-8-sig") as file:
            return json.load(file)
    except FileNotFoundError:
        raise DatasetError(f"{label}: file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"{label}: cannot parse {path}: {error}") from None
    except RecursionError:
        raise DatasetError(f"{label}: cannot parse {path}: nested too deeply") from None


def _json_list(data: object, key: str, label: str) -> list:
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise DatasetError(f"{label}: the JSON file has no {key!r} list")
    return data[key]


def _has_fields(entry: object, **types: type) -> bool:
    """Whether entry is a dict whose named fields exist with the given types (bool is no int)."""
    return isinstance(entry, dict) and all(
        isinstance(entry.get(name), kind) and not isinstance(entry.get(name), bool)
        for name, kind in types.items()
    )


def _karpathy_raw(sentence: object) -> str:
    """The caption of a Karpathy sentence: its "raw" text, else its tokens joined."""
    if not isinstance(sentence, dict):
        return ""
    raw = sentence.get("raw")
    if isinstance(raw, str):
        return raw
    tokens = sentence.get("tokens")
    if isinstance(tokens, list) and all(isinstance(token, str) for token in tokens):
        return " ".join(tokens)
    return ""


def _csv_column(header: list[str], names: tuple[str, ...], label: str) -> int:
    for name in names:
        if name in header:
            return header.index(name)
    raise DatasetError(f"{label}: the header {header} has none of the columns {', '.join(names)}")
