"""Training never goes silently wrong and never loses what it wrote: the loss log survives a kill while it is
trimmed, a damaged checkpoint is named and skipped, settings that cannot work are refused, a non-finite loss
stops the run, and bad data is reported by file, line and reason before the model loads.

All runs use the built-in tiny model, batches of 4 and one thread.
"""

from __future__ import annotations

import builtins
import io
import json
import pathlib
import shutil

import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from ism_ext.cli.train import main  # noqa: E402
from ism_ext.training import (  # noqa: E402
    TrainConfig,
    TrainError,
    loop,  # noqa: E402
    train,
)
from ism_ext.training.checkpoint import find_checkpoints  # noqa: E402
from ism_ext.training.loss_log import LOSS_FILE, append_record, open_loss_log, read_loss_log  # noqa: E402

SETTINGS = dict(batch_size=4, save_every=2, progress=False, log_every=1000)



def _log(out: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (out / LOSS_FILE).read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 4-step run with checkpoints at 2 and 4, and the same run straight to 6 steps (the reference)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("runs")
    with torch.random.fork_rng(devices=[]):
        train(TrainConfig(steps=4, out=str(base / "four"), **SETTINGS))
        train(TrainConfig(steps=6, out=str(base / "six"), **SETTINGS))
    torch.set_num_threads(n)
    return base / "four", _log(base / "six")


def _copy(src: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------------------- the loss log


class _Killed(BaseException):
    """What a kill looks like to the code it interrupts (here: half-way through writing a file)."""


def _kill_while_writing(monkeypatch, name: str) -> None:
    """Any write-mode open of a file whose name contains ``name`` writes half of its first write, then dies."""
    real_open = io.open

    class HalfWriter:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise _Killed

        def __getattr__(self, attr):
            return getattr(self.f, attr)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def dying_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return HalfWriter(f) if name in str(file) and "w" in mode else f

    monkeypatch.setattr(io, "open", dying_open)
    monkeypatch.setattr(builtins, "open", dying_open)


def test_a_kill_while_the_log_is_trimmed_loses_no_line(runs, tmp_path, monkeypatch, one_thread):
    four, straight = runs
    out = _copy(four, tmp_path)
    shutil.rmtree(out / "step-4")  # resume from step 2: the log's lines 3 and 4 are trimmed (they are redone)
    before = (out / LOSS_FILE).read_bytes()
    with monkeypatch.context() as m:
        _kill_while_writing(m, LOSS_FILE)
        with pytest.raises(_Killed):
            train(TrainConfig(steps=6, out=str(out), resume=True, **SETTINGS))
    assert (out / LOSS_FILE).read_bytes() == before  # all four lines, untouched
    train(TrainConfig(steps=6, out=str(out), resume=True, **SETTINGS))
    assert _log(out) == straight  # steps 1-6, bit-for-bit those of the uninterrupted run


def test_open_loss_log_drops_later_steps_and_a_cut_line(tmp_path):
    path = tmp_path / LOSS_FILE
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3)]
    path.write_text("\n".join(lines) + "\n" + '{"step": 4, "lo')  # killed while step 4 was being appended
    with open_loss_log(path, 3) as log:
        append_record(log, {"step": 4, "loss": 0.25})
    assert [r["step"] for r in read_loss_log(path, 10)] == [1, 2, 3, 4]
    path.write_text("\n".join(lines))  # the last line complete but without its newline
    with open_loss_log(path, 2) as log:
        append_record(log, {"step": 3, "loss": 0.5})
    assert path.read_text() == "\n".join([*lines[:2], json.dumps({"step": 3, "loss": 0.5})]) + "\n"


# ------------------------------------------------------------------------------------------- checkpoints


def _flip_a_weight_byte(ckpt: pathlib.Path) -> None:
    file = ckpt / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[-100] ^= 0x10  # inside the last tensor's data: the file still loads, with one changed weight
    file.write_bytes(bytes(data))
    load_file(file)


@pytest.mark.parametrize("damage", ["flipped byte", "truncated file"])
def test_a_damaged_newest_checkpoint_is_named_and_the_newest_good_one_resumes(runs, tmp_path, capsys, damage,
                                                                           one_thread):
    four, straight = runs
    out = _copy(four, tmp_path)
    if damage == "flipped byte":
        _flip_a_weight_byte(out / "step-4")
    else:
        weights = out / "step-4" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    result = train(TrainConfig(steps=6, out=str(out), resume=True, **SETTINGS))
    err = capsys.readouterr().err
    assert "step-4" in err and "model.safetensors" in err and "damaged" in err
    assert _log(out) == straight  # resumed from step 2: steps 3 and 4 redone, then 5 and 6
    assert result["losses"] == [r["loss"] for r in straight]
    assert [s for s, _ in find_checkpoints(out)] == [2, 4, 6]
    train(TrainConfig(steps=6, out=str(out), resume=True, **SETTINGS))  # step 4 was rewritten: intact again
    assert "damaged" not in capsys.readouterr().err


def test_resume_from_exactly_a_damaged_checkpoint_stops_with_its_name(runs, tmp_path, capsys, one_thread):
    four, _ = runs
    out = _copy(four, tmp_path)
    _flip_a_weight_byte(out / "step-4")
    with pytest.raises(TrainError, match=r"--resume-from 4: the checkpoint is damaged: .*step-4.*model.safetensors"):
        train(TrainConfig(steps=6, out=str(out), resume=True, resume_step=4, **SETTINGS))
    with pytest.raises(SystemExit):
        main(["--steps", "6", "--out", str(out), "--resume-from", "4", "--batch-size", "4", "--save-every", "2",
              "--no-progress"])
    assert "step-4" in capsys.readouterr().err
    assert len(_log(out)) == 4  # nothing was written


