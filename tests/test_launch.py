"""launch/train.py under torchrun: every strategy and model, killed jobs that resume, clear errors."""

from __future__ import annotations

import contextlib
import errno
import gc
import io
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import elra.line_control
from elra import ElraOptimizer
from launch import train as launcher
from launch.checkpoint import Checkpointer, CheckpointError
from launch.text import stdlib_source

TRAIN = Path(__file__).resolve().parents[1] / "launch" / "train.py"
SMALL = ["--epochs", "3", "--max-steps", "12", "--threads", "1"]
TINY_GPT = ["--model", "gpt", "--context", "16", "--width", "32", "--heads", "2", "--layers", "2", "--batch-size", "8"]


def _command(strategy: str, *extra: str) -> list[str]:
    launcher_ = [sys.executable] if strategy == "none" else [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return [*launcher_, str(TRAIN), "--strategy", strategy, *SMALL, *extra]


def _run(command: list[str], expect_ok: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if expect_ok:
        stderr = done.stderr  # its start names the rank that failed first, its end what the others saw
        assert done.returncode == 0, stderr if len(stderr) <= 6000 else f"{stderr[:3000]}\n...\n{stderr[-3000:]}"
    return done


def _in_process(*options: str) -> str:
    """What ``--strategy none`` prints, run by the launcher's main() in this process: the same job as
    ``python launch/train.py`` without the seconds a fresh interpreter takes to import torch."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        launcher.main(["--strategy", "none", *SMALL, *options])
    return out.getvalue()


def _train(strategy: str, *options: str) -> str:
    """The stdout of a job that must succeed: under torchrun, or in this process for ``none``."""
    return _in_process(*options) if strategy == "none" else _run(_command(strategy, *options)).stdout


def _epoch_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("epoch ")]


def _accuracies(output: str) -> list[float]:
    return [float(v) for v in re.findall(r" accuracy (\d\.\d+)", output)]


def test_every_strategy_runs_and_the_distributed_ones_agree():
    options = ("--preconditioner", "adam", "--lr", "1e-4")
    results = {s: _run(_command(s, *options)).stdout for s in ("ddp", "fsdp2", "fsdp1")} | {"none": _in_process(*options)}
    assert all(len(_epoch_lines(v)) == 3 for v in results.values())
    # the whole line: losses, accuracy, the boosted model's accuracy, ELRA's state
    assert _epoch_lines(results["ddp"]) == _epoch_lines(results["fsdp2"]) == _epoch_lines(results["fsdp1"])
    assert _accuracies(results["none"])[-1] > 0.3  # it learns: chance is 0.1 (36 steps from a 1e-4 probe)
    boost = [float(v) for v in re.findall(r" boost (\d\.\d+|nan)", results["fsdp1"])]
    assert boost != _accuracies(results["fsdp1"])  # the averaged weights are evaluated, not the current ones


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(stdlib_source(40_000), encoding="utf-8")
    return path


def test_gpt_under_every_strategy_reports_bits_per_char_and_the_distributed_ones_agree(text_file):
    gpt = [*TINY_GPT, "--epochs", "2", "--max-steps", "6"]
    default_corpus = _in_process(*gpt)  # the standard library's source, offline
    command = lambda s: _command(s, *gpt, "--text", str(text_file), "--preconditioner", "adam")
    results = {s: _run(command(s)).stdout for s in ("ddp", "fsdp2", "fsdp1")}
    lines = _epoch_lines(results["ddp"])
    assert len(lines) == 2 and len(_epoch_lines(default_corpus)) == 2
    assert lines == _epoch_lines(results["fsdp2"]) == _epoch_lines(results["fsdp1"])
    for line in lines + _epoch_lines(default_corpus):
        valid, bits = (float(re.search(rf" {k} (\d+\.\d+)", line).group(1)) for k in ("valid", "bits/char"))
        assert bits == pytest.approx(valid / math.log(2), abs=1e-3) and "accuracy" not in line
    assert float(re.search(r"bits/char (\d+\.\d+)", lines[-1]).group(1)) < math.log2(256)  # learns something


def _resume_and_compare(tmp_path: Path, strategy: str, *options: str) -> tuple[list[str], subprocess.CompletedProcess]:
    """Run 6 epochs uninterrupted; then kill a rank after epoch 3, resume, and compare the final weights.

    The uninterrupted run checkpoints too: a checkpoint taken mid-collection
    averages the ranks' pending sums, which rounds like the resumed run does.
    """
    reference = tmp_path / "reference.pt"
    uninterrupted = _train(
        strategy, *options, "--save-final", str(reference), "--epochs", "6", "--checkpoint-dir", str(tmp_path / "uninterrupted")
    )

    checkpoints, final = tmp_path / "ckpt", tmp_path / "final.pt"
    resumable = [*options, "--checkpoint-dir", str(checkpoints), "--save-final", str(final), "--epochs", "6"]
    crashed = subprocess.run(_command(strategy, *resumable, "--crash-after-epoch", "3"), capture_output=True, timeout=300)
    assert crashed.returncode != 0 and not final.exists()
    (checkpoints / "epoch-00004.tmp").mkdir()  # a write that was interrupted
    (checkpoints / "epoch-00004.tmp" / "state.pt").write_bytes(b"garbage")

    resumed = _run(_command(strategy, *resumable))
    assert [int(m) for m in re.findall(r"epoch +(\d+) ", resumed.stdout)] == [4, 5, 6]
    assert _epoch_lines(resumed.stdout) == _epoch_lines(uninterrupted)[3:]
    expected, got = torch.load(reference, weights_only=True), torch.load(final, weights_only=True)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    return resumable, resumed


@pytest.mark.parametrize("strategy", ["none", "ddp", "fsdp2", "fsdp1"])
def test_crashed_job_resumes_from_its_newest_complete_checkpoint(tmp_path, strategy):
    # 12 micro-batches per epoch, 5 per real step: epochs end in the middle of collecting
    resumable, resumed = _resume_and_compare(tmp_path, strategy, "--batch-multiplier", "5")
    if strategy in ("none", "ddp"):  # its checkpoints hold a pending micro-batch sum (72 = 14*5 + 2)
        saved = torch.load(tmp_path / "ckpt" / "epoch-00006" / "state.pt", weights_only=True)["optim"]
        assert json.loads(saved["param_groups"][0]["elra_controller"]["pending_losses"])
    assert "Warning" not in resumed.stderr, resumed.stderr[-3000:]  # FSDP1's deprecation warnings stay out
    if strategy in ("none", "fsdp1"):
        again = _train(strategy, *resumable)
        assert "the run is complete" in again
        assert again.strip().endswith(_epoch_lines(resumed.stdout)[-1])  # where it ended


def test_crashed_gpt_job_resumes_per_block_sharded(tmp_path, text_file):
    _resume_and_compare(tmp_path, "fsdp2", *TINY_GPT, "--max-steps", "4", "--text", str(text_file))


def test_resnet18_on_fake_cifar_runs_one_process_and_says_it_found_no_cifar(tmp_path, caplog):
    """A --data-dir without CIFAR-10 (a typo) trained on FakeData without a word."""
    pytest.importorskip("torchvision")
    out = _in_process("--model", "resnet18", "--fake-size", "64", "--max-steps", "2", "--epochs", "1", "--batch-size", "8",
                      "--data-dir", str(tmp_path / "no-cifar-here"))
    assert len(_accuracies(out)) == 1
    assert f"no CIFAR-10 files (cifar-10-batches-py, intact) under --data-dir {tmp_path / 'no-cifar-here'}: training " \
           "on FakeData of 64 training images" in caplog.text


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "option",
    [["--epochs", "0"], ["--epochs", "-1"], ["--batch-size", "0"], ["--timeout", "0"], ["--weight-decay", "-1"],
     ["--weight-decay", "1.5"], ["--lr", "inf"], ["--timeout", "inf"], ["--timeout", "1e15"], ["--timeout", "0.001"], ["--seed", str(2**64)],
     ["--threads", str(10**6)], ["--threads", str(2**31)], ["--epochs", str(10**6 + 1)]],
)
def test_nonsense_numbers_are_refused_by_name(option, capsys):
    with pytest.raises(SystemExit) as stop:
        launcher.parse_args(option)
    assert stop.value.code == 2 and option[0] in capsys.readouterr().err


@pytest.mark.parametrize(
    "model, option",
    [("mlp", ["--width", "64"]), ("resnet18", ["--heads", "8"]), ("mlp", ["--layers", "4"]), ("mlp", ["--context", "32"]),
     ("resnet18", ["--text", __file__]), ("gpt", ["--seed", "1"]), ("mlp", ["--fake-size", "64"]), ("gpt", ["--data-dir", "."])],
)
def test_an_option_of_another_model_is_refused_naming_the_model_it_applies_to(model, option, capsys):
    """--width, --heads, --layers, --context, --text (gpt), --seed (mlp), --data-dir, --fake-size (resnet18) were
    ignored silently by the other models: --model mlp --width 512 trained the same 128-wide MLP."""
    with pytest.raises(SystemExit) as stop:
        launcher.parse_args(["--model", model, *option])
    error = capsys.readouterr().err
    assert stop.value.code == 2 and re.search(rf"{option[0]} applies to --model \w+ only, not --model {model}", error), error
    launcher.parse_args(["--model", model])  # the defaults of the others apply to none


@pytest.mark.parametrize("preconditioner", ["muon", "factored"])
def test_a_preconditioner_that_needs_whole_matrices_under_fsdp1_is_refused_before_launch(preconditioner, capsys):
    """ELRA refused FSDP1's flat parameters with a traceback on every rank, after torchrun had started them."""
    with pytest.raises(SystemExit):
        launcher.parse_args(["--strategy", "fsdp1", "--preconditioner", preconditioner])
    assert f"--preconditioner {preconditioner} needs each matrix whole, but --strategy fsdp1 flattens them: use " \
           "--preconditioner auto or adam" in capsys.readouterr().err
    launcher.parse_args(["--strategy", "fsdp2", "--preconditioner", preconditioner])


@pytest.mark.parametrize("option", ["--epochs", "--lr", "--weight-decay", "--timeout", "--seed", "--max-steps"])
def test_a_value_that_is_not_a_number_is_refused_saying_what_the_option_takes(option, capsys):
    """argparse names the expected type after the parser function: "invalid _positive_float value"."""
    with pytest.raises(SystemExit) as stop:
        launcher.parse_args([option, "abc"])
    error = capsys.readouterr().err
    expected = re.search(rf"argument {option}: invalid (.+) value: 'abc'", error)
    assert stop.value.code == 2 and expected and "_" not in expected.group(1) and ("integer" in expected.group(1) or "number" in expected.group(1)), error


def test_a_batch_larger_than_the_training_set_is_refused(capsys):
    """Every epoch would take no step and report (and feed ELRA) a train loss of 0."""
    from launch.data import build_data

    train_set, valid_set, *_ = build_data(launcher.parse_args([]))  # 1437 training samples
    for world in (1, 2):
        launcher.check_sizes(launcher.parse_args(["--batch-size", str(1437 // world)]), train_set, valid_set, world)
        too_large = launcher.parse_args(["--batch-size", str(1437 // world + 1)])
        with pytest.raises(SystemExit, match=rf"--batch-size {1437 // world + 1} on {world} rank.*lower --batch-size"):
            launcher.check_sizes(too_large, train_set, valid_set, world)
    with pytest.raises(SystemExit, match="takes 2000 training samples per step, but an epoch has 1437"):
        launcher.main(["--batch-size", "2000", "--epochs", "1", "--threads", "1"])
    assert "epoch " not in capsys.readouterr().out


def test_a_text_too_short_for_the_context_is_refused_saying_how_long_it_must_be(tmp_path, capsys):
    """It ended in a traceback from TextWindows (and from CharCorpus under 1000 characters)."""
    from launch.data import TextWindows

    assert TextWindows(torch.arange(32), 16).fewest_training_samples() == 1  # 2 * context: every offset has a window
    with pytest.raises(ValueError, match="the text has 31 characters, too few for windows of --context 16: it needs "
                                         "at least 32; give a longer --text or a smaller --context"):
        TextWindows(torch.arange(31), 16)
    text = tmp_path / "short.txt"
    text.write_text("abcdefghij" * 120, encoding="utf-8")  # 1200 characters: 120 held out
    gpt = ["--model", "gpt", "--text", str(text), "--epochs", "1", "--max-steps", "1", "--threads", "1"]
    with pytest.raises(SystemExit, match=r"the held-out part of the text \(its last 10%\) has 120 characters, too few "
                                         "for windows of --context 64: it needs at least 128"):
        launcher.main(gpt)
    launcher.main([*gpt, "--context", "60", "--batch-size", "8"])
    text.write_text("abcdefghij" * 50, encoding="utf-8")
    with pytest.raises(SystemExit, match="the text has 500 characters; a language model needs at least 1000"):
        launcher.main(gpt)
    assert capsys.readouterr().out.count("epoch ") == 1


def test_text_windows_are_cut_on_the_device_of_the_text():
    """The offsets were made on the CPU: a text already on a GPU raised a device mismatch (meta stands in for it)."""
    from launch.text import CharCorpus

    ids, starts = torch.arange(100) * 3, torch.tensor([0, 5, 90])
    inputs, targets = CharCorpus.windows(ids, 8, starts)
    assert inputs[1].tolist() == [3 * i for i in range(5, 13)] and targets[1].tolist() == [3 * i for i in range(6, 14)]
    on_device = CharCorpus.windows(ids.to("meta"), 8, starts.to("meta"))
    assert [t.device.type for t in on_device] == ["meta", "meta"] and [t.shape for t in on_device] == [(3, 8), (3, 8)]


def test_the_default_text_reads_the_standard_librarys_packages_after_its_modules_and_no_installed_ones(tmp_path, monkeypatch):
    """Only the modules directly under the stdlib directory were read: 4.7M characters, a few epochs of a GPU run."""
    import sysconfig

    for name, text in {"b.py": "bee", "a.py": "aye", "pkg/c.py": "sea", "pkg/sub/d.py": "dee", "site-packages/x/e.py": "nope",
                       "dist-packages/f.py": "nope"}.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    assert stdlib_source(100) == "ayebeeseadee"
    assert stdlib_source(7) == "ayebees"


def test_a_text_that_is_not_utf8_is_refused_naming_it(tmp_path):
    """It ended in a traceback from the decoder."""
    text = tmp_path / "latin1.txt"
    text.write_bytes("caf\xe9 ".encode("latin-1") * 400)
    with pytest.raises(SystemExit, match=rf"--text {text} is not UTF-8 text \(invalid continuation byte at byte 3\); "
                                         "convert it to UTF-8"):
        launcher.main(["--model", "gpt", "--text", str(text), "--epochs", "1", "--max-steps", "1", "--threads", "1"])


def test_a_text_is_learned_as_its_file_holds_it_carriage_returns_included(tmp_path):
    """It was read with universal newlines: each CR LF became an LF and each lone CR an LF, so gpt learned, and
    reported bits per character of, another text than the file (fewer characters, another vocabulary)."""
    from launch.text import CharCorpus

    raw = "line one\r\nline two\rprogress 50%\rprogress 99%\n" * 40
    text = tmp_path / "crlf.txt"
    text.write_bytes(raw.encode("utf-8"))
    corpus = CharCorpus.load(text)
    assert "".join(corpus.vocab[i] for i in torch.cat([corpus.train, corpus.valid]).tolist()) == raw
    assert corpus.vocab == sorted(set(raw))


def test_a_non_finite_micro_batch_loss_stays_out_of_the_epochs_train_loss(monkeypatch, capsys):
    """ELRA retraces it; the epoch's mean (and ELRA's decay control) takes the finite losses only."""
    finite, fed = [], []
    loss = launcher._loss

    def one_nan(logits, targets, reduction="mean"):
        value = loss(logits, targets, reduction)
        if reduction == "mean":  # training
            value = value * float("nan") if len(finite) == 3 else value
            finite.append(value.item())
        return value

    monkeypatch.setattr(launcher, "_loss", one_nan)
    monkeypatch.setattr(launcher.ElraOptimizer, "set_train_loss", lambda self, value: fed.append(value))
    launcher.main(["--epochs", "1", "--max-steps", "8", "--threads", "1"])
    finite = [v for v in finite if math.isfinite(v)]
    assert len(finite) == 7 and fed == [pytest.approx(sum(finite) / 7, rel=1e-12)]
    assert f"train {sum(finite) / 7:.4f}" in capsys.readouterr().out


def _fails_clearly(command: list[str], *words: str) -> str:
    """The job fails with a message and no traceback from the launcher (torchrun adds one of its own)."""
    done = _run(command, expect_ok=False)
    assert done.returncode != 0 and f'File "{TRAIN.parent}' not in done.stderr, done.stderr[-3000:]
    assert all(w in done.stderr for w in words), done.stderr[-3000:]
    return done.stderr


def test_checkpoint_dir_that_is_a_file_is_refused(tmp_path):
    file = tmp_path / "ckpt"
    file.write_text("")
    _fails_clearly([sys.executable, str(TRAIN), "--checkpoint-dir", str(file)], "is a file")


def test_a_checkpoint_dir_that_is_one_checkpoint_is_refused_naming_the_directory_that_holds_it(tmp_path, capsys):
    """--checkpoint-dir ckpt/epoch-00002 (one checkpoint, not the directory of them) held no epoch-N: the job trained
    afresh from epoch 1 without a word, writing its checkpoints into the old one."""
    checkpoints = tmp_path / "ckpt"
    launcher.main(["--epochs", "2", "--max-steps", "2", "--threads", "1", "--checkpoint-dir", str(checkpoints)])
    one = checkpoints / "epoch-00002"
    held = sorted(p.name for p in one.iterdir())
    capsys.readouterr()
    with pytest.raises(CheckpointError, match=rf"--checkpoint-dir {one} is a checkpoint \(epoch 2\), not a directory of "
                                              rf"them: give the one that holds it, {checkpoints}, to resume from its newest"):
        launcher.main(["--epochs", "3", "--max-steps", "2", "--threads", "1", "--checkpoint-dir", str(one)])
    assert "epoch " not in capsys.readouterr().out and sorted(p.name for p in one.iterdir()) == held
    # a --save-final named state.pt among the epoch-N made the job one that could not be resumed or extended
    (checkpoints / "state.pt").write_bytes(b"")
    launcher.main(["--epochs", "3", "--max-steps", "2", "--threads", "1", "--checkpoint-dir", str(checkpoints)])
    assert [line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")] == ["3"]


def test_final_model_goes_to_a_directory_that_did_not_exist(tmp_path, capsys):
    """A missing parent directory ended the finished run with a traceback and without the model."""
    final = tmp_path / "new" / "model.pt"
    launcher.main(["--epochs", "1", "--max-steps", "2", "--threads", "1", "--save-final", str(final)])
    assert set(torch.load(final, weights_only=True)) == {"1.weight", "1.bias", "3.weight", "3.bias"}
    with pytest.raises(SystemExit):
        launcher.parse_args(["--save-final", str(tmp_path)])
    assert "is a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # not there yet: the model went into a file named "results"
        launcher.parse_args(["--save-final", f"{tmp_path / 'results'}/"])
    assert "names a directory" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--save-final", "--checkpoint-dir"])
def test_an_output_path_under_a_file_is_refused_before_training(tmp_path, option, capsys):
    """--save-final ended the finished run with a traceback and without the model; --checkpoint-dir with one."""
    file = tmp_path / "file"
    file.write_text("")
    with pytest.raises(SystemExit):
        launcher.main(["--epochs", "1", "--max-steps", "2", "--threads", "1", option, str(file / "sub" / "out")])
    captured = capsys.readouterr()
    assert "epoch " not in captured.out
    assert f"{option} {file}/sub/out: {file} is a file, so nothing can be created under it" in captured.err


@pytest.mark.parametrize("checkpoints", ["out", "out/ckpt"])
def test_a_final_model_named_as_the_checkpoint_directory_or_one_above_it_is_refused_before_training(tmp_path, checkpoints, capsys):
    """The directory did not exist yet, so it passed as a file name: the run trained to its end, then failed in a
    traceback renaming out.tmp onto the directory the checkpoints had created (and so did every resume)."""
    job = ["--epochs", "1", "--max-steps", "2", "--threads", "1", "--checkpoint-dir", str(tmp_path / checkpoints)]
    with pytest.raises(SystemExit):
        launcher.main([*job, "--save-final", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert "epoch " not in captured.out and not (tmp_path / "out.tmp").exists()
    assert (f"--save-final {tmp_path / 'out'} is a directory --checkpoint-dir {tmp_path / checkpoints} creates for its "
            "checkpoints; name a file") in captured.err
    launcher.main([*job, "--save-final", str(tmp_path / "out" / "model.pt")])  # a file in it is one
    saved = torch.load(tmp_path / checkpoints / "epoch-00001" / "state.pt", weights_only=True)["model"]
    final = torch.load(tmp_path / "out" / "model.pt", weights_only=True)
    assert saved.keys() == final.keys() and all(torch.equal(saved[k], final[k]) for k in saved)


def _slurm(tmp_path: Path, scontrol: str, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """launch/slurm.sbatch run by bash with stubs of scontrol (``scontrol``: its script), srun and torchrun;
    returns the run and the arguments torchrun was given."""
    stubs, args = tmp_path / "bin", tmp_path / "args"
    stubs.mkdir(exist_ok=True)
    for name, body in {"scontrol": scontrol, "srun": 'exec "$@"', "torchrun": 'printf "%s\\n" "$@" > "$ARGS"'}.items():
        (stubs / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (stubs / name).chmod(0o755)
    args.unlink(missing_ok=True)
    environment = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "ARGS": str(args), "SLURM_JOB_NODELIST": "node[7-9]",
                   "SLURM_NNODES": "3", "SLURM_JOB_ID": "42", "SLURM_GPUS_PER_NODE": "8", **env}
    done = subprocess.run(["bash", "launch/slurm.sbatch", "--strategy", "fsdp2", "--checkpoint-dir", "a b"],
                          cwd=TRAIN.parents[1], env=environment, capture_output=True, text=True, timeout=30)
    return done, args.read_text().splitlines() if args.exists() else []


def test_the_slurm_script_takes_the_first_node_of_a_long_list_and_passes_the_arguments_whole(tmp_path):
    """``scontrol show hostnames | head -n 1`` under pipefail: head leaves after the first line, and a list that
    scontrol wrote in more than one piece (a long one) died of SIGPIPE, which ended the script (141) saying nothing."""
    done, given = _slurm(tmp_path, "echo node7; sleep 0.3; echo node8; echo node9")  # the rest after head has left
    assert done.returncode == 0, (done.returncode, done.stderr)
    assert "--rdzv_endpoint=node7:29500" in given and "--nnodes=3" in given and "--nproc_per_node=8" in given
    assert given[-5:] == ["launch/train.py", "--strategy", "fsdp2", "--checkpoint-dir", "a b"]


def test_the_slurm_script_starts_a_rank_per_gpu_of_a_request_that_names_their_type(tmp_path):
    """``--gpus-per-node`` is ``[type:]count``: ``sbatch --gpus-per-node=a100:4`` sets SLURM_GPUS_PER_NODE to "a100:4",
    which went to torchrun's --nproc_per_node as it was, ending the job before training."""
    for request, ranks in (("a100:4", "4"), ("2", "2")):
        done, given = _slurm(tmp_path, "echo node7", SLURM_GPUS_PER_NODE=request)
        assert done.returncode == 0 and f"--nproc_per_node={ranks}" in given, (done.stderr, given)


def test_a_final_model_named_as_the_text_it_learns_is_refused_before_training(tmp_path, text_file, capsys):
    """--save-final replaced the --text file with the model at the end of the run: the text was gone, and a resume
    then called the model's pickle a text that is not UTF-8."""
    text = tmp_path / "corpus.txt"
    shutil.copyfile(text_file, text)
    with pytest.raises(SystemExit):
        launcher.main([*TINY_GPT, "--epochs", "1", "--max-steps", "1", "--threads", "1", "--text", str(text),
                       "--save-final", str(tmp_path / "." / "corpus.txt")])
    captured = capsys.readouterr()
    assert text.read_bytes() == text_file.read_bytes() and "epoch " not in captured.out
    assert f"--save-final {tmp_path}/corpus.txt is the --text file: the model would replace it" in captured.err


def test_cuda_without_a_device_for_the_rank_says_what_to_do(monkeypatch):
    """torch.cuda.set_device ended the job in a traceback (no driver, or more ranks than devices)."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(SystemExit, match="--device cuda: this process is local rank 0, but the machine has 0 CUDA "
                                         "devices: use --device cpu"):
        launcher.main(["--device", "cuda", "--epochs", "1"])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(SystemExit, match="local rank 2, but the machine has 2 CUDA devices: start at most one process "
                                         "per device"):
        launcher.main(["--device", "cuda", "--epochs", "1"])


def test_the_final_model_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A job killed while writing --save-final left a truncated file at its path, which looks like a finished run."""
    final = tmp_path / "model.pt"

    def killed_while_writing(obj, file) -> None:
        Path(file).write_bytes(b"half a model")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_while_writing)
    with pytest.raises(KeyboardInterrupt):
        launcher.main(["--epochs", "1", "--max-steps", "2", "--threads", "1", "--save-final", str(final)])
    assert not final.exists()


def test_checkpoints_and_the_final_model_are_on_disk_before_they_are_published(tmp_path, monkeypatch):
    """The rename that publishes a checkpoint or the final model came without an fsync of the files or of the
    directories: after a power loss the name could be there with its contents empty or cut short."""
    events = []
    real_fsync, real_rename, real_replace = os.fsync, Path.rename, Path.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd))[1])
    monkeypatch.setattr(Path, "rename", lambda self, to: (events.append(("rename", str(self))), real_rename(self, to))[1])
    monkeypatch.setattr(Path, "replace", lambda self, to: (events.append(("rename", str(self))), real_replace(self, to))[1])
    checkpoints, final = (tmp_path / "ckpt").resolve(), (tmp_path / "final.pt").resolve()
    launcher.main(["--epochs", "1", "--max-steps", "2", "--threads", "1", "--checkpoint-dir", str(checkpoints),
                   "--save-final", str(final)])
    partial = checkpoints / "epoch-00001.tmp"
    published = events.index(("rename", str(partial)))
    synced = {path for kind, path in events[:published] if kind == "fsync"}
    assert {str(partial / "state.pt"), str(partial / "meta.json"), str(partial)} <= synced, events
    assert ("fsync", str(checkpoints)) in events[published:], events  # the rename itself
    written = events.index(("rename", str(final) + ".tmp"))
    assert ("fsync", str(final) + ".tmp") in events[:written] and ("fsync", str(tmp_path.resolve())) in events[written:], events


def test_a_filesystem_without_fsync_still_takes_checkpoints(tmp_path, monkeypatch):
    """Some filesystems refuse fsync (EINVAL), of directories above all: it ended the job at its first checkpoint."""
    def refused(fd):
        raise OSError(errno.EINVAL, "Invalid argument")

    job = ["--max-steps", "2", "--threads", "1", "--checkpoint-dir", str(tmp_path / "ckpt")]
    launcher.main([*job, "--epochs", "1", "--save-final", str(tmp_path / "reference.pt")])
    monkeypatch.setattr(os, "fsync", refused)
    launcher.main([*job, "--epochs", "1", "--checkpoint-dir", str(tmp_path / "unsynced"), "--save-final", str(tmp_path / "final.pt")])
    expected, got = (torch.load(tmp_path / name, weights_only=True) for name in ("reference.pt", "final.pt"))
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert (tmp_path / "unsynced" / "epoch-00001" / "state.pt").exists()


def test_the_newest_checkpoints_are_kept_past_epoch_99999(tmp_path):
    """Old checkpoints were pruned in name order, in which epoch-100000 comes before epoch-99999: from epoch 100001
    on, the one before the newest was removed and epoch-99999 kept for good."""
    job = ["--max-steps", "1", "--threads", "1", "--checkpoint-dir", str(tmp_path)]
    launcher.main([*job, "--epochs", "1"])
    (tmp_path / "epoch-00001").rename(tmp_path / "epoch-99999")
    launcher.main([*job, "--epochs", "100001"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-100000", "epoch-100001"]


@pytest.mark.parametrize("strategy", ["none", "fsdp2"])
def test_an_empty_checkpoint_directory_is_named_as_unreadable_under_every_strategy(tmp_path, strategy):
    """An epoch-N directory that lost its files: a sharded job was told it had been written by --strategy none
    or ddp and to resume with those, which then failed on the missing state.pt."""
    from launch.checkpoint import Checkpointer

    (tmp_path / "epoch-00003").mkdir()
    with pytest.raises(CheckpointError, match=r"epoch-00003 cannot be read \(FileNotFoundError: it holds neither"):
        Checkpointer(tmp_path, strategy, 0, world=1).resume(None, None)


def test_distributed_strategy_without_torchrun_says_how_to_launch():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    done = subprocess.run([sys.executable, str(TRAIN), "--strategy", "ddp"], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "torchrun" in done.stderr and "--strategy none" in done.stderr


@pytest.mark.parametrize("damage", ["truncated state.pt", "no state.pt", "meta.json not JSON", "meta.json a list"])
def test_a_checkpoint_that_cannot_be_read_is_named_with_what_to_do(tmp_path, damage, capsys):
    """A damaged newest checkpoint ended the restarted job in a traceback (torch.load's or json's)."""
    job = ["--epochs", "2", "--max-steps", "2", "--threads", "1", "--checkpoint-dir", str(tmp_path)]
    launcher.main(job)
    newest = tmp_path / "epoch-00002"
    state, meta = newest / "state.pt", newest / "meta.json"
    if damage == "truncated state.pt":
        state.write_bytes(state.read_bytes()[:1000])
    elif damage == "no state.pt":
        state.unlink()
    else:
        meta.write_text('{"strat' if damage == "meta.json not JSON" else "[]")
    capsys.readouterr()
    with pytest.raises(CheckpointError, match=rf"{newest} cannot be read \(.*\); remove it to resume from the "
                                              "checkpoint before it, or start afresh in another --checkpoint-dir"):
        launcher.main([*job[:1], "3", *job[2:]])
    assert "epoch " not in capsys.readouterr().out
    shutil.rmtree(newest)
    launcher.main([*job[:1], "3", *job[2:]])
    assert [line[:9] for line in capsys.readouterr().out.splitlines()] == ["epoch   2", "epoch   3"]


@pytest.fixture(scope="module")
def fsdp2_checkpoints(tmp_path_factory) -> Path:
    """An fsdp2 job's checkpoint of epoch 1 on 2 ranks, written once for the tests that damage copies of it."""
    checkpoints = tmp_path_factory.mktemp("fsdp2-ckpt")
    _run(_command("fsdp2", "--max-steps", "2", "--checkpoint-dir", str(checkpoints), "--epochs", "1"))
    return checkpoints


@pytest.mark.parametrize("damage", ["truncated shard", "empty .metadata"])
def test_a_sharded_checkpoint_that_cannot_be_read_is_named_on_every_rank(tmp_path, fsdp2_checkpoints, damage):
    """A truncated shard ended both ranks in DCP's CheckpointException and its tracebacks; an empty .metadata was
    named, but after DCP's loader had logged, on each rank, two warnings with a traceback each."""
    tmp_path = tmp_path / "ckpt"
    shutil.copytree(fsdp2_checkpoints, tmp_path)
    job = _command("fsdp2", "--max-steps", "2", "--checkpoint-dir", str(tmp_path))
    if damage == "truncated shard":
        shard = tmp_path / "epoch-00001" / "__1_0.distcp"
        shard.write_bytes(shard.read_bytes()[:1000])
        reason = "(EOFError)"
    else:
        (tmp_path / "epoch-00001" / ".metadata").write_bytes(b"")
        reason = "(AssertionError: metadata is None; global metadata read failed: Ran out of input;"
    stderr = _fails_clearly(job, f"{tmp_path / 'epoch-00001'} cannot be read {reason}", "; remove it to resume from "
                                 "the checkpoint before it")
    assert stderr.count("cannot be read") == 2 and "CheckpointException" not in stderr
    lines = stderr.splitlines()
    ranks = "\n".join(lines[: next(i for i, line in enumerate(lines) if "torch/distributed/elastic" in line)])
    # before torchrun's report only the ranks' messages, which they may write into each other's lines
    messages = [message.strip() for message in ranks.split("train.py: error: ")]
    assert messages[0] == "" and len(messages) == 3, ranks
    assert all("cannot be read" in m and m.endswith("another --checkpoint-dir") for m in messages[1:]), ranks


def test_checkpoint_of_another_strategy_says_what_differs(tmp_path, monkeypatch):
    """The refusal is the checkpoint's (its strategy), on any number of ranks: fsdp2 refuses on one rank in this
    process (the sharded-damage tests show a refusal written cleanly by every rank under torchrun)."""
    checkpoints = tmp_path / "ckpt"
    _in_process("--epochs", "1", "--max-steps", "2", "--checkpoint-dir", str(checkpoints))
    with monkeypatch.context() as patch:
        for key, value in {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
                           "TORCH_GLOO_LAZY_INIT": "1"}.items():
            patch.setenv(key, value)
        try:
            with pytest.raises(CheckpointError) as refused:
                launcher.main(["--strategy", "fsdp2", *SMALL, "--checkpoint-dir", str(checkpoints)])
        finally:  # the refused run leaves its process group: the next one could not start one
            if dist.is_initialized():
                dist.destroy_process_group()
    error = str(refused.value)
    assert "--strategy none on 1 rank;" in error and "--strategy fsdp2 cannot resume" in error
    assert "metadata is None" not in error
    _run(_command("ddp", "--epochs", "2", "--max-steps", "2", "--checkpoint-dir", str(checkpoints)))  # ddp can: one state.pt
    sharded = tmp_path / "sharded" / "epoch-00001"
    sharded.mkdir(parents=True)
    (sharded / ".metadata").write_bytes(b"")  # a DCP checkpoint from before meta.json
    with pytest.raises(CheckpointError, match="fsdp2 or fsdp1.*--strategy none cannot resume"):
        Checkpointer(sharded.parent, "none", 0).resume(None, None)


def test_checkpoint_of_other_data_or_model_options_says_what_differs(tmp_path, text_file):
    """Another --seed splits the digits anew (the held-out set would be 78% former training samples); another
    --heads loads into equal shapes: both resumed silently."""
    checkpoints = tmp_path / "ckpt"
    launcher.main(["--epochs", "1", "--max-steps", "2", "--threads", "1", "--checkpoint-dir", str(checkpoints)])
    with pytest.raises(CheckpointError, match="written with --seed 0; this job has --seed 1"):
        launcher.main(["--epochs", "2", "--max-steps", "2", "--threads", "1", "--checkpoint-dir", str(checkpoints), "--seed", "1"])
    gpt = [*TINY_GPT, "--text", str(text_file), "--max-steps", "1", "--threads", "1", "--checkpoint-dir", str(tmp_path / "gpt")]
    launcher.main([*gpt, "--epochs", "1"])
    with pytest.raises(CheckpointError, match="written with --heads 2; this job has --heads 4"):
        launcher.main([*gpt, "--epochs", "2", "--heads", "4"])
    launcher.main([*gpt, "--epochs", "2"])  # the same options resume


def test_checkpoint_of_a_text_with_another_vocabulary_says_so(tmp_path, text_file):
    """Characters are numbered in sorted order: a text at the same path with one character swapped for another
    has a vocabulary of the same size whose ids mean other characters; it resumed silently."""
    text = tmp_path / "corpus.txt"
    original = text_file.read_text(encoding="utf-8")
    assert "Q" in original and "\u00a7" not in original
    text.write_text(original, encoding="utf-8")
    gpt = [*TINY_GPT, "--text", str(text), "--max-steps", "1", "--threads", "1", "--checkpoint-dir", str(tmp_path / "gpt")]
    launcher.main([*gpt, "--epochs", "1"])
    text.write_text(original.replace("Q", "\u00a7"), encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"written with data a vocabulary of (\d+) characters \(sha256 \w+\), a --text "
                                              r"of sha256 \w+; this job has data a vocabulary of \1 characters"):
        launcher.main([*gpt, "--epochs", "2"])


def test_checkpoint_of_a_text_edited_at_the_same_path_says_so(tmp_path, text_file):
    """A text grown or edited with the same characters splits anew, so the held-out part held text trained on;
    it resumed silently. Checkpoints written before the text's hash was recorded resume."""
    text = tmp_path / "corpus.txt"
    original = text_file.read_text(encoding="utf-8")
    text.write_text(original, encoding="utf-8")
    gpt = [*TINY_GPT, "--text", str(text), "--max-steps", "1", "--threads", "1", "--checkpoint-dir", str(tmp_path / "gpt")]
    launcher.main([*gpt, "--epochs", "1"])
    text.write_text(original + original[:4000], encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"written with a --text of sha256 (\w+); this job has a --text of sha256 "
                                              r"(?!\1)\w+: resume with the options"):
        launcher.main([*gpt, "--epochs", "2"])
    meta = tmp_path / "gpt" / "epoch-00001" / "meta.json"
    older = json.loads(meta.read_text())
    del older["job"]["text_sha256"]
    meta.write_text(json.dumps(older))
    launcher.main([*gpt, "--epochs", "2"])


def test_checkpoint_on_fake_images_is_not_resumed_on_cifar(tmp_path, monkeypatch):
    """Without CIFAR-10 files in --data-dir resnet18 trains on FakeData; files that appear there later swapped
    the data under a resumed job silently. (Its --fake-size is recorded only as part of the FakeData it made.)"""
    torchvision = pytest.importorskip("torchvision")
    resnet = ["--model", "resnet18", "--fake-size", "16", "--max-steps", "1", "--batch-size", "4", "--threads", "1",
              "--data-dir", str(tmp_path / "data"), "--checkpoint-dir", str(tmp_path / "ckpt")]
    launcher.main([*resnet, "--epochs", "1"])

    class FoundCifar:  # the files' contents as torchvision gives them
        def __init__(self, root: str, train: bool, download: bool) -> None:
            self.data = torch.zeros(16 if train else 4, 32, 32, 3, dtype=torch.uint8).numpy()
            self.targets = [0] * len(self.data)

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FoundCifar)
    with pytest.raises(CheckpointError, match=r"written with data FakeData of 16 training images \(no CIFAR-10 files\); "
                                              r"this job has data CIFAR-10"):
        launcher.main([*resnet, "--epochs", "2"])


def test_checkpoint_of_another_batch_size_says_what_it_was_trained_with(tmp_path):
    """ELRA resumes with its checkpoint's batch size (logging it) while the micro-batches changed: resumed silently."""
    import json

    checkpoints = tmp_path / "ckpt"
    run = ["--max-steps", "2", "--threads", "1", "--checkpoint-dir", str(checkpoints)]
    launcher.main([*run, "--epochs", "1"])
    with pytest.raises(CheckpointError, match="written with --batch-size 32; this job has --batch-size 16: resume"):
        launcher.main([*run, "--epochs", "2", "--batch-size", "16"])
    launcher.main([*run, "--epochs", "2"])
    meta = checkpoints / "epoch-00002" / "meta.json"
    written = json.loads(meta.read_text())
    assert written["job"]["batch_size"] == 32
    del written["job"]["batch_size"]  # as the launcher wrote it before
    meta.write_text(json.dumps(written))
    launcher.main([*run, "--epochs", "3"])


def test_a_job_resumed_for_more_epochs_cools_down_at_its_new_end(tmp_path, monkeypatch):
    """ELRA's step budget is the job's micro-batches (--epochs x 12 here), also over a resumed checkpoint's
    (a job this short may end before noise dominates: the cooldown is let start at once)."""
    monkeypatch.setattr(elra.line_control, "COOLDOWN_SIGNAL", 1.0)
    checkpoints = tmp_path / "ckpt"

    def controller(epoch):
        group = torch.load(checkpoints / f"epoch-{epoch:05d}" / "state.pt", weights_only=True)["optim"]["param_groups"][0]
        return group["elra_config"]["total_steps"], group["elra_controller"]

    launcher.main([*SMALL, "--epochs", "2", "--checkpoint-dir", str(checkpoints)])
    budget, first = controller(2)
    assert budget == 24 and first["micro_steps"] == 24 and first["cooldown_eta"] > 0.0
    launcher.main([*SMALL, "--epochs", "4", "--checkpoint-dir", str(checkpoints)])
    budget, longer = controller(4)
    assert budget == 48 and longer["micro_steps"] == 48
    assert longer["cooldown_eta"] not in (0.0, first["cooldown_eta"])  # a cooldown of its own
    launcher.main([*SMALL, "--epochs", "5", "--checkpoint-dir", str(checkpoints), "--no-cooldown"])
    assert controller(5)[0] is None


def test_a_job_resumed_on_another_number_of_ranks_budgets_the_rest_in_its_epochs(tmp_path):
    """An epoch is 44 micro-batches in one process, 22 on 2 ranks. The budget of a job resumed there was
    --epochs x 22 = 44 for 2 epochs, where the clock already stood at 44: its second epoch ran at the
    cooldown's floor (from 2 ranks to 1 the budget lay beyond the job's end: no cooldown). Now it is the
    checkpoint's clock and the rest's micro-batches on the ranks of the job."""
    checkpoints = tmp_path / "ckpt"
    common = ["--threads", "1", "--checkpoint-dir", str(checkpoints)]
    launcher.main(["--strategy", "none", "--epochs", "1", *common])
    ddp = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(TRAIN)]
    _run([*ddp, "--strategy", "ddp", "--epochs", "2", *common])
    group = torch.load(checkpoints / "epoch-00002" / "state.pt", weights_only=True)["optim"]["param_groups"][0]
    assert group["elra_config"]["total_steps"] == 44 + 22 == group["elra_controller"]["micro_steps"]


def test_checkpoint_of_another_max_steps_says_what_it_was_trained_with(tmp_path):
    """--max-steps picks an epoch's micro-batches (its first N): a job resumed with another one, or none, trained
    another schedule than the one it was started as, silently."""
    checkpoints = tmp_path / "ckpt"
    run = ["--threads", "1", "--checkpoint-dir", str(checkpoints)]
    launcher.main([*run, "--epochs", "1", "--max-steps", "2"])
    with pytest.raises(CheckpointError, match="written with --max-steps 2; this job has --max-steps 0: resume"):
        launcher.main([*run, "--epochs", "2"])
    launcher.main([*run, "--epochs", "2", "--max-steps", "2"])
    assert json.loads((checkpoints / "epoch-00002" / "meta.json").read_text())["job"]["max_steps"] == 2


def test_a_checkpoint_written_on_a_gpu_resumes_on_the_cpu(tmp_path, monkeypatch):
    """state.pt holds its tensors' devices: one written by --device cuda, resumed with --device cpu on a machine
    without CUDA, was called unreadable ("remove it"), and on a machine with GPUs every rank loaded it onto cuda:0.
    Written here as a GPU's, its tensors tagged cuda:0; the resumed run ends with the uninterrupted one's weights."""
    run = ["--max-steps", "3", "--threads", "1", "--batch-multiplier", "2"]
    launcher.main([*run, "--epochs", "2", "--save-final", str(tmp_path / "reference.pt")])
    checkpoints = tmp_path / "ckpt"
    launcher.main([*run, "--epochs", "1", "--checkpoint-dir", str(checkpoints)])
    state_file = checkpoints / "epoch-00001" / "state.pt"
    state = torch.load(state_file, weights_only=True)
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
    torch.save(state, state_file)
    monkeypatch.undo()
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(state_file, weights_only=True)
    launcher.main([*run, "--epochs", "2", "--checkpoint-dir", str(checkpoints), "--save-final", str(tmp_path / "final.pt")])
    expected, got = (torch.load(tmp_path / name, weights_only=True) for name in ("reference.pt", "final.pt"))
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.parametrize("strategy", ["none", "fsdp2"])
def test_checkpoint_of_another_preconditioner_says_what_it_was_trained_with(tmp_path, monkeypatch, strategy):
    """ELRA resumes with its checkpoint's preconditioner: under none it ignored --preconditioner muon with a warning,
    under fsdp2 DCP loaded into muon's state and called the checkpoint unreadable, advising its removal."""
    job = ["--max-steps", "2", "--threads", "1", "--strategy", strategy, "--checkpoint-dir", str(tmp_path / "ckpt")]
    if strategy != "none":
        for key, value in {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "TORCH_GLOO_LAZY_INIT": "1"}.items():
            monkeypatch.setenv(key, value)

    def run(*options: str) -> None:
        monkeypatch.setenv("MASTER_PORT", str(_free_port()))
        try:
            launcher.main([*job, *options])
        finally:  # a failed run leaves its process group: the next one could not start one
            if dist.is_initialized():
                dist.destroy_process_group()

    run("--epochs", "1", "--preconditioner", "adam")
    with pytest.raises(CheckpointError, match="written with --preconditioner adam; this job has --preconditioner muon: resume"):
        run("--epochs", "2")  # auto: muon
    run("--epochs", "2", "--preconditioner", "adam")


@pytest.mark.parametrize("edit", ["a layer more", "a layer wider", "a layer fewer"])
def test_a_sharded_checkpoint_of_another_model_says_it_does_not_fit(tmp_path, monkeypatch, edit):
    """DCP's load into an edited model (a parameter the checkpoint lacks, or another shape) was called unreadable,
    advising the removal of a checkpoint that a job with the model it was written with resumes; one into a model
    without some of its parameters resumed silently (state.pt's load refuses it: "Unexpected key")."""
    job = ["--max-steps", "2", "--threads", "1", "--strategy", "fsdp2", "--checkpoint-dir", str(tmp_path / "ckpt")]
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "TORCH_GLOO_LAZY_INIT": "1"}.items():
        monkeypatch.setenv(key, value)

    def run(epochs: int) -> None:
        monkeypatch.setenv("MASTER_PORT", str(_free_port()))
        try:
            launcher.main([*job, "--epochs", str(epochs)])
        finally:  # a failed run leaves its process group: the next one could not start one
            if dist.is_initialized():
                dist.destroy_process_group()

    run(1)
    with monkeypatch.context() as patch:
        def edited(args, classes: int) -> torch.nn.Module:
            torch.manual_seed(0)
            if edit == "a layer more":
                return torch.nn.Sequential(*launcher.digits_mlp(classes), torch.nn.Linear(classes, classes))
            if edit == "a layer fewer":  # its 128 outputs taken for classes: it trains
                return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 128))
            return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, classes))

        patch.setattr(launcher, "build_model", edited)
        with pytest.raises(CheckpointError, match=r"epoch-00001 does not fit this model: .*; resume with the model it was "
                                                  "written with, or start afresh in another --checkpoint-dir"):
            run(2)
    run(2)


def _blocks_reordered(monkeypatch) -> None:
    """gpt with each block's attn_norm and mlp_norm registered in each other's place: an edit of the model's code that
    keeps every name and shape but lists same-shaped parameters in another order (its state_dict loads by name)."""
    build = launcher.build_model

    def reordered(args, classes):
        model = build(args, classes)
        for block in model.blocks:
            block._modules = {k: block._modules[k] for k in ("mlp_norm", "qkv", "proj", "attn_norm", "mlp")}
        return model

    monkeypatch.setattr(launcher, "build_model", reordered)


def test_checkpoint_of_reordered_parameters_is_refused_and_one_without_names_resumes(tmp_path, text_file, monkeypatch, capsys):
    """The optimizer's state is mapped by position: each block's attn_norm and mlp_norm took each other's, silently.
    A checkpoint of the launcher from before it named the parameters resumes as it did, by position."""
    gpt = [*TINY_GPT, "--text", str(text_file), "--max-steps", "2", "--threads", "1"]
    checkpoints, unnamed = tmp_path / "ckpt", tmp_path / "unnamed"
    launcher.main([*gpt, "--epochs", "1", "--checkpoint-dir", str(checkpoints)])
    shutil.copytree(checkpoints, unnamed)
    with monkeypatch.context() as patch:
        _blocks_reordered(patch)
        with pytest.raises(CheckpointError, match="epoch-00001 does not fit this model: parameter 2 of group 0 is "
                                                  "'blocks.0.mlp_norm.weight' here but 'blocks.0.attn_norm.weight'"):
            launcher.main([*gpt, "--epochs", "2", "--checkpoint-dir", str(checkpoints)])
    capsys.readouterr()
    launcher.main([*gpt, "--epochs", "2", "--checkpoint-dir", str(checkpoints)])
    named = _epoch_lines(capsys.readouterr().out)
    state = torch.load(unnamed / "epoch-00001" / "state.pt", weights_only=True)
    del state["optim"]["param_groups"][0]["param_names"]  # as the launcher wrote it before
    torch.save(state, unnamed / "epoch-00001" / "state.pt")
    launcher.main([*gpt, "--epochs", "2", "--checkpoint-dir", str(unnamed)])
    assert _epoch_lines(capsys.readouterr().out) == named and len(named) == 1
    build = launcher.build_model

    def renamed(args, classes):  # the model's own load refuses it: said in one line as well (it was a traceback)
        model = build(args, classes)
        model.blocks[0]._modules = {("norm1" if k == "attn_norm" else k): m for k, m in model.blocks[0]._modules.items()}
        return model

    monkeypatch.setattr(launcher, "build_model", renamed)
    with pytest.raises(CheckpointError, match=r"epoch-00002 does not fit this model: Error\(s\) in loading state_dict "
                                              r"for CharGPT: Missing key\(s\) in state_dict: \"blocks.0.norm1.weight\""):
        launcher.main([*gpt, "--epochs", "2", "--checkpoint-dir", str(unnamed)])


@pytest.mark.filterwarnings("ignore:.*NO_SHARD")  # FSDP1 on one rank
@pytest.mark.parametrize("strategy", ["fsdp2", "fsdp1"])
def test_sharded_checkpoints_record_names_and_resume_by_name_with_or_without_them(tmp_path, text_file, monkeypatch, capsys, strategy):
    """DCP matches the state by name. With param_names in the load, a checkpoint written without them failed
    ("Missing key"), and FSDP1's load compared the saved order's names with a reordered model's and refused it."""
    import torch.distributed.checkpoint as dcp

    gpt = [*TINY_GPT, "--text", str(text_file), "--max-steps", "2", "--threads", "1", "--strategy", strategy]
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "TORCH_GLOO_LAZY_INIT": "1"}.items():
        monkeypatch.setenv(key, value)

    def run(epochs: int, checkpoints: Path) -> list[str]:
        monkeypatch.setenv("MASTER_PORT", str(_free_port()))
        try:
            launcher.main([*gpt, "--epochs", str(epochs), "--checkpoint-dir", str(checkpoints)])
        finally:  # a failed run leaves its process group: the next test could not start one
            if dist.is_initialized():
                dist.destroy_process_group()
        return _epoch_lines(capsys.readouterr().out)

    checkpoints, same_order = tmp_path / "ckpt", tmp_path / "same-order"
    with monkeypatch.context() as patch:  # the launcher before: parameters()
        patch.setattr(launcher, "ElraOptimizer", lambda params, model, *a, **k: ElraOptimizer(model.parameters(), model, *a, **k))
        run(1, checkpoints)
    run(2, checkpoints)
    written = dcp.FileSystemReader(checkpoints / "epoch-00002").read_metadata().state_dict_metadata
    assert "optim.param_groups.0.param_names" in written
    shutil.copytree(checkpoints, same_order)
    expected = run(3, same_order)
    _blocks_reordered(monkeypatch)
    assert run(3, checkpoints) == expected and len(expected) == 1


# ------------------------------------------------------------------- exit


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _resume_on_rank(rank: int, world: int, init_file: str, directories: list[str], errors) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        Checkpointer(Path(directories[rank]), "ddp", rank, world=world).resume(None, None)
        errors.put((rank, ""))
    except CheckpointError as error:
        errors.put((rank, str(error)))
    finally:
        dist.destroy_process_group()


def test_ranks_that_see_other_checkpoints_are_refused_on_every_rank(tmp_path):
    """A --checkpoint-dir on disks the nodes do not share: rank 0 resumed from epoch 2 while another rank
    started from the stale epoch 1 its disk held, or one without the directory ended in a traceback."""
    import torch.multiprocessing as mp

    directories = [tmp_path / "node0", tmp_path / "node1", tmp_path / "node2"]
    for directory, epoch in zip(directories[:2], (2, 1)):
        (directory / f"epoch-{epoch:05d}").mkdir(parents=True)
    context = mp.get_context("spawn")
    errors = context.Queue()
    ranks = [context.Process(target=_resume_on_rank, args=(r, 3, str(tmp_path / "init"), [str(d) for d in directories], errors))
             for r in range(3)]
    for process in ranks:
        process.start()
    reported = dict(errors.get(timeout=60) for _ in ranks)
    for process in ranks:
        process.join(timeout=60)
    assert sorted(reported) == [0, 1, 2]
    for rank in range(3):
        assert reported[rank] == (
            f"--checkpoint-dir {directories[rank]} holds other checkpoints on other ranks (the newest, rank 0: epoch 2, "
            "rank 1: epoch 1, rank 2: no directory): it must be one directory every rank reads, on a filesystem all "
            "nodes share"
        )


@pytest.mark.filterwarnings("ignore:`torch.distributed.reduce_op` is deprecated")  # met while scanning gc's objects
def test_ddp_wrapper_is_freed_before_the_process_group(tmp_path, monkeypatch):
    """Freeing DDP's reducer after destroy_process_group deadlocks gloo at exit (torch 2.13): never do it."""
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
                       "TORCH_GLOO_LAZY_INIT": "1"}.items():
        monkeypatch.setenv(key, value)
    alive_at_destroy = []
    destroy = dist.destroy_process_group

    def watched_destroy(*args, **kwargs):
        alive_at_destroy.extend(o for o in gc.get_objects() if isinstance(o, torch.nn.parallel.DistributedDataParallel))
        return destroy(*args, **kwargs)

    monkeypatch.setattr(dist, "destroy_process_group", watched_destroy)
    launcher.main(["--strategy", "ddp", "--epochs", "1", "--max-steps", "2", "--threads", "1"])
    assert not dist.is_initialized() and alive_at_destroy == []


def test_evaluation_runs_in_eval_mode_and_leaves_batch_norm_statistics_alone():
    """resnet18's held-out accuracy came from BatchNorm in training mode: normalised by each held-out batch,
    whose images went into the running statistics the trained (and saved) model uses."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    x, y = torch.randn(16, 4) * 5 + 3, torch.randint(3, (16,))
    running = model[1].running_mean.clone()
    with torch.no_grad():
        expected = launcher._loss(model.eval()(x), y).item()
    model.train()
    loss, _ = launcher.evaluate(model, [(x, y)], torch.device("cpu"), distributed=False)
    assert loss == pytest.approx(expected, rel=1e-6) and torch.equal(model[1].running_mean, running) and model.training


def test_resnet18_prints_the_same_lines_under_ddp_and_fsdp2(tmp_path):
    """Evaluated in eval mode, BatchNorm uses its running statistics, which DDP broadcasts from rank 0 and FSDP
    leaves per rank: the held-out loss differed (2.3206 under DDP, 2.3264 under FSDP2)."""
    pytest.importorskip("torchvision")
    resnet = ["--model", "resnet18", "--fake-size", "32", "--batch-size", "4", "--max-steps", "2", "--epochs", "2",
              "--data-dir", str(tmp_path / "no-cifar-here")]
    ddp, fsdp2 = (_epoch_lines(_run(_command(strategy, *resnet)).stdout) for strategy in ("ddp", "fsdp2"))
    assert len(ddp) == 2 and ddp == fsdp2


def test_every_rank_evaluates_the_same_number_of_batches_and_every_held_out_sample_once():
    """Held-out samples split over ranks: unequal batch counts left FSDP ranks waiting in a gather (513 images
    over 2 ranks, batch 256: 2 batches on one rank, 1 on the other). Then the remainder beyond a multiple of the
    ranks was left out (the held-out numbers of a text of 249 windows differed between 1 and 2 ranks); now the
    shares are padded with ignored targets. The same for text windows."""
    from launch.data import IGNORED, TensorSet, TextWindows

    images = TensorSet(torch.arange(513.0).unsqueeze(1), torch.arange(513), lambda x: x)
    windows = TextWindows(torch.arange(8 * 49 + 1), 8)  # 49 windows of 8, each starting at its own id
    for data, count in ((images, 513), (windows, 49)):
        for world in (1, 2, 3, 4):
            shares = [list(data.loader(None, rank, world, 16)) for rank in range(world)]
            assert all([len(y) for _, y in share] == [len(y) for _, y in shares[0]] for share in shares)
            samples = [(x, y) for share in shares for xs, ys in share for x, y in zip(xs, ys)]
            kept = [int(x.flatten()[0]) for x, y in samples if (y != IGNORED).all()]
            assert all((y == IGNORED).all() or (y != IGNORED).all() for _, y in samples)
            assert len(kept) == len(set(kept)) == count  # every sample once


def test_the_held_out_numbers_do_not_depend_on_the_number_of_ranks(monkeypatch):
    """The padding counts for nothing: each rank's sums (as the all-reduce adds them) over shares of 49
    windows give the one-process loss and accuracy on 2 and 3 ranks."""
    from launch.data import TextWindows

    windows = TextWindows(torch.arange(8 * 49 + 1) % 7, 8)
    torch.manual_seed(0)
    model = launcher.CharGPT(vocab=7, context=8, width=16, heads=2, layers=1)
    cpu = torch.device("cpu")
    one = launcher._evaluate(model, windows.loader(None, 0, 1, 16), cpu, distributed=False)
    for world in (2, 3):
        sums = []
        monkeypatch.setattr(launcher, "reduce_sum", lambda values, distributed: sums.append(values) or values)
        for rank in range(world):
            launcher._evaluate(model, windows.loader(None, rank, world, 16), cpu, distributed=True)
        loss_sum, correct, count = torch.stack(sums).sum(0).tolist()
        assert count == 49 * 8 and loss_sum / count == pytest.approx(one[0], rel=1e-6)  # float32, other batches
        assert correct / count == pytest.approx(one[1], rel=1e-12)


@pytest.mark.parametrize("world", [1, 2])
def test_a_text_jobs_step_budget_is_the_micro_batches_its_epochs_take_also_resumed(world):
    """A text epoch's random offset can cost its last window, and with it a micro-batch where the windows at
    offset 0 fill whole ones: the budget assumed every epoch as long as at offset 0 (6 epochs: 180 where 174
    ran), and a job resumed after 3 epochs counted the micro-batches taken plus 3 such epochs (177), so it
    cooled down elsewhere than the uninterrupted job. Counted epoch by epoch, both are the micro-batches run."""
    from launch.data import TextWindows

    windows = TextWindows(torch.arange(961) % 50, context=8)  # 120 windows at offset 0, 119 at the others
    args = launcher.parse_args(["--model", "gpt", "--batch-size", "4", "--epochs", "10"])
    taken = [len(list(windows.loader(epoch, 0, world, 4))) for epoch in range(10)]
    assert min(taken) < max(taken)  # epoch 8's offset is 0
    assert launcher.step_budget(args, windows, world) == sum(taken)
    assert launcher.step_budget(args, windows, world, 5, sum(taken[:5])) == sum(taken)
