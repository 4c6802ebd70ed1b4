"""caption.py driven as a user would: a subprocess in the repository root, real photographs.

The model is a small checkpoint made here with random weights over a vocabulary of real
Flickr8k captions: its sentences are nonsense, but they are the ones the library computes,
which is what the command line must print. Each run of caption.py pays for importing torch,
so every run checks as much as one invocation can show.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from shared_data import DATA

import caption
from torch_lstmcap import inference
from torch_lstmcap.captioner import Captioner, CaptionerConfig
from torch_lstmcap.checkpoint import EncoderInfo, save_checkpoint
from torch_lstmcap.datasets import read_flickr8k
from torch_lstmcap.encoder import EncoderError, ImageLoadError, build_encoder, load_image
from torch_lstmcap.inference import ImageCaptioner, default_checkpoint_path, expand_image_paths
from torch_lstmcap.vocab import Vocabulary

ROOT = Path(__file__).resolve().parents[1]
FLICKR8K = DATA / "flickr8k"
FLICKR8K_PHOTOS = FLICKR8K / "Flicker8k_Dataset"

pytestmark = pytest.mark.skipif(
    not (FLICKR8K / "Flickr8k_text" / "Flickr8k.token.txt").is_file(),
    reason=f"Flickr8k not found under {DATA} (set LSTMCAP_DATA to the shared data folder)",
)

TIMEOUT_S = 300

# caption.py run as __main__ with its bundled-model folder pointed at the first argument, so
# that the message for a missing model is checked whether or not this checkout has one.
WITHOUT_BUNDLED_MODEL = (
    "import runpy, sys\n"
    "from pathlib import Path\n"
    "import torch_lstmcap.inference as inference\n"
    "inference.DEFAULT_MODEL_DIR = Path(sys.argv[1])\n"
    "sys.argv = ['caption.py', *sys.argv[2:]]\n"
    "runpy.run_path('caption.py', run_name='__main__')\n"
)

# caption.py run as __main__ decoding each batch as soon as it is encoded, so that its output
# comes a line at a time and a pipe closed after the first line breaks on a later one.
ONE_BATCH_AT_A_TIME = (
    "import runpy, sys\n"
    "import torch_lstmcap.inference as inference\n"
    "inference.DECODE_ROWS = 1\n"
    "sys.argv = ['caption.py', *sys.argv[1:]]\n"
    "runpy.run_path('caption.py', run_name='__main__')\n"
)


def start_caption(*args, command: tuple[str, ...] = ("caption.py",)) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *command, *map(str, args)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run_caption(*args, command: tuple[str, ...] = ("caption.py",)) -> subprocess.CompletedProcess:
    return finish(start_caption(*args, command=command))


@pytest.fixture(scope="session")
def photos() -> list[Path]:
    return sorted(FLICKR8K_PHOTOS.glob("*.jpg"))[:4]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A real checkpoint for the default encoder: Flickr8k words, random decoder weights."""
    captions = [
        caption for item in read_flickr8k(FLICKR8K, "val")[:60] for caption in item.captions
    ]
    vocab = Vocabulary.build(captions, min_count=2)
    encoder = build_encoder()
    torch.manual_seed(0)
    config = CaptionerConfig(len(vocab), feature_dim=encoder.feature_dim, hidden_size=32)
    model = Captioner(config).eval()
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    return save_checkpoint(path, model, vocab, EncoderInfo.of(encoder))


@pytest.fixture(scope="session")
def captioner(checkpoint) -> ImageCaptioner:
    return ImageCaptioner.from_checkpoint(checkpoint)


def library_captions(captioner, paths, top_k=1) -> list[list[dict]]:
    """What caption.py should print for ``paths``, with its default options."""
    options = {"batch_size": 16, "beam_size": 3, "max_length": 20, "top_k": top_k}
    results = captioner.caption_files(paths, **options)
    return [
        [{"caption": c.text, "log_prob": c.log_prob} for c in result.captions] for result in results
    ]


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    return stderr.splitlines()