# ------------------------------------------------------------------------------------------- what cannot work


@pytest.mark.parametrize("argv, message", [
    (["--dtype", "float16"], "float16 cannot train with plain AdamW"),
    (["--max-grad-norm", "nan"], "max_grad_norm must be a finite number"),
    (["--max-grad-norm", "-1"], "max_grad_norm must be > 0"),
    (["--lr", "inf"], "lr must be a finite number"),
    (["--lora-dropout", "1.5"], "lora_dropout must be in"),
])
def test_settings_that_cannot_work_are_refused_before_anything_runs(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(loop, "load_chat_jsonl", lambda path: pytest.fail("the data was read"))
    with pytest.raises(SystemExit):
        main(["--steps", "1", *argv])
    assert message in capsys.readouterr().err


def test_a_non_finite_loss_stops_the_run_before_its_step(tmp_path, monkeypatch, one_thread):
    real_step_loss = loop.step_loss
    calls = []

    def nan_at_step_3(*args):
        calls.append(1)
        loss = real_step_loss(*args)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(loop, "step_loss", nan_at_step_3)
    out = tmp_path / "run"
    with pytest.raises(TrainError, match=r"step 3: the loss is nan; stopped before the optimizer step .*step-2"):
        train(TrainConfig(steps=4, out=str(out), **SETTINGS))
    assert [s for s, _ in find_checkpoints(out)] == [2]
    assert [r["step"] for r in _log(out)] == [1, 2]
    assert all(torch.isfinite(t).all() for t in load_file(out / "step-2" / "model.safetensors").values())


def test_a_checkpoint_with_non_finite_weights_is_never_written(tmp_path, monkeypatch, one_thread):
    real_save = loop.save_checkpoint

    def poisoned(out, step, model, *args):
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] = float("inf")
        return real_save(out, step, model, *args)

    monkeypatch.setattr(loop, "save_checkpoint", poisoned)
    out = tmp_path / "run"
    with pytest.raises(TrainError, match="step 2: the weights hold NaN or inf .*no checkpoint was written"):
        train(TrainConfig(steps=2, out=str(out), **SETTINGS))
    assert sorted(p.name for p in out.iterdir()) == [LOSS_FILE]


# ------------------------------------------------------------------------------------------- data


GOOD = json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]})


@pytest.mark.parametrize("content, message", [
    (f"{GOOD}\n{GOOD}\n".encode() + b'{"messages": "\xff"}\n', r"line 3: not UTF-8 text \(byte 0xff"),
    (f"{GOOD}\n\ufeff{GOOD}\n".encode(), "line 2: holds a byte order mark"),
    (f"{GOOD}\n{{\"messages\": {'[' * 100_000}{']' * 100_000}}}\n".encode(), "line 2: JSON nested too deeply"),
    (f"{GOOD}\n{{\n{GOOD}\n[]\n".encode(), r"2 problems:\n.*line 2: invalid JSON.*\n.*line 4: expected an object"),
])
def test_bad_data_is_named_by_file_line_and_reason(tmp_path, content, message):
    data = tmp_path / "chats.jsonl"
    data.write_bytes(content)
    with pytest.raises(TrainError, match=message) as info:
        train(TrainConfig(data=str(data), steps=1, progress=False))
    assert str(data) in str(info.value)


def test_a_byte_order_mark_at_the_start_is_ignored(tmp_path, one_thread):
    data = tmp_path / "chats.jsonl"
    data.write_bytes(f"\ufeff{GOOD}\n{GOOD}\n".encode())
    assert len(train(TrainConfig(data=str(data), steps=1, batch_size=2, progress=False))["losses"]) == 1


def test_every_too_long_dialogue_is_named_before_the_model_loads(tmp_path, monkeypatch):
    long_round = json.dumps({"messages": [{"role": "user", "content": "word " * 300},
                                          {"role": "assistant", "content": "Yes."}]})
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join([GOOD, long_round, GOOD, GOOD, long_round]) + "\n")
    monkeypatch.setattr(loop, "load_model", lambda *a: pytest.fail("the model was loaded"))
    with pytest.raises(TrainError, match=r"2 problems:\n.*line 2: the first round .*\n.*line 5: the first round"):
        train(TrainConfig(data=str(data), max_length=64, steps=1, progress=False))


def test_a_kill_while_teacher_answers_are_written_never_leaves_them_vouched_for(tmp_path, monkeypatch):
    from ism_ext.training.teacher import cached_teacher_file

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"user": ["Hi"]}\n')
    rows = [{"id": i, "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x" * 50}]}
            for i in range(20)]
    args = (tmp_path / "out", prompts, "train", "tiny", 8)
    data = cached_teacher_file(*args, lambda: rows)
    data.unlink()  # the answers are gone but their key is still there: they are made again ...
    with monkeypatch.context() as m:
        _kill_while_writing(m, "teacher_train")
        with pytest.raises(_Killed):  # ... and the process is killed while writing them
            cached_teacher_file(*args, lambda: rows)
    made = []
    data = cached_teacher_file(*args, lambda: made.append(1) or rows)
    assert made == [1]  # nothing half-written was taken for the cached answers
    assert [json.loads(line) for line in data.read_text().splitlines()] == rows
