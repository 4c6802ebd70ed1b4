"""What a training run leaves for people to read: a metrics log, a plot and a sample page."""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

from .datasets import ImageCaptions
from .encoder import ImageLoadError, load_image


def append_metrics(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line (one epoch) to ``metrics.jsonl``."""
    with open(path, "a", encoding="utf-8") as log_file:
        log_file.write(json.dumps(record) + "\n")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of ``metrics.jsonl``, one per epoch, in order; [] if there is none yet."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(path: str | os.PathLike, last_epoch: int) -> None:
    """Keep the records of epochs up to ``last_epoch``, the epoch a resumed run continues from.

    A run killed after logging an epoch but before its checkpoint was saved, or while writing
    a line, would otherwise leave that epoch logged twice, or a broken line, once resumed.
    """
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("epoch", last_epoch + 1) <= last_epoch:
            kept.append(line + "\n")
    temporary = path.with_suffix(".tmp.jsonl")
    temporary.write_text("".join(kept), encoding="utf-8")
    os.replace(temporary, path)


def plot_history(history: Sequence[dict], path: str | os.PathLike) -> None:
    """Training loss and validation metrics per epoch, as a PNG."""
    # A bare Figure draws without pyplot, so the caller's matplotlib backend is left alone.
    from matplotlib.figure import Figure

    epochs = [record["epoch"] for record in history]
    figure = Figure(figsize=(10, 4))
    loss_axis, metric_axis = figure.subplots(1, 2)
    loss_axis.plot(epochs, [record["train_loss"] for record in history], marker="o")
    loss_axis.set(xlabel="epoch", ylabel="training loss", title="Loss")
    for name in ("CIDEr", "BLEU-4"):
        values = [record.get("val", {}).get(name) for record in history]
        if any(value is not None for value in values):
            metric_axis.plot(epochs, values, marker="o", label=name)
    metric_axis.set(xlabel="epoch", title="Validation")
    metric_axis.legend()
    figure.tight_layout()
    temporary = Path(path).with_suffix(".tmp.png")
    figure.savefig(temporary, dpi=90)
    os.replace(temporary, path)


def write_sample_page(
    path: str | os.PathLike,
    records: Sequence[ImageCaptions],
    predictions: dict[str, str],
    title: str,
    count: int = 24,
) -> None:
    """An HTML page with ``count`` photographs, their generated and human captions.

    Thumbnails are embedded (base64 JPEG), so the page can be copied anywhere on its own.
    """
    rows = []
    for record in [record for record in records if record.image_id in predictions][:count]:
        try:
            thumbnail = load_image(record.image_path)
        except ImageLoadError:
            continue
        thumbnail.thumbnail((256, 256))
        buffer = io.BytesIO()
        thumbnail.save(buffer, format="JPEG", quality=80)
        source = base64.b64encode(buffer.getvalue()).decode()
        references = "".join(f"<li>{html.escape(text)}</li>" for text in record.captions)
        rows.append(
            f'<tr><td><img src="data:image/jpeg;base64,{source}"></td>'
            f"<td><b>{html.escape(predictions[record.image_id])}</b>"
            f"<ul>{references}</ul><small>{html.escape(record.image_id)}</small></td></tr>"
        )
    page = (
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif} td{vertical-align:top;padding:6px}"
        "ul{color:#555}</style>"
        f"<h1>{html.escape(title)}</h1><p>Bold: the model's caption. Below: human captions.</p>"
        f"<table>{''.join(rows)}</table>"
    )
    temporary = Path(path).with_suffix(".tmp.html")
    temporary.write_text(page, encoding="utf-8")
    os.replace(temporary, path)
