"""Caption photographs with a trained torch_lstmcap model.

    python caption.py photo.jpg                     # the caption alone
    python caption.py holiday/ more.png --json      # one JSON object per image
    python caption.py photo.jpg --checkpoint runs/f8k/best.safetensors --top-k 3

Exit status: 0 if every image was captioned, 1 if any image could not be read (or the output
could not be written), 2 for a usage error (bad option, missing or unusable checkpoint, no
images).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EXIT_OK, EXIT_IMAGE_FAILED, EXIT_USAGE = 0, 1, 2
# Beam search keeps beam_size rows per photograph, each scoring the whole vocabulary.
MAX_BEAM_SIZE = 100
TRAIN_HINT = (
    "python train.py --data-format flickr8k --data-root ../shared/data/flickr8k "
    "--out runs/flickr8k, then pass --checkpoint runs/flickr8k/best.safetensors"
)


class OneLineErrorParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, like every other error here."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def get_args_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        description="Print a caption for each photograph.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")
    parser.add_argument(
        "--checkpoint", type=Path, help="model file; without it, the bundled Flickr8k model"
    )
    parser.add_argument(
        "--beam-size", type=int, default=3, help=f"hypotheses kept per image (1-{MAX_BEAM_SIZE})"
    )
    parser.add_argument("--top-k", type=int, default=1, help="captions per image")
    parser.add_argument("--max-length", type=int, default=20, help="words per caption at most")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run")
    parser.add_argument("--batch-size", type=int, default=16, help="images encoded together")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    return parser


def usage_error(message: str) -> int:
    print(f"caption.py: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def printable(text: str) -> str:
    """``text`` with control characters and undecodable bytes escaped (``\\n``, ``\\xff``).

    A file name may hold a newline or a tab, which would split a result across lines or
    columns, and bytes that are not UTF-8, which Python carries as lone surrogates.
    """
    return "".join(char if char.isprintable() else _escape(char) for char in text)


def _escape(char: str) -> str:
    if 0xDC80 <= ord(char) <= 0xDCFF:
        # os.fsdecode's stand-in for the byte ord(char) - 0xDC00.
        return f"\\x{ord(char) - 0xDC00:02x}"
    return char.encode("unicode_escape").decode("ascii")


def json_line(record: dict) -> str:
    """One JSON object; an undecodable byte of a file name becomes a ``\\udcXX`` escape.

    Such a byte is a lone surrogate in Python, which ``json.loads`` gives back and
    ``os.fsencode`` turns into the original byte; written raw it would not be UTF-8.
    """
    text = json.dumps(record, ensure_ascii=False)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    if sys.stderr is None:
        # Started with stderr closed (2>&-): error lines go nowhere, but libraries (torch's
        # extension loader among them) still write to it.
        sys.stderr = open(os.devnull, "w")
    if sys.stdout is None:
        # Started with stdout closed (caption.py photo.jpg >&-): the captions would go nowhere.
        return usage_error("standard output is closed")
    if args.beam_size < 1 or args.batch_size < 1 or args.max_length < 2:
        return usage_error("--beam-size and --batch-size must be >= 1, --max-length >= 2")
    if args.beam_size > MAX_BEAM_SIZE:
        return usage_error(f"--beam-size must be at most {MAX_BEAM_SIZE}, got {args.beam_size}")
    if not 1 <= args.top_k <= args.beam_size:
        return usage_error(f"--top-k must be between 1 and --beam-size ({args.beam_size})")
    if args.checkpoint is not None:
        try:
            if args.checkpoint.is_dir():
                return usage_error(f"{args.checkpoint}: is a folder, not a checkpoint file")
            if not args.checkpoint.is_file():
                what = "not a regular file" if args.checkpoint.exists() else "no such file"
                return usage_error(f"{args.checkpoint}: {what}; pass a checkpoint file")
        except OSError as error:  # a name too long, a folder on the way that may not be searched
            return usage_error(f"{args.checkpoint}: cannot open ({error.strerror})")

    # Heavy imports after argument checks, so --help and usage errors answer at once.
    from torch_lstmcap.memory import keep_freed_memory

    keep_freed_memory()  # the encoder then runs almost twice as fast (see torch_lstmcap.memory)
    import torch

    from torch_lstmcap.checkpoint import CheckpointError
    from torch_lstmcap.encoder import EncoderError, ImageLoadError
    from torch_lstmcap.inference import ImageCaptioner, default_checkpoint_path, expand_image_paths

    if args.device == "cuda" and not torch.cuda.is_available():
        return usage_error("--device cuda, but no CUDA GPU is available")
    checkpoint = args.checkpoint or default_checkpoint_path()
    if args.checkpoint is None and not checkpoint.is_file():
        return usage_error(
            f"no default model is bundled in {checkpoint}; train one with: {TRAIN_HINT}"
        )
    paths, unlisted = [], []
    for item in args.images:
        try:
            paths.extend(expand_image_paths([item]))
        except ImageLoadError as error:
            unlisted.append((item, str(error)))
    if not paths and not unlisted:
        return usage_error("no image files found in the given folders")
    try:
        captioner = ImageCaptioner.from_checkpoint(checkpoint, device=args.device)
    except (CheckpointError, EncoderError) as error:
        return usage_error(printable(str(error)))
    except OSError as error:
        why = error.strerror or str(error)
        return usage_error(f"{printable(str(checkpoint))}: cannot open ({printable(why)})")

    failed = len(unlisted)
    results = captioner.caption_files(
        paths,
        batch_size=args.batch_size,
        progress=len(paths) > args.batch_size and sys.stderr.isatty(),
        beam_size=args.beam_size,
        top_k=args.top_k,
        max_length=args.max_length,
    )
    try:
        for item, error in unlisted:
            report_error(item, error, args.json)
        for result in results:
            if result.error is not None:
                failed += 1
                report_error(result.image, result.error, args.json)
            else:
                print(format_result(result, args, single=len(paths) == 1), flush=True)
    except BrokenPipeError:
        # The reader went away (caption.py ... | head): stop quietly, as Unix tools do, with
        # the status of what was done. Python flushes stdout once more at exit, so it must
        # point somewhere that accepts the bytes.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_IMAGE_FAILED if failed else EXIT_OK


def format_result(result, args, single: bool) -> str:
    """The output line of a captioned image: JSON, or the captions (after its path and a tab
    when there are several images)."""
    best = result.captions[0]
    if args.json:
        record = {"image": result.image, "caption": best.text, "log_prob": best.log_prob}
        if args.top_k > 1:
            record["captions"] = [
                {"caption": c.text, "log_prob": c.log_prob} for c in result.captions
            ]
        return json_line(record)
    prefix = "" if single else f"{printable(result.image)}\t"
    return prefix + "\t".join(c.text for c in result.captions)


def report_error(image: str, error: str, as_json: bool) -> None:
    """One line on stderr for an image that failed, and its JSON record with ``--json``."""
    try:
        print(f"caption.py: {printable(error)}", file=sys.stderr)
    except OSError:
        pass  # stderr cannot be written (open for reading only): the captions still go out
    if as_json:
        print(json_line({"image": image, "error": error}), flush=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:
        # The reader went away (caption.py ... | head): stop quietly, as Unix tools do. Python
        # flushes stdout once more at exit, so it must point somewhere that accepts the bytes.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(EXIT_OK)
    except KeyboardInterrupt:
        # Ctrl-C ends the run without a traceback, with the status a shell gives SIGINT.
        sys.exit(128 + 2)
    except OSError as error:
        # Most often stdout itself failed (a full disk); Python's last flush at exit would
        # fail again, so stdout is pointed at a sink first, as for a closed pipe.
        print(f"caption.py: error: cannot write the results ({error.strerror})", file=sys.stderr)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(EXIT_IMAGE_FAILED)