def test_folders_decode_in_groups_and_keep_input_order(captioner, monkeypatch, tmp_path):
    # Groups of at least 5 photographs from batches of 3: groups end mid-way through the
    # list, and an unreadable file sits inside one, yet each result is that of its own file.
    monkeypatch.setattr(inference, "DECODE_ROWS", 15)  # 5 photographs at beam size 3
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a photograph")
    paths = sorted(FLICKR8K_PHOTOS.glob("*.jpg"))[:10]
    paths.insert(4, broken)

    results = list(captioner.caption_files(paths, batch_size=3, top_k=2))

    assert [result.image for result in results] == [str(path) for path in paths]
    assert results[4].error and not results[4].captions
    for path, result in zip(paths, results, strict=True):
        if path == broken:
            continue
        alone = captioner.caption_image(path, top_k=2)
        assert [c.text for c in result.captions] == [c.text for c in alone]
        assert [c.log_prob for c in result.captions] == pytest.approx(
            [c.log_prob for c in alone], abs=1e-4
        )


def test_one_image_prints_the_caption_alone_and_imports_only_what_it_needs(
    checkpoint, captioner, photos
):
    [[expected]] = library_captions(captioner, photos[:1])

    result = run_caption(
        photos[0], "--checkpoint", checkpoint, command=("-X", "importtime", "caption.py")
    )

    lines = result.stderr.splitlines()
    imports = [line for line in lines if line.startswith("import time:")]
    modules = {line.split("|")[-1].strip().split(".")[0] for line in imports}
    assert "torch" in modules
    # Each of these costs seconds at start-up and serves only training or evaluation.
    assert not modules & {"torchvision", "pycocoevalcap", "matplotlib", "pandas", "scipy"}
    assert (result.returncode, [line for line in lines if line not in imports]) == (0, [])
    assert expected["caption"]
    assert result.stdout == expected["caption"] + "\n"


def test_files_and_folders_print_path_tab_caption_in_input_order(
    checkpoint, captioner, photos, tmp_path
):
    folder = tmp_path / "holiday"
    folder.mkdir()
    # Named so that sorting, not the order of creation, puts them in order; the folder's
    # other entries are not images and must be passed over.
    shutil.copy(photos[2], folder / "b_second.jpg")
    shutil.copy(photos[1], folder / "a_first.JPG")
    (folder / "notes.txt").write_text("not a photograph\n")
    (folder / "nested.jpg").mkdir()
    (folder / "nested.jpg" / "deeper.jpg").write_bytes(photos[3].read_bytes())
    not_an_image = tmp_path / "minutes.png"
    not_an_image.write_text("minutes of the meeting\n")

    result = run_caption(photos[3], folder, not_an_image, photos[0], "--checkpoint", checkpoint)

    good = [photos[3], folder / "a_first.JPG", folder / "b_second.jpg", photos[0]]
    expected = [
        f"{path}\t{best['caption']}"
        for path, [best] in zip(good, library_captions(captioner, good), strict=True)
    ]
    assert result.stdout.splitlines() == expected
    [error] = error_lines(result.stderr)
    assert str(not_an_image) in error
    assert result.returncode == 1


def test_a_folder_lists_every_image_suffix_in_any_case(tmp_path):
    names = ["a.JPG", "b.jpeg", "c.mpo", "d.png", "e.WebP", "f.bmp", "g.gif", "h.tif", "i.tiff"]
    for name in [*names, "notes.txt", "raw.cr2"]:
        (tmp_path / name).write_bytes(b"")

    assert [path.name for path in expand_image_paths([tmp_path])] == names


def test_a_folder_lists_a_broken_link_but_not_a_subfolder(tmp_path):
    (tmp_path / "album.jpg").mkdir()
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")
    (tmp_path / "photo.png").write_bytes(b"")

    paths = expand_image_paths([tmp_path])
    assert [path.name for path in paths] == ["gone.jpg", "photo.png"]
    with pytest.raises(ImageLoadError, match=r"gone\.jpg: broken symbolic link to .*deleted"):
        load_image(paths[0])


