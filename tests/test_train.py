"""train.py end to end on real photographs: learning, resuming, torchrun, failures, fine-tuning.

One short run on the first Flickr8k training photographs (validated on the first dev ones) is
shared by most tests; its feature cache, under the test's temporary folder, is built once and
reused by every later run on the same photographs.
"""

import contextlib
import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from shared_data import DATA

import train
from torch_lstmcap.checkpoint import load_checkpoint
from torch_lstmcap.datasets import ImageCaptions, load_dataset
from torch_lstmcap.encoder import build_encoder, load_image
from torch_lstmcap.features import build_feature_cache
from torch_lstmcap.inference import ImageCaptioner
from torch_lstmcap.metrics import METRIC_NAMES
from torch_lstmcap.report import read_metrics, truncate_metrics
from torch_lstmcap.training import CaptionPairs, caption_features, collate_captions
from torch_lstmcap.vocab import Vocabulary

ROOT = Path(__file__).resolve().parents[1]
FLICKR8K = DATA / "flickr8k"
COCO_MINI = DATA / "coco-mini"

pytestmark = pytest.mark.skipif(
    not (FLICKR8K / "Flickr8k_text" / "Flickr8k.token.txt").is_file(),
    reason=f"Flickr8k not found under {DATA} (set LSTMCAP_DATA to the shared data folder)",
)
needs_coco_mini = pytest.mark.skipif(
    not (COCO_MINI / "annotations" / "captions_train2017.json").is_file(),
    reason=f"coco-mini not found under {DATA} (set LSTMCAP_DATA to the shared data folder)",
)

TRAIN_IMAGES, VAL_IMAGES, EPOCHS = 200, 20, 4
# Quick to train, with a short warm-up so that a few epochs of 31 steps learn something.
QUICK = ["--lr", "5e-3", "--warmup-steps", "20", "--device", "cpu", "--quiet"]


def flickr8k_args(out: Path, cache: Path, epochs: int = EPOCHS) -> list[str]:
    return [
        "--data-format", "flickr8k", "--data-root", str(FLICKR8K), "--out", str(out),
        "--cache-dir", str(cache), "--max-images", str(TRAIN_IMAGES),
        "--max-val-images", str(VAL_IMAGES), "--epochs", str(epochs), "--hidden-size", "64",
        "--min-count", "3", "--batch-size", "32", *QUICK,
    ]  # fmt: skip


