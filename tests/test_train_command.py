"""`python -m ism_ext train`: the loss falls, checkpoints resume bit-for-bit, DDP/FSDP ranks stay in sync,
and bad input gets a clear error.

Everything runs on the CPU with the built-in tiny Llama and the shipped toy dataset, one thread per process
(two processes under torchrun), so the whole file takes well under a minute and a half on two cores.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from ism_ext.cli.train import main  # noqa: E402
from ism_ext.training import DEFAULT_DATA, TrainConfig, TrainError, train  # noqa: E402
from ism_ext.training.checkpoint import STATE_FILE, find_checkpoints  # noqa: E402
from ism_ext.training.datasets import make_toy_chat  # noqa: E402
from ism_ext.training.loss_log import LOSS_FILE  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
QUIET = ["--no-progress", "--log-every", "1000"]


def _env() -> dict[str, str]:
    # One thread per process: two torchrun ranks on a two-core machine must not oversubscribe it.
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc


def _log(out: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (out / LOSS_FILE).read_text().splitlines()]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)



def test_shipped_dataset_is_the_generator_output():
    assert DEFAULT_DATA.read_text(encoding="utf-8") == make_toy_chat.to_jsonl(make_toy_chat.make_dialogues())


def test_cli_lowers_the_loss_and_writes_checkpoints(tmp_path, one_thread):
    out = tmp_path / "run"
    proc = _run([sys.executable, "-m", "ism_ext", "train", "--steps", "30", "--save-every", "15", "--out", str(out),
                 "--no-progress", "--log-every", "10"])
    assert "step 30/30" in proc.stdout and "done: step 30" in proc.stdout

    log = _log(out)
    assert [r["step"] for r in log] == list(range(1, 31))
    losses = [r["loss"] for r in log]
    assert all(torch.isfinite(torch.tensor(losses)))
    first, last = _mean(losses[:5]), _mean(losses[-5:])
    assert last < 0.7 * first, (first, last, losses)

    assert [s for s, _ in find_checkpoints(out)] == [15, 30]
    ckpt = out / "step-30"
    for name in ("config.json", "model.safetensors", "tokenizer.json", STATE_FILE):
        assert (ckpt / name).is_file(), name
    state = torch.load(ckpt / STATE_FILE, weights_only=True)
    assert state["step"] == 30 and state["world_size"] == 1
    assert state["data_position"] == {"epoch": 1, "batch": 5}  # 25 batches of 8 per epoch
    assert {"optimizer", "scheduler", "rng"} <= state.keys()

    # A checkpoint is a Hugging Face directory: it loads as a model with the ism attention and its tokenizer.
    import transformers

    import ism_ext.integrations.hf  # noqa: F401

    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, attn_implementation="ism")
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    assert model.config.vocab_size == len(tok)
    assert tok.chat_template is not None
    # ... and `--model DIR` fine-tunes it further: it starts where the first run ended, not from scratch.
    more = train(TrainConfig(model=str(ckpt), steps=2, progress=False))
    assert more["final_step"] == 2 and more["losses"][0] < 0.6 * first


def test_resume_gives_the_same_loss_curve_as_an_uninterrupted_run(tmp_path, one_thread):
    # Batches of 16: 13 steps per epoch, so the resumed part crosses an epoch boundary (new shuffle).
    common = ["--batch-size", "16", "--save-every", "4", *QUIET]
    a, b = tmp_path / "interrupted", tmp_path / "straight"
    main(["--steps", "10", "--out", str(a), *common])
    assert [s for s, _ in find_checkpoints(a)] == [4, 8, 10]
    # A crash after step 10 was logged but before its checkpoint was complete: resume from step 8 and redo 9, 10.
    shutil.rmtree(a / "step-10")
    assert len(_log(a)) == 10
    main(["--steps", "20", "--out", str(a), "--resume", *common])
    result = train(TrainConfig(steps=20, out=str(b), batch_size=16, save_every=4, progress=False, log_every=1000))

    resumed, straight = _log(a), _log(b)
    assert [r["step"] for r in resumed] == list(range(1, 21))
    assert resumed == straight  # loss, lr, grad norm and token counts: bit-for-bit
    assert result["final_step"] == 20 and result["losses"] == [r["loss"] for r in straight]
    assert [r["epoch"] for r in resumed] == [0] * 13 + [1] * 7

    # Resuming a finished run is a no-op that still returns the whole history.
    again = train(TrainConfig(steps=20, out=str(a), batch_size=16, save_every=4, resume=True, progress=False))
    assert again["final_step"] == 20 and again["losses"] == result["losses"]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    args = ["--nproc-per-node", "2", "--standalone", "-m", "ism_ext", "train", "--steps", "20", "--batch-size", "4",
            "--out", str(out), "--debug-sync", *QUIET]
    proc = _run([sys.executable, "-m", "torch.distributed.run", *args])
    return out, proc


def test_ddp_ranks_stay_in_sync_and_the_loss_falls(ddp_run):
    out, proc = ddp_run
    assert "dist ddp on cpu" in proc.stdout and "x 2 rank(s)" in proc.stdout
    assert proc.stdout.count("done: step 20") == 1  # only rank 0 logs

    digests = [(out / f"params_rank{r}.txt").read_text() for r in range(2)]
    assert digests[0] == digests[1] and "sha256" in digests[0]

    log = _log(out)
    assert [r["step"] for r in log] == list(range(1, 21))
    losses = [r["loss"] for r in log]
    assert _mean(losses[-5:]) < 0.8 * _mean(losses[:5]), losses
    assert log[0]["trained_tokens"] > 0  # summed over both ranks' halves of the global batch
    state = torch.load(out / "step-20" / STATE_FILE, weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert [s for s, _ in find_checkpoints(out)] == [20]


def test_fsdp_trains_like_ddp(ddp_run, tmp_path):
    ddp_out, _ = ddp_run
    out = tmp_path / "fsdp"
    args = ["--nproc-per-node", "2", "--standalone", "-m", "ism_ext", "train", "--steps", "20", "--batch-size", "4",
            "--out", str(out), "--dist", "fsdp", "--debug-sync", *QUIET]
    proc = _run([sys.executable, "-m", "torch.distributed.run", *args])
    assert "dist fsdp on cpu" in proc.stdout
    assert (out / "params_rank0.txt").read_text() == (out / "params_rank1.txt").read_text()
    # Same data, same global batches: the same losses up to the order of floating-point reductions.
    fsdp_losses = [r["loss"] for r in _log(out)]
    ddp_losses = [r["loss"] for r in _log(ddp_out)]
    assert fsdp_losses == pytest.approx(ddp_losses, abs=1e-5)
    # The checkpoint holds full (unsharded) weights, the same files as a single-process run writes.
    state = torch.load(out / "step-20" / STATE_FILE, weights_only=True)
    assert set(state["optimizer"]["state"]) == set(state["trainable_names"])


# ------------------------------------------------------------------------------------------- bad input


def _cli_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_missing_data_file(tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    err = _cli_error(capsys, ["--data", str(missing), "--steps", "1"])
    assert "data file not found" in err and str(missing) in err
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        train(TrainConfig(data=str(missing)))


GOOD = json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]})


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"messages": [{"role": "user", "content": "Hi"}', "invalid JSON"),
        ('{"text": "no messages"}', '"messages" list'),
        ('{"messages": [{"role": "robot", "content": "Hi"}, {"role": "assistant", "content": "x"}]}', "robot"),
        ('{"messages": [{"role": "user", "content": "Hi"}]}', "no assistant message"),
        ('{"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "Hi"}]}', "starts with"),
        ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}', '"content"'),
    ],
)
def test_malformed_jsonl_line_is_named(tmp_path, capsys, bad_line, message):
    data = tmp_path / "chats.jsonl"
    data.write_text(f"{GOOD}\n\n{GOOD}\n{bad_line}\n{GOOD}\n")  # blank line 2 still counts: the bad one is line 4
    with pytest.raises(TrainError, match=f"line 4: .*{message}"):
        train(TrainConfig(data=str(data)))
    err = _cli_error(capsys, ["--data", str(data)])
    assert "chats.jsonl, line 4" in err


def test_empty_data_file(tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text("\n\n")
    with pytest.raises(TrainError, match="no dialogues"):
        train(TrainConfig(data=str(data)))


def test_unknown_scheme(capsys):
    err = _cli_error(capsys, ["--scheme", "bidirectional", "--steps", "1"])
    assert "invalid choice: 'bidirectional'" in err and "ism" in err
    with pytest.raises(TrainError, match="unknown scheme 'bidirectional'.*'ism'"):
        train(TrainConfig(scheme="bidirectional"))


def test_a_dialogue_the_collator_rejects_is_named_by_line(tmp_path, one_thread):
    # 6 tokens cannot hold the first round of any toy dialogue: the data layer refuses to cut inside a round.
    with pytest.raises(TrainError, match=r"toy_chat.jsonl, line \d+: the first round .* max_length=6"):
        train(TrainConfig(steps=1, max_length=6, progress=False))


def test_lora_without_peft_is_a_clear_error(monkeypatch, one_thread):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` fails, whether or not it is installed
    with pytest.raises(TrainError, match="--lora needs the `peft` package"):
        train(TrainConfig(steps=1, lora=True, progress=False))


def test_checkpoint_directory_rules(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainError, match="no checkpoint"):
        train(TrainConfig(out=str(out), resume=True))
    with pytest.raises(TrainError, match="needs --out"):
        train(TrainConfig(resume=True))
    (out / "step-3").mkdir(parents=True)
    (out / "step-3" / STATE_FILE).write_bytes(b"")
    with pytest.raises(TrainError, match="already holds checkpoints .*step-3.*--resume"):
        train(TrainConfig(out=str(out)))


def test_resume_refuses_changed_settings(tmp_path, one_thread):
    out = tmp_path / "run"
    train(TrainConfig(steps=2, batch_size=4, out=str(out), progress=False))
    with pytest.raises(TrainError, match="batch_size: 4 -> 8"):
        train(TrainConfig(steps=4, batch_size=8, out=str(out), resume=True, progress=False))