def test_json_top_k_and_unreadable_files(checkpoint, captioner, photos, tmp_path):
    missing = tmp_path / "missing.jpg"
    empty = tmp_path / "empty.jpg"
    empty.touch()
    truncated = tmp_path / "truncated.jpg"
    jpeg = photos[1].read_bytes()
    truncated.write_bytes(jpeg[: len(jpeg) // 2])
    not_an_image = tmp_path / "letter.jpg"
    not_an_image.write_text("Dear reader,\n")
    bad = [missing, empty, truncated, not_an_image]
    inputs = [photos[0], missing, empty, truncated, photos[1], not_an_image]

    result = run_caption(*inputs, "--json", "--top-k", "3", "--checkpoint", checkpoint)

    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [record["image"] for record in records] == list(map(str, inputs))
    expected = iter(library_captions(captioner, [photos[0], photos[1]], top_k=3))
    for path, record in zip(inputs, records, strict=True):
        if path in bad:
            assert set(record) == {"image", "error"}
            assert str(path) in record["error"]
            continue
        best_first = next(expected)
        assert set(record) == {"image", "caption", "log_prob", "captions"}
        assert len(record["captions"]) == 3
        assert [c["caption"] for c in record["captions"]] == [c["caption"] for c in best_first]
        assert [c["log_prob"] for c in record["captions"]] == pytest.approx(
            [c["log_prob"] for c in best_first], abs=1e-4
        )
        assert (record["caption"], record["log_prob"]) == (
            record["captions"][0]["caption"],
            record["captions"][0]["log_prob"],
        )
    errors = error_lines(result.stderr)
    assert len(errors) == len(bad)
    for path, line in zip(bad, errors, strict=True):
        assert str(path) in line
    assert result.returncode == 1


def test_a_closed_pipe_ends_quietly(checkpoint, photos):
    """``caption.py ... | head -1``: the first line, then no traceback when head has gone."""
    args = (*photos, "--json", "--batch-size", "1", "--checkpoint", checkpoint)
    with start_caption(*args, command=("-c", ONE_BATCH_AT_A_TIME)) as process:
        first_line = process.stdout.readline()
        # Closing the pipe while later batches are still being captioned makes their writes
        # fail, as they do when head exits.
        process.stdout.close()
        stderr = process.stderr.read()
        returncode = process.wait(timeout=TIMEOUT_S)

    record = json.loads(first_line)
    assert set(record) == {"image", "caption", "log_prob"}
    assert record["image"] == str(photos[0])
    assert (returncode, stderr) == (0, "")


def test_a_closed_pipe_keeps_the_status_of_an_image_that_failed(checkpoint, photos, tmp_path):
    gone = tmp_path / "gone.jpg"
    args = (gone, *photos, "--batch-size", "1", "--checkpoint", checkpoint)
    with start_caption(*args, command=("-c", ONE_BATCH_AT_A_TIME)) as process:
        first_line = process.stdout.readline()
        process.stdout.close()
        stderr = process.stderr.read()
        returncode = process.wait(timeout=TIMEOUT_S)

    assert first_line.startswith(f"{photos[0]}\t")
    assert (returncode, stderr) == (1, f"caption.py: {gone}: no such file\n")


def _close_stderr() -> None:
    os.close(2)


def _read_only_stderr() -> None:
    os.dup2(os.open(os.devnull, os.O_RDONLY), 2)


@pytest.mark.parametrize("spoil", [_close_stderr, _read_only_stderr], ids=["closed", "read-only"])
def test_an_unusable_stderr_still_lets_the_captions_out(checkpoint, photos, tmp_path, spoil):
    # caption.py ... 2>&-: the error line cannot be written, the captions still can. Python
    # starts with sys.stderr None when descriptor 2 is closed; writes to it fail when it is
    # open for reading only.
    gone = tmp_path / "gone.jpg"
    result = subprocess.run(
        [sys.executable, "caption.py", gone, photos[0], "--checkpoint", checkpoint],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=spoil,
        timeout=TIMEOUT_S,
    )
    assert result.returncode == 1
    [line] = result.stdout.splitlines()
    assert line.startswith(f"{photos[0]}\t") and len(line) > len(f"{photos[0]}\t")


def test_usage_errors_exit_2_with_one_line(checkpoint, photos, tmp_path):
    corrupt = tmp_path / "interrupted.safetensors"
    corrupt.write_bytes(checkpoint.read_bytes()[:-1000])
    no_model_dir = tmp_path / "default_model"
    no_model_dir.mkdir()
    photo = photos[0]
    # case: (what follows the interpreter on the command line, a fragment of the error line)
    cases = {
        "bad option": (["caption.py", photo, "--beam-width", "3"], "--beam-width"),
        "top-k over beam size": (
            ["caption.py", photo, "--beam-size", "2", "--top-k", "3"],
            "--top-k",
        ),
        "missing checkpoint": (
            ["caption.py", photo, "--checkpoint", tmp_path / "nowhere.safetensors"],
            "nowhere.safetensors",
        ),
        "corrupt checkpoint": (["caption.py", photo, "--checkpoint", corrupt], str(corrupt)),
        "checkpoint name too long": (
            ["caption.py", photo, "--checkpoint", tmp_path / ("m" * 300 + ".safetensors")],
            "cannot open (File name too long)",
        ),
        "checkpoint not a regular file": (
            ["caption.py", photo, "--checkpoint", "/dev/zero"],
            "/dev/zero: not a regular file",
        ),
        "beam size over the limit": (
            ["caption.py", photo, "--beam-size", "101"],
            "--beam-size must be at most 100, got 101",
        ),
        "no bundled model": (["-c", WITHOUT_BUNDLED_MODEL, no_model_dir, photo], "train.py"),
    }
    if not torch.cuda.is_available():
        cuda = ["caption.py", photo, "--device", "cuda", "--checkpoint", checkpoint]
        cases["cuda"] = (cuda, "--device cuda")

    # Started together: most of them pay seconds for importing torch before they can fail.
    processes = {case: start_caption(*argv, command=()) for case, (argv, _) in cases.items()}
    results = {case: finish(process) for case, process in processes.items()}

    for case, result in results.items():
        [line] = error_lines(result.stderr)
        assert line.startswith("caption.py: error: "), case
        assert cases[case][1] in line, case
        assert (result.returncode, result.stdout) == (2, ""), case
    no_model_line = results["no bundled model"].stderr
    assert str(no_model_dir) in no_model_line
    assert "python train.py" in no_model_line and "--checkpoint" in no_model_line


def test_a_checkpoint_of_an_encoder_unknown_here_is_named(checkpoint, tmp_path):
    with safe_open(str(checkpoint), framework="pt") as reader:
        tensors = {name: reader.get_tensor(name) for name in reader.keys()}
        header = reader.metadata()
    header["encoder"] = json.dumps({**json.loads(header["encoder"]), "name": "resnet9000"})
    odd = tmp_path / "odd.safetensors"
    save_file(tensors, str(odd), metadata=header)
    with pytest.raises(EncoderError) as error:
        ImageCaptioner.from_checkpoint(odd)
    assert str(error.value).startswith(f"{odd}: unknown encoder 'resnet9000'; choose one of")


def test_odd_file_names_keep_one_line_per_image(checkpoint, photos, tmp_path, capsys):
    """A newline, a tab or a byte that is not UTF-8 in a file name cannot split its line."""
    names = ["new\nline.jpg", "tab\there.jpg", os.fsdecode(b"latin-1 \xe9t\xe9.jpg")]
    paths = [tmp_path / name for name in names]
    for path in paths:
        shutil.copyfile(photos[0], path)

    assert caption.main([*map(str, paths), "--checkpoint", str(checkpoint)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == [
        f"{tmp_path}/new\\nline.jpg",
        f"{tmp_path}/tab\\there.jpg",
        f"{tmp_path}/latin-1 \\xe9t\\xe9.jpg",
    ]
    assert all(len(line.split("\t")) == 2 for line in lines)

    assert caption.main([*map(str, paths), "--checkpoint", str(checkpoint), "--json"]) == 0
    output = capsys.readouterr().out
    output.encode("utf-8")  # strict: no lone surrogates reach the terminal
    records = [json.loads(line) for line in output.splitlines()]
    assert [os.fsencode(record["image"]) for record in records] == list(map(os.fsencode, paths))


def test_a_folder_that_cannot_be_listed_fails_alone(checkpoint, photos, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_iterdir = Path.iterdir

    def iterdir(self):
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Path, "iterdir", iterdir)
        status = caption.main([str(locked), str(photos[0]), "--checkpoint", str(checkpoint)])

    output = capsys.readouterr()
    assert status == 1
    assert error_lines(output.err) == [
        f"caption.py: {locked}: cannot list folder (Permission denied)"
    ]
    assert len(output.out.splitlines()) == 1


def test_closed_or_full_stdout_is_one_error_line(checkpoint, photos, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdout", None)
    assert caption.main([str(photos[0]), "--checkpoint", str(checkpoint)]) == 2
    assert capsys.readouterr().err == "caption.py: error: standard output is closed\n"
    monkeypatch.undo()

    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full to simulate a full disk")
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [sys.executable, "caption.py", photos[0], "--checkpoint", checkpoint],
            cwd=ROOT,
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=TIMEOUT_S,
        )
    assert error_lines(result.stderr) == [
        "caption.py: error: cannot write the results (No space left on device)"
    ]
    assert result.returncode == 1


@pytest.mark.skipif(
    not default_checkpoint_path().is_file(), reason="no model is bundled in this checkout"
)
def test_the_bundled_model_captions_a_photograph(photos):
    result = run_caption(photos[0])

    assert (result.returncode, result.stderr) == (0, "")
    [caption] = result.stdout.splitlines()
    assert len(caption.split()) >= 3