def run_main(argv: list[str]) -> tuple[int, str, str]:
    """train.main in this process: (exit status, stdout, stderr)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = train.main(argv)
    return status, stdout.getvalue(), stderr.getvalue()


def single_thread_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def epochs_logged(run: Path) -> list[int]:
    return [record["epoch"] for record in read_metrics(run / "metrics.jsonl")]


def model_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).model.state_dict()


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One thread, as the subprocesses get through OMP_NUM_THREADS.

    On a busy two-core machine the small matrix products of a 64-unit LSTM spend most of their
    time in two threads waiting for each other; and runs in this process and in subprocesses
    must compute alike for the resume test's exact comparison.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def cache(work) -> Path:
    return work / "cache"


@pytest.fixture(scope="module")
def trained(work, cache) -> SimpleNamespace:
    """The shared run: EPOCHS epochs on TRAIN_IMAGES photographs, features cached on the way."""
    run = work / "run"
    status, stdout, stderr = run_main(flickr8k_args(run, cache))
    assert status == 0, stderr
    return SimpleNamespace(run=run, stdout=stdout, best=run / "best.safetensors")


@pytest.mark.slow
def test_short_training_run_learns_captions_that_differ_between_photos(trained, cache):
    history = read_metrics(trained.run / "metrics.jsonl")
    assert [record["epoch"] for record in history] == list(range(1, EPOCHS + 1))
    losses = [record["train_loss"] for record in history]
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(np.isfinite(losses))
    assert f"epoch {EPOCHS}: loss" in trained.stdout

    checkpoint = load_checkpoint(trained.best)
    val = load_dataset("flickr8k", FLICKR8K, "val")[:VAL_IMAGES]
    features = build_feature_cache(
        build_encoder(checkpoint.encoder.name), [r.image_path for r in val], cache, progress=False
    ).features
    captions = caption_features(
        checkpoint.model, torch.from_numpy(np.array(features)), checkpoint.vocab
    )
    assert all(captions)
    assert len(set(captions)) >= 3, captions


@pytest.mark.slow
def test_run_directory_holds_checkpoints_log_plot_and_sample_page(trained):
    assert (trained.run / "best.safetensors").is_file()
    assert load_checkpoint(trained.run / "last.safetensors").training["epoch"] == EPOCHS
    assert (trained.run / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (trained.run / "samples.html").read_text(encoding="utf-8")
    assert page.count('<img src="data:image/jpeg;base64,') == VAL_IMAGES
    first_val = load_dataset("flickr8k", FLICKR8K, "val")[0]
    assert first_val.image_id in page
    leftovers = [path.name for path in trained.run.iterdir() if "tmp" in path.name]
    assert leftovers == []


@pytest.mark.slow
def test_resume_after_a_kill_continues_and_matches_the_uninterrupted_run(trained, work, cache):
    run = work / "killed"
    command = [sys.executable, "train.py", *flickr8k_args(run, cache)]
    process = subprocess.Popen(
        command, cwd=ROOT, env=single_thread_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 600
    while not (run / "last.safetensors").is_file():
        assert process.poll() is None, process.communicate()[1].decode()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint after 600 s"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    assert load_checkpoint(run / "last.safetensors").training["epoch"] == 1
    assert epochs_logged(run) == [1]

    status, stdout, stderr = run_main([*flickr8k_args(run, cache), "--resume"])

    assert status == 0, stderr
    assert stdout.startswith("epoch 2: ")
    assert epochs_logged(run) == list(range(1, EPOCHS + 1))
    assert (run / "best.safetensors").is_file()
    assert load_checkpoint(run / "last.safetensors").training["epoch"] == EPOCHS
    # The random state is restored with the weights, optimizer and schedule, so the two
    # halves compute exactly what one uninterrupted run computes.
    resumed, uninterrupted = (read_metrics(r / "metrics.jsonl") for r in (run, trained.run))
    assert [r["train_loss"] for r in resumed] == [r["train_loss"] for r in uninterrupted]
    assert [r["val"] for r in resumed] == [r["val"] for r in uninterrupted]
    expected = model_weights(trained.run / "last.safetensors")
    for name, tensor in model_weights(run / "last.safetensors").items():
        assert torch.equal(tensor, expected[name]), name


@pytest.mark.slow
def test_torchrun_with_two_processes_keeps_replicas_identical(trained, work, cache):
    run = work / "torchrun"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "train.py", *flickr8k_args(run, cache, epochs=2),
    ]  # fmt: skip
    result = subprocess.run(
        command, cwd=ROOT, env=single_thread_env(), capture_output=True, text=True, timeout=600
    )

    assert result.returncode == 0, result.stderr[-3000:]
    assert "weights identical on all 2 ranks" in result.stdout, result.stdout
    losses = [record["train_loss"] for record in read_metrics(run / "metrics.jsonl")]
    assert len(losses) == 2 and losses[1] < losses[0], losses
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_non_finite_loss_stops_with_one_line_and_keeps_the_checkpoints(
    trained, work, cache, monkeypatch
):
    run = work / "nan"
    saved = {}
    real_epoch = train.train_one_epoch

    def nan_from_epoch_two(*args, epoch, **kwargs):
        if epoch == 2:
            saved.update(
                {
                    name: (run / name).read_bytes()
                    for name in ("best.safetensors", "last.safetensors")
                }
            )
            real_loss = torch.nn.functional.cross_entropy
            monkeypatch.setattr(
                torch.nn.functional,
                "cross_entropy",
                lambda *a, **k: real_loss(*a, **k) * float("nan"),
            )
        return real_epoch(*args, epoch=epoch, **kwargs)

    monkeypatch.setattr(train, "train_one_epoch", nan_from_epoch_two)
    status, _, stderr = run_main(flickr8k_args(run, cache, epochs=3))

    assert status == 1
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    assert "loss became nan at epoch 2, step 0" in errors[0]
    assert "last.safetensors is kept" in errors[0]
    assert {name: (run / name).read_bytes() for name in saved} == saved
    assert load_checkpoint(run / "last.safetensors").training["epoch"] == 1
    assert epochs_logged(run) == [1]


@pytest.mark.slow
def test_eval_only_writes_every_metric_and_prints_a_table(trained, tmp_path):
    photos = write_csv_dataset(tmp_path / "photos", count=6)
    metrics_out = tmp_path / "scores" / "metrics.json"

    status, stdout, stderr = run_main(
        [
            "--eval-only", "--checkpoint", str(trained.best), "--data-format", "csv",
            "--data-root", str(photos), "--split", "test", "--metrics-out", str(metrics_out),
            "--beam-size", "2", "--cache-dir", str(tmp_path / "cache"), "--quiet",
        ]
    )  # fmt: skip

    assert status == 0, stderr
    scores = json.loads(metrics_out.read_text())
    assert list(scores) == [*METRIC_NAMES, "images", "beam_size"]
    assert scores["images"] == 6 and scores["beam_size"] == 2
    assert scores["SPICE"] is None
    if shutil.which("java"):
        assert 0 <= scores["METEOR"] <= 1
    for name in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L"):
        assert 0 <= scores[name] <= 1, name
    assert scores["BLEU-1"] > 0 and scores["CIDEr"] >= 0
    table = stdout.splitlines()
    assert table[0].split() == ["Metric", "Score"]
    assert any(line.split() == ["SPICE", "unavailable"] for line in table)
    assert any(line.split() == ["BLEU-1", f"{scores['BLEU-1']:.4f}"] for line in table)


@pytest.mark.slow
@pytest.mark.parametrize(
    "problem, message",
    [("missing data root", "nowhere"), ("missing checkpoint", "no such checkpoint file")],
)
def test_eval_only_bad_input_gives_one_error_line(trained, tmp_path, problem, message):
    checkpoint = trained.best if problem != "missing checkpoint" else tmp_path / "none.safetensors"
    data_root = tmp_path / "nowhere" if problem == "missing data root" else FLICKR8K
    status, stdout, stderr = run_main(
        [
            "--eval-only", "--checkpoint", str(checkpoint), "--data-format", "flickr8k",
            "--data-root", str(data_root), "--split", "val", "--cache-dir", str(tmp_path),
        ]
    )  # fmt: skip

    assert status == 1
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], stderr
    assert stdout == ""


def test_unknown_data_format_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--data-format", "parquet", "--data-root", str(tmp_path), "--out", "r"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "invalid choice: 'parquet'" in error and "flickr8k" in error


def test_a_run_that_fails_before_writing_leaves_no_folder_it_made(tmp_path):
    (tmp_path / "mine").mkdir()
    for out in (tmp_path / "new", tmp_path / "mine"):
        argv = ["--data-format", "flickr8k", "--data-root", str(tmp_path / "nowhere")]
        status, _, stderr = run_main([*argv, "--out", str(out), "--cache-dir", str(tmp_path)])
        assert status == 1 and "nowhere" in stderr
    assert not (tmp_path / "new").exists()
    assert (tmp_path / "mine").is_dir()


def test_resume_without_a_checkpoint_fails_before_computing_features(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "build_encoder", lambda name: pytest.fail("encoder was built"))
    status, _, stderr = run_main([*flickr8k_args(tmp_path / "new", tmp_path), "--resume"])
    assert status == 1
    assert (
        stderr.strip()
        == f"error: --resume: {tmp_path / 'new' / 'last.safetensors'} does not exist yet"
    )
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    "option, message",
    [
        (["--epochs", "0"], "--epochs must be at least 1, got 0"),
        (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["--max-images", "0"], "--max-images must be at least 1, got 0"),
        (["--beam-size", "0"], "--beam-size must be at least 1, got 0"),
        (["--dropout", "1"], "--dropout must be in [0, 1), got 1.0"),
        (["--lr", "nan"], "--lr must be a positive number, got nan"),
        (["--device", "tpu"], "--device 'tpu' is not a device"),
        (["--device", "meta"], "--device 'meta' is not supported; use cpu or cuda"),
        (["--seed", "-1"], "--seed must be in [0, 2**32), got -1"),
        (["--label-smoothing", "2"], "--label-smoothing must be in [0, 1), got 2.0"),
        (["--weight-decay", "-1"], "--weight-decay must be a number of at least 0, got -1.0"),
        (["--length-penalty", "nan"], "--length-penalty must be a number of at least 0, got nan"),
        (["--clip-norm", "-1"], "--clip-norm must be a positive number, got -1.0"),
        (["--encoder-lr", "0"], "--encoder-lr must be a positive number, got 0.0"),
        (["--warmup-steps", "-3"], "--warmup-steps must be at least 0, got -3"),
        (["--num-workers", "-1"], "--num-workers must be at least 0, got -1"),
        (["--out", ""], "argument --out: needs the name of a folder, got an empty one"),
    ],
)
def test_out_of_range_options_are_one_line_usage_errors(tmp_path, capsys, option, message):
    with pytest.raises(SystemExit) as exit_info:
        train.main([*flickr8k_args(tmp_path / "run", tmp_path), *option])
    assert exit_info.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert f": error: {message}" in line


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB"),
        torch.OutOfMemoryError("CUDA out of memory"),
        MemoryError(),
    ],
    ids=["cpu", "cuda", "python"],
)
def test_out_of_memory_is_one_error_line(tmp_path, monkeypatch, error):
    def run_out_of_memory(args, runtime):
        raise error

    monkeypatch.setattr(train, "train", run_out_of_memory)
    status, stdout, stderr = run_main(flickr8k_args(tmp_path / "run", tmp_path))
    assert (status, stdout) == (1, "")
    assert stderr.splitlines() == [
        "error: out of memory; a smaller --batch-size, --hidden-size or --samples-per-image "
        "needs less"
    ]


def test_out_of_memory_while_scoring_names_no_training_option(tmp_path, monkeypatch):
    def score_out_of_memory(args):
        raise MemoryError

    monkeypatch.setattr(train, "evaluate_checkpoint", score_out_of_memory)
    argv = ["--eval-only", "--checkpoint", str(tmp_path / "m.safetensors")]
    status, _, stderr = run_main([*argv, "--data-format", "flickr8k", "--data-root", "x"])
    assert (status, stderr) == (1, "error: out of memory\n")


def test_other_runtime_errors_are_not_called_out_of_memory(tmp_path, monkeypatch):
    def run_into_a_bug(args, runtime):
        raise RuntimeError("shapes do not match")

    monkeypatch.setattr(train, "train", run_into_a_bug)
    with pytest.raises(RuntimeError, match="shapes do not match"):
        run_main(flickr8k_args(tmp_path / "run", tmp_path))


def test_out_that_is_a_file_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "run").write_text("notes")
    with pytest.raises(SystemExit) as exit_info:
        train.main(flickr8k_args(tmp_path / "run", tmp_path))
    assert exit_info.value.code == 2
    assert "--out" in capsys.readouterr().err and (tmp_path / "run").read_text() == "notes"


def test_new_run_refuses_to_overwrite_a_run_before_computing_features(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "build_encoder", lambda name: pytest.fail("encoder was built"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.safetensors").write_bytes(b"an earlier run's model")

    status, _, stderr = run_main(flickr8k_args(run, tmp_path))

    assert status == 1
    assert stderr.splitlines() == [
        f"error: {run} already holds a run (best.safetensors); continue it with --resume, "
        "or choose another --out"
    ]
    assert (run / "best.safetensors").read_bytes() == b"an earlier run's model"


def test_init_from_a_non_checkpoint_fails_before_computing_features(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "build_encoder", lambda name: pytest.fail("encoder was built"))
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model\n" * 10)
    status, _, stderr = run_main(
        [*flickr8k_args(tmp_path / "run", tmp_path), "--init-from", str(notes)]
    )
    assert status == 1
    [line] = stderr.splitlines()
    assert line.startswith(f"error: {notes}: not a readable safetensors file")


def test_interrupt_before_the_first_checkpoint_says_to_rerun(tmp_path, monkeypatch):
    def interrupted(name):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "build_encoder", interrupted)
    status, _, stderr = run_main(flickr8k_args(tmp_path / "run", tmp_path))
    assert status == 130
    assert stderr == "interrupted; rerun the same command to continue\n"


def test_split_whose_photographs_are_all_unreadable_is_one_error(tmp_path):
    photos = write_csv_dataset(tmp_path / "photos", count=0, broken="broken.jpg")
    status, stdout, stderr = run_main(
        [
            "--data-format", "csv", "--data-root", str(photos), "--out", str(tmp_path / "run"),
            "--cache-dir", str(tmp_path / "cache"), *QUICK,
        ]
    )  # fmt: skip
    assert status == 1 and stdout == ""
    [line] = stderr.splitlines()
    assert line.startswith("error: train: none of the 1 photographs could be read")
    assert "broken.jpg" in line


@pytest.mark.slow
def test_batch_size_over_the_split_is_one_error_not_an_empty_epoch(trained, tmp_path, cache):
    run = tmp_path / "run"
    argv = [*flickr8k_args(run, cache), "--batch-size", str(TRAIN_IMAGES * 5 + 1)]
    status, stdout, stderr = run_main(argv)
    assert status == 1 and stdout == ""
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: --batch-size {TRAIN_IMAGES * 5 + 1} leaves no full batch: the training split "
        f"has {TRAIN_IMAGES * 5} captions; use a smaller --batch-size"
    ]
    assert not (run / "best.safetensors").exists()


@pytest.mark.slow
def test_eval_only_checks_metrics_out_before_decoding(trained, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "evaluate", lambda *a, **k: pytest.fail("split was decoded"))
    status, _, stderr = run_main(
        [
            "--eval-only", "--checkpoint", str(trained.best), "--data-format", "flickr8k",
            "--data-root", str(FLICKR8K), "--metrics-out", str(tmp_path), "--quiet",
        ]
    )  # fmt: skip
    assert status == 1
    assert stderr.splitlines() == [f"error: --metrics-out {tmp_path} is a folder, not a file"]


@pytest.mark.slow
def test_eval_only_refuses_to_write_metrics_over_the_checkpoint(trained, tmp_path):
    checkpoint = tmp_path / "model.safetensors"
    shutil.copyfile(trained.best, checkpoint)
    status, _, stderr = run_main(
        [
            "--eval-only", "--checkpoint", str(checkpoint), "--data-format", "flickr8k",
            "--data-root", str(FLICKR8K), "--metrics-out", str(checkpoint), "--quiet",
        ]
    )  # fmt: skip
    assert status == 1
    assert stderr.splitlines() == [
        f"error: --metrics-out {checkpoint} is the checkpoint being scored"
    ]
    assert checkpoint.read_bytes() == trained.best.read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize(
    "change, setting",
    [
        (["--encoder", "efficientnet-lite1"], "with --encoder efficientnet-lite0, not "),
        (["--fine-tune-encoder"], "without --fine-tune-encoder"),
    ],
)
def test_resume_with_other_settings_is_refused_and_keeps_the_run(
    trained, tmp_path, monkeypatch, change, setting
):
    run = tmp_path / "run"
    shutil.copytree(trained.run, run)
    before = (run / "last.safetensors").read_bytes()
    monkeypatch.setattr(train, "build_encoder", lambda name: pytest.fail("encoder was built"))
    status, _, stderr = run_main([*flickr8k_args(run, tmp_path), "--resume", *change])
    assert status == 1
    assert stderr.splitlines() == [
        f"error: --resume: the run in {run} was started {setting}"
        + ("efficientnet-lite1" if "--encoder" in change else "")
        + "; resume it with the same setting"
    ]
    assert (run / "last.safetensors").read_bytes() == before


@pytest.mark.slow
def test_resume_of_a_finished_run_says_there_is_nothing_to_train(trained, tmp_path, cache, caplog):
    run = tmp_path / "run"
    shutil.copytree(trained.run, run)
    before = (run / "last.safetensors").read_bytes()
    status, _, stderr = run_main([*flickr8k_args(run, cache), "--resume"])
    assert status == 0, stderr
    assert (
        f"warning: the run already has {EPOCHS} epochs, --epochs {EPOCHS}: no epoch to train"
        in caplog.messages
    )
    assert (run / "last.safetensors").read_bytes() == before


@pytest.mark.slow
@needs_coco_mini
def test_init_from_extend_vocab_keeps_old_rows_and_adds_new_words(trained):
    base = load_checkpoint(trained.best)
    coco = load_dataset("coco", COCO_MINI, "train")
    encoder = SimpleNamespace(name=base.encoder.name, feature_dim=base.model.config.feature_dim)

    for extend in (False, True):
        argv = ["--data-format", "coco", "--data-root", str(COCO_MINI), "--out", "unused"]
        argv += ["--init-from", str(trained.best), "--min-count", "2"]
        args = train.get_args_parser().parse_args(argv + ["--extend-vocab"] * extend)
        vocab = train.build_vocab(args, coco, base.vocab)
        # A fresh copy each time: growing the vocabulary changes the model it is given.
        model = train.build_model(args, vocab, encoder, load_checkpoint(trained.best))

        old_size = len(base.vocab)
        assert vocab.to_json()[:old_size] == base.vocab.to_json()
        assert (len(vocab) > old_size) == extend
        assert model.config.vocab_size == len(vocab)
        before, after = base.model.state_dict(), model.state_dict()
        for name, tensor in before.items():
            grown = name in ("embedding.weight", "output_bias")
            assert torch.equal(after[name][:old_size] if grown else after[name], tensor), name
        if extend:
            new_rows = after["embedding.weight"][old_size:]
            assert new_rows.abs().sum(dim=1).min() > 0
            assert not after["output_bias"][old_size:].any()


@pytest.mark.slow
@needs_coco_mini
def test_fine_tune_on_coco_mini_with_a_grown_vocabulary(trained, work, cache):
    run = work / "coco"
    status, stdout, stderr = run_main(
        [
            "--data-format", "coco", "--data-root", str(COCO_MINI), "--out", str(run),
            "--cache-dir", str(cache), "--max-images", "16", "--max-val-images", "8",
            "--init-from", str(trained.best), "--extend-vocab", "--min-count", "2",
            "--epochs", "1", "--batch-size", "16", *QUICK,
        ]
    )  # fmt: skip

    assert status == 0, stderr
    assert stdout.startswith("epoch 1: loss")
    base, tuned = load_checkpoint(trained.best), load_checkpoint(run / "best.safetensors")
    assert len(tuned.vocab) > len(base.vocab)
    assert tuned.vocab.to_json()[: len(base.vocab)] == base.vocab.to_json()
    assert tuned.model.config.hidden_size == base.model.config.hidden_size


@pytest.mark.slow
def test_self_critical_fine_tuning_logs_the_reward_and_keeps_the_vocabulary(trained, work, cache):
    run = work / "self-critical"
    argv = flickr8k_args(run, cache, epochs=2)
    argv += ["--objective", "self-critical", "--init-from", str(trained.best)]
    argv += ["--samples-per-image", "4", "--lr", "1e-4", "--batch-size", "80"]
    status, stdout, stderr = run_main(argv)

    assert status == 0, stderr
    history = read_metrics(run / "metrics.jsonl")
    assert [record["epoch"] for record in history] == [1, 2]
    assert all(0 < record["train_reward"] < 10 for record in history), history
    assert "reward" in stdout.splitlines()[0]
    base, tuned = load_checkpoint(trained.best), load_checkpoint(run / "last.safetensors")
    assert tuned.vocab == base.vocab
    changed = [
        name
        for name, tensor in tuned.model.state_dict().items()
        if not torch.equal(tensor, base.model.state_dict()[name])
    ]
    assert "lstm.Wh" in changed and "embedding.weight" in changed


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "--objective self-critical fine-tunes a trained model: pass --init-from"),
        (["--init-from", "m.safetensors", "--fine-tune-encoder"], "trains on cached features"),
        (["--init-from", "m.safetensors", "--samples-per-image", "1"], "at least 2, got 1"),
    ],
)
def test_self_critical_usage_errors_are_one_line(tmp_path, capsys, extra, message):
    argv = [*flickr8k_args(tmp_path / "run", tmp_path), "--objective", "self-critical", *extra]
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert exit_info.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert message in line


@pytest.mark.slow
def test_train_on_a_csv_of_photographs_skips_an_unreadable_one(trained, tmp_path, cache, caplog):
    photos = write_csv_dataset(tmp_path / "photos", count=8, broken="broken.jpg")
    run = tmp_path / "run"

    status, stdout, stderr = run_main(
        [
            "--data-format", "csv", "--data-root", str(photos), "--out", str(run),
            "--cache-dir", str(cache), "--init-from", str(trained.best),
            "--epochs", "2", "--batch-size", "8", *QUICK,
        ]
    )  # fmt: skip

    assert status == 0, stderr
    assert epochs_logged(run) == [1, 2]
    assert any("broken.jpg" in message for message in caplog.messages)
    # One file without a split column serves both splits, and the run says so.
    assert (
        "warning: 9 of the 9 validation photographs are also training photographs: "
        "best.safetensors is chosen on data it was trained on"
    ) in caplog.messages
    tuned = load_checkpoint(run / "best.safetensors")
    assert tuned.vocab == load_checkpoint(trained.best).vocab
    page = (run / "samples.html").read_text(encoding="utf-8")
    assert page.count("<img ") == 8 and "broken.jpg" not in page


@pytest.mark.slow
def test_init_from_another_encoder_is_refused_before_encoding(trained, tmp_path, monkeypatch):
    def encode(*args, **kwargs):
        pytest.fail("photographs were encoded with the wrong encoder")

    monkeypatch.setattr(train, "build_feature_cache", encode)
    argv = [*flickr8k_args(tmp_path / "run", tmp_path), "--init-from", str(trained.best)]
    status, stdout, stderr = run_main([*argv, "--encoder", "efficientnet-lite2"])
    assert (status, stdout) == (1, "")
    [line] = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert line.endswith(
        "was trained on encoder efficientnet-lite0, not efficientnet-lite2; "
        "pass --encoder efficientnet-lite0"
    )


@pytest.mark.slow
def test_a_vocabulary_of_special_tokens_only_is_refused(tmp_path, cache):
    photos = write_csv_dataset(tmp_path / "photos", count=4)
    run = tmp_path / "run"
    status, stdout, stderr = run_main(
        [
            "--data-format", "csv", "--data-root", str(photos), "--out", str(run),
            "--cache-dir", str(cache), "--min-count", "1000", "--epochs", "1", *QUICK,
        ]
    )  # fmt: skip
    assert status == 1 and stdout == ""
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: no word of the training captions occurs --min-count 1000 times or more: "
        "the vocabulary would hold only its special tokens"
    ]
    assert not (run / "best.safetensors").exists()


def write_csv_dataset(folder: Path, count: int, broken: str | None = None) -> Path:
    """``folder/captions.csv`` (image,caption) over ``count`` Flickr8k dev photographs, linked
    into ``folder/images``, with their human captions; plus an unreadable photograph if asked."""
    images = folder / "images"
    images.mkdir(parents=True)
    rows = []
    for record in load_dataset("flickr8k", FLICKR8K, "val")[:count]:
        (images / record.image_id).symlink_to(record.image_path)
        rows += [(f"images/{record.image_id}", caption) for caption in record.captions]
    if broken is not None:
        (images / broken).write_bytes(b"not a photograph")
        rows += [(f"images/{broken}", "a photograph that cannot be read")] * 5
    with open(folder / "captions.csv", "w", newline="", encoding="utf-8") as csv_file:
        writer = csv.writer(csv_file)
        writer.writerow(["image", "caption"])
        writer.writerows(rows)
    return folder


def test_caption_pairs_skip_failed_images_and_batches_pad():
    vocab = Vocabulary.build(["a dog runs", "a cat sits on a mat"], min_count=1)
    records = [
        ImageCaptions("dog", Path("dog.jpg"), ("a dog runs", "a dog")),
        ImageCaptions("broken", Path("broken.jpg"), ("a cat",)),
        ImageCaptions("cat", Path("cat.jpg"), ("a cat sits on a mat",)),
    ]
    features = np.arange(3 * 4, dtype=np.float32).reshape(3, 4)

    pairs = CaptionPairs(records, vocab, max_length=20, features=features, skip={1})

    assert len(pairs) == 3
    images, captions = collate_captions([pairs[i] for i in range(3)], vocab.pad_id)
    np.testing.assert_array_equal(images.numpy(), features[[0, 0, 2]])
    assert captions.shape == (3, len("a cat sits on a mat".split()) + 2)
    dog = vocab.encode("a dog")
    assert captions[1].tolist() == dog + [vocab.pad_id] * (captions.shape[1] - len(dog))


def test_truncate_metrics_drops_later_epochs_and_a_broken_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"epoch": epoch, "train_loss": 5.0 - epoch}) for epoch in (1, 2, 3)]
    path.write_text("\n".join(lines) + '\n{"epoch": 4, "tra', encoding="utf-8")

    truncate_metrics(path, last_epoch=2)

    assert read_metrics(path) == [json.loads(line) for line in lines[:2]]


@pytest.mark.slow
@needs_coco_mini
def test_fine_tuning_the_encoder_saves_it_and_caption_uses_it(tmp_path, cache):
    run = tmp_path / "run"
    status, stdout, stderr = run_main(
        [
            "--data-format", "coco", "--data-root", str(COCO_MINI), "--out", str(run),
            "--cache-dir", str(cache), "--max-images", "8", "--max-val-images", "4",
            "--fine-tune-encoder", "--encoder-lr", "1e-3", "--hidden-size", "16",
            "--min-count", "1", "--epochs", "1", "--batch-size", "8", "--num-workers", "0",
            *QUICK,
        ]
    )  # fmt: skip
    assert status == 0, stderr

    checkpoint = load_checkpoint(run / "best.safetensors")
    pretrained = build_encoder().state_dict()
    assert checkpoint.encoder_state is not None
    assert checkpoint.encoder_state.keys() == pretrained.keys()
    changed = [
        name
        for name, tensor in checkpoint.encoder_state.items()
        if tensor.is_floating_point() and not torch.equal(tensor, pretrained[name])
    ]
    assert changed, "the encoder was not tuned"
    # Batch-norm running statistics stay those of ImageNet.
    assert not any(name.endswith("running_mean") for name in changed)

    # caption.py's encoder (an inference copy, see ImageEncoder.for_inference) sees a
    # photograph as the tuned encoder does, not as the pretrained one.
    captioner = ImageCaptioner.from_checkpoint(run / "best.safetensors")
    tuned = build_encoder()
    tuned.load_state_dict(checkpoint.encoder_state)
    photo = sorted((COCO_MINI / "val2017").glob("*.jpg"))[0]
    pixels = tuned.preprocess(load_image(photo)).unsqueeze(0)
    with torch.inference_mode():
        features = captioner.encode(pixels)
        torch.testing.assert_close(features, tuned.eval()(pixels), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(features, build_encoder()(pixels), atol=1e-3)

    # --eval-only scores with the tuned encoder too, on the first images only when asked.
    metrics = tmp_path / "metrics.json"
    status, stdout, stderr = run_main(
        [
            "--eval-only", "--checkpoint", str(run / "best.safetensors"), "--data-format",
            "coco", "--data-root", str(COCO_MINI), "--split", "val", "--max-val-images", "3",
            "--metrics-out", str(metrics), "--quiet",
        ]
    )  # fmt: skip
    assert status == 0, stderr
    assert json.loads(metrics.read_text())["images"] == 3


def test_bfloat16_autocast_epoch_matches_float32_within_tolerance():
    # train.py turns on bfloat16 autocast on CUDA; the same code path runs on the CPU here.
    from torch_lstmcap.captioner import Captioner, CaptionerConfig
    from torch_lstmcap.training import LengthBucketSampler, train_one_epoch, warmup_cosine

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(64, 24, generator=generator)
    lengths = torch.randint(3, 9, (64,), generator=generator)
    captions = torch.zeros(64, 10, dtype=torch.long)
    for row, length in enumerate(lengths.tolist()):
        captions[row, 0] = 1
        captions[row, 1 : length - 1] = torch.randint(4, 40, (length - 2,), generator=generator)
        captions[row, length - 1] = 2
    pairs = [(features[row], captions[row].tolist()) for row in range(64)]

    def run(autocast_dtype):
        torch.manual_seed(0)
        model = Captioner(CaptionerConfig(vocab_size=40, feature_dim=24, hidden_size=32))
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(40, 1))
        sampler = LengthBucketSampler([len(ids) for _, ids in pairs], 16)
        loader = torch.utils.data.DataLoader(
            pairs, batch_sampler=sampler, collate_fn=lambda b: collate_captions(b, 0)
        )
        losses = []
        for epoch in range(1, 6):
            sampler.set_epoch(epoch)
            result = train_one_epoch(
                model, loader, optimizer, scheduler, device=torch.device("cpu"),
                autocast_dtype=autocast_dtype, epoch=epoch, progress=False,
            )  # fmt: skip
            losses.append(result.loss)
        return losses, model

    full, full_model = run(None)
    mixed, mixed_model = run(torch.bfloat16)
    assert all(parameter.dtype == torch.float32 for parameter in mixed_model.parameters())
    assert mixed[-1] < mixed[0], mixed
    assert mixed != full, "autocast changed nothing: was bfloat16 used at all?"
    assert np.allclose(mixed, full, rtol=0.02, atol=0.02), (mixed, full)


@pytest.mark.parametrize(
    ("epochs", "warmup_steps", "first_full_step"), [(2, 300, 3), (200, 300, 299), (2, 0, 0)]
)
def test_warm_up_takes_at_most_a_tenth_of_the_run(epochs, warmup_steps, first_full_step):
    # A short fine-tuning run must reach its --lr: 2 epochs of 20 steps and the default 300
    # warm-up steps would otherwise end at a thirtieth of it.
    args = SimpleNamespace(
        lr=1e-3, fine_tune_encoder=False, weight_decay=0.0, epochs=epochs, warmup_steps=warmup_steps
    )
    model = torch.nn.Linear(2, 2)
    optimizer, scheduler, warmup = train.build_optimizer(args, model, None, steps_per_epoch=20)
    assert warmup == first_full_step + (warmup_steps > 0)
    rates = []
    for _ in range(epochs * 20):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert max(rates) == pytest.approx(1e-3)
    # Warm-up of W steps reaches the full rate at step W - 1.
    assert rates.index(max(rates)) == first_full_step


def test_a_resumed_run_keeps_its_warm_up_whatever_epochs_says_now():
    # Started with 2 epochs of 20 steps: 4 warm-up steps. Resumed with --epochs 200, the cap
    # of a new run would be 300 steps, which would take the rate down again.
    args = SimpleNamespace(
        lr=1e-3, fine_tune_encoder=False, weight_decay=0.0, epochs=200, warmup_steps=300
    )
    optimizer, scheduler, warmup = train.build_optimizer(
        args, torch.nn.Linear(2, 2), None, steps_per_epoch=20, warmup_steps=4
    )
    assert warmup == 4
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr()[0] == pytest.approx(1e-3, rel=1e-3)
