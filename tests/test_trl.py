"""TRL's SFTTrainer, the transformers Trainer and accelerate with ISM masks (`ism_ext.integrations.trl`).

The reference is the project's own loop, `ism_ext.training.train`, on the same dialogues, seed, batches and
optimizer: its loss and gradient norm per step, its checkpoint after every step, and gradients recomputed from
those checkpoints with `ChatCollator` and the model's own loss (not TRL's chunked LM-head loss). Everything runs
on the CPU with the built-in tiny Llama and the shipped toy chats; the file takes about a minute on two cores.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip("trl")
peft = pytest.importorskip("peft")

import transformers  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tiny_tokenizer import make_tokenizer, sample_dialogues  # noqa: E402
from trl import SFTConfig  # noqa: E402

from ism_ext.inference import ChatSession  # noqa: E402
from ism_ext.integrations.hf.models import load_chat_model  # noqa: E402
from ism_ext.integrations.trl import (  # noqa: E402
    IsmDataCollator,
    IsmDistillTrainer,
    IsmSFTConfig,
    IsmSFTTrainer,
    ensure_ism_model,
    tokenize_conversations,
)
from ism_ext.training import DEFAULT_DATA, ChatCollator, TrainConfig, load_chat_jsonl, train  # noqa: E402
from ism_ext.training.data_files import batches_for_epoch  # noqa: E402
from ism_ext.training.toy import build_tiny_llama, build_toy_tokenizer, dialogue_texts  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
N_DIALOGUES, BATCH, STEPS, MAX_LENGTH, LR, SEED = 16, 4, 3, 512, 3e-3, 0


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> tuple[list[list[dict]], pathlib.Path]:
    """The first dialogues of the shipped toy chats, and a JSONL file of them for the project's loop."""
    dialogues = [e.messages for e in load_chat_jsonl(DEFAULT_DATA)[:N_DIALOGUES]]
    path = tmp_path_factory.mktemp("data") / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": d}) + "\n" for d in dialogues))
    return dialogues, path


@pytest.fixture(scope="module")
def tokenizer(chats):
    """The toy tokenizer the loop's `--model tiny` builds from the same file."""
    return build_toy_tokenizer(dialogue_texts(chats[0]))


def loop_batches() -> list[list[int]]:
    """The loop's batches (dataset indices) of its first STEPS steps: one rank, epoch 0."""
    return batches_for_epoch(N_DIALOGUES, BATCH, 0, SEED, 0, 1)[:STEPS]


def in_loop_order(dialogues: list[list[dict]]) -> list[dict]:
    """The dialogues in the loop's order, as rows: a sequential sampler then gives the Trainer the same batches."""
    return [{"messages": dialogues[i]} for batch in loop_batches() for i in batch]


def run_loop(chats, tmp: pathlib.Path, **overrides) -> tuple[list[dict], pathlib.Path]:
    """The project's loop for STEPS steps, a checkpoint after every step; returns its log records and --out."""
    out = tmp / "loop"
    config = TrainConfig(data=str(chats[1]), batch_size=BATCH, steps=STEPS, lr=LR, max_length=MAX_LENGTH, seed=SEED,
                         progress=False, out=str(out), save_every=1, **overrides)
    train(config)
    return [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()], out


def trainer_settings(tmp: pathlib.Path) -> dict:
    """TrainingArguments of the loop's run: AdamW, constant LR, no weight decay, clip at 1, file order."""
    return dict(output_dir=str(tmp / "trainer"), per_device_train_batch_size=BATCH, max_steps=STEPS, learning_rate=LR,
                lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", seed=SEED,
                logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True,
                train_sampling_strategy="sequential")


class GradCapture(transformers.TrainerCallback):
    """The (clipped) gradients the optimizer is about to apply, at every step."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


def reference_grads(tokenizer, dialogues, loop_out: pathlib.Path, step: int, scheme: str, pack: bool) -> dict:
    """Gradients of step ``step`` from the loop's weights before it, `ChatCollator` and the model's own loss."""
    model = build_tiny_llama(len(tokenizer), seed=SEED)
    if step > 1:
        model.load_state_dict(load_file(str(loop_out / f"step-{step - 1}" / "model.safetensors")))
    batch = ChatCollator(tokenizer, scheme=scheme, max_length=MAX_LENGTH, pack=pack)(
        [dialogues[i] for i in loop_batches()[step - 1]])
    model(**batch).loss.backward()
    torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
    return {n: p.grad for n, p in model.named_parameters()}


def log_values(trainer, key: str) -> list[float]:
    return [r[key] for r in trainer.state.log_history if key in r and "train_runtime" not in r]


@pytest.mark.parametrize("pack", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("scheme", ["ism", "mas"])
def test_sft_trainer_steps_equal_the_project_loop(chats, tokenizer, tmp_path, scheme, pack):
    log, loop_out = run_loop(chats, tmp_path, scheme=scheme, pack=pack)
    capture = GradCapture()
    # TRL's defaults otherwise, gradient checkpointing included (block_sequence_ids pass through it).
    args = IsmSFTConfig(**trainer_settings(tmp_path), ism_scheme=scheme, ism_packing=pack, max_length=MAX_LENGTH)
    trainer = IsmSFTTrainer(build_tiny_llama(len(tokenizer), seed=SEED), args=args,
                            train_dataset=in_loop_order(chats[0]), processing_class=tokenizer, callbacks=[capture])
    trainer.train()

    torch.testing.assert_close(log_values(trainer, "loss"), [r["loss"] for r in log], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(log_values(trainer, "grad_norm"), [r["grad_norm"] for r in log], rtol=1e-5, atol=1e-6)
    assert len(capture.grads) == STEPS
    for step, grads in enumerate(capture.grads, start=1):
        ref = reference_grads(tokenizer, chats[0], loop_out, step, scheme, pack)
        assert set(grads) == set(ref)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref[name], rtol=1e-4, atol=1e-6,
                                       msg=lambda m, s=step, n=name: f"step {s}: {n}: {m}")
    # Adam divides by the root of the squared gradients, so an element whose gradient is ~0 moves by up to lr = 3e-3
    # on float rounding alone: the weights agree to 1e-5 (a few thousandths of one step), not to 1e-6.
    final = load_file(str(loop_out / f"step-{STEPS}" / "model.safetensors"))
    for name, weight in trainer.model.state_dict().items():
        torch.testing.assert_close(weight, final[name], rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_evaluate_gives_the_models_own_loss(chats, tokenizer, tmp_path):
    # Dialogues handed to evaluate() are tokenised by the renderer too; the eval loss is the model's own loss.
    model = build_tiny_llama(len(tokenizer), seed=SEED)
    args = IsmSFTConfig(**trainer_settings(tmp_path), ism_scheme="mas", max_length=MAX_LENGTH,
                        per_device_eval_batch_size=N_DIALOGUES)
    trainer = IsmSFTTrainer(model, args=args, train_dataset=chats[0][:4], processing_class=tokenizer)
    with torch.no_grad():
        want = model(**ChatCollator(tokenizer, scheme="mas")(chats[0][4:])).loss.item()
    got = trainer.evaluate([{"messages": d} for d in chats[0][4:]])["eval_loss"]
    assert got == pytest.approx(want, rel=1e-5)
    assert args.dataset_kwargs is None  # the trainer's own settings went to a copy


def test_plain_trainer_with_the_collator_equals_the_project_loop(chats, tokenizer, tmp_path):
    log, _ = run_loop(chats, tmp_path, scheme="ism")
    dataset = tokenize_conversations(in_loop_order(chats[0]), tokenizer, "ism", MAX_LENGTH)
    trainer = transformers.Trainer(
        build_tiny_llama(len(tokenizer), seed=SEED),
        args=transformers.TrainingArguments(**trainer_settings(tmp_path), remove_unused_columns=False),
        data_collator=IsmDataCollator(tokenizer.pad_token_id), train_dataset=dataset)
    trainer.train()
    torch.testing.assert_close(log_values(trainer, "loss"), [r["loss"] for r in log], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(log_values(trainer, "grad_norm"), [r["grad_norm"] for r in log], rtol=1e-5, atol=1e-6)


def test_plain_trainer_that_drops_the_segments_gets_a_clear_error(chats, tokenizer, tmp_path):
    dataset = tokenize_conversations(in_loop_order(chats[0]), tokenizer, "ism", MAX_LENGTH)
    trainer = transformers.Trainer(
        build_tiny_llama(len(tokenizer), seed=SEED), args=transformers.TrainingArguments(**trainer_settings(tmp_path)),
        data_collator=IsmDataCollator(tokenizer.pad_token_id), train_dataset=dataset)
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        trainer.train()


def test_distill_trainer_equals_the_project_loop(chats, tokenizer, tmp_path):
    torch.manual_seed(SEED)  # the loop draws the LoRA initialisation from the global stream, unseeded
    log, loop_out = run_loop(chats, tmp_path, objective="distill", lora=True)
    torch.manual_seed(SEED)
    model = peft.get_peft_model(build_tiny_llama(len(tokenizer), seed=SEED), peft.LoraConfig(
        r=8, lora_alpha=16.0, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainer = IsmDistillTrainer(
        model, args=transformers.TrainingArguments(**trainer_settings(tmp_path)),
        data_collator=IsmDataCollator(tokenizer.pad_token_id),
        train_dataset=tokenize_conversations(in_loop_order(chats[0]), tokenizer, "ism", MAX_LENGTH))
    trainer.train()
    losses = log_values(trainer, "loss")
    assert min(losses) > 1e-6  # not a trivial zero: the student's ISM masks differ from the causal teacher's
    torch.testing.assert_close(losses, [r["loss"] for r in log], rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(log_values(trainer, "grad_norm"), [r["grad_norm"] for r in log], rtol=1e-4, atol=1e-9)


def test_distill_trainer_needs_an_adapter(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="peft model"):
        IsmDistillTrainer(build_tiny_llama(len(tokenizer)), args=transformers.TrainingArguments(str(tmp_path)))


def test_lora_steps_equal_the_project_loop_and_the_adapter_loads_for_chat(chats, tokenizer, tmp_path):
    torch.manual_seed(SEED)  # the loop's LoRA initialisation comes from the global stream; TRL seeds it with SEED
    log, loop_out = run_loop(chats, tmp_path, lora=True, pack=True)
    base = tmp_path / "base"
    model = build_tiny_llama(len(tokenizer), seed=SEED)
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    args = IsmSFTConfig(**trainer_settings(tmp_path), ism_packing=True, max_length=MAX_LENGTH)
    lora = peft.LoraConfig(r=8, lora_alpha=16.0, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = IsmSFTTrainer(model, args=args, train_dataset=in_loop_order(chats[0]), processing_class=tokenizer,
                            peft_config=lora)
    trainer.train()
    torch.testing.assert_close(log_values(trainer, "loss"), [r["loss"] for r in log], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(log_values(trainer, "grad_norm"), [r["grad_norm"] for r in log], rtol=1e-5, atol=1e-6)
    adapter = tmp_path / "adapter"
    trainer.save_model(str(adapter))

    merged, chat_tokenizer = load_chat_model(str(base), adapter=adapter)
    from_loop, _ = load_chat_model(str(base), adapter=loop_out / f"step-{STEPS}")
    plain, _ = load_chat_model(str(base))
    batch = ChatCollator(chat_tokenizer, scheme="ism")(chats[0][:2])
    with torch.no_grad():
        want = trainer.model.eval()(**batch).logits
        torch.testing.assert_close(merged(**batch).logits, want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(from_loop(**batch).logits, want, rtol=1e-4, atol=1e-5)
        assert (plain(**batch).logits - want).abs().max() > 1e-3  # the adapter changed the model
    session = ChatSession(merged, chat_tokenizer, max_new_tokens=4)
    answers = [session.send("Remember the word bird."), session.send("Which word did I ask you to remember?")]
    assert all(isinstance(a, str) for a in answers) and len(session.stats) == 2


def test_collator_gives_what_chat_collator_gives():
    tok = make_tokenizer()
    dialogues = sample_dialogues(5, 3, seed=7)
    rows = tokenize_conversations(dialogues, tok, "mas", None)
    for pack, kwargs in ((False, {"pad_to_multiple_of": 8}), (True, {"max_length": 200})):
        want = ChatCollator(tok, scheme="mas", pack=pack, **kwargs)(dialogues)
        got = IsmDataCollator(tok.pad_token_id, pack=pack, **kwargs)(list(rows))
        assert set(got) == set(want)
        for key in want:
            assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize(("setting", "match"), [
    ({"packing": True}, "packing=True"),
    ({"padding_free": True}, "padding_free=True"),
    ({"assistant_only_loss": True}, "assistant_only_loss"),
    ({"bf16": True}, "autocast"),
])
def test_settings_that_lose_the_segments_are_refused(tokenizer, tmp_path, setting, match):
    args = IsmSFTConfig(str(tmp_path), report_to=[], use_cpu=True, **setting)
    with pytest.raises(ValueError, match=match):
        IsmSFTTrainer(build_tiny_llama(len(tokenizer)), args=args, train_dataset=[{"messages": []}],
                      processing_class=tokenizer)


def test_plain_sft_config_is_refused(tokenizer, tmp_path):
    args = SFTConfig(str(tmp_path), report_to=[], use_cpu=True, bf16=False)
    with pytest.raises(TypeError, match="IsmSFTConfig"):
        IsmSFTTrainer(build_tiny_llama(len(tokenizer)), args=args, train_dataset=[{"messages": []}],
                      processing_class=tokenizer)


def _tiny_config(cls, **extra):
    return cls(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
               num_key_value_heads=1, **extra)


def test_models_that_cannot_train_with_ism_are_refused():
    mistral = transformers.AutoModelForCausalLM.from_config(_tiny_config(transformers.MistralConfig,
                                                                         sliding_window=64))
    with pytest.raises(ValueError, match="sliding-window attention \\(window 64\\)"):
        ensure_ism_model(mistral, max_length=512)
    assert ensure_ism_model(mistral, max_length=64).config._attn_implementation == "ism"  # within the window
    qwen2 = transformers.AutoModelForCausalLM.from_config(_tiny_config(transformers.Qwen2Config,
                                                                       use_sliding_window=True, sliding_window=64))
    with pytest.raises(NotImplementedError, match="use_sliding_window"):
        ensure_ism_model(qwen2, max_length=32)
    gpt2 = transformers.AutoModelForCausalLM.from_config(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2))
    with pytest.raises(ValueError, match="gpt2"):
        ensure_ism_model(gpt2, max_length=32)


def test_bad_rows_are_named():
    tok = make_tokenizer()
    good = sample_dialogues(1, 1, seed=0)[0]
    with pytest.raises(ValueError, match="dataset row 1: .*assistant"):
        tokenize_conversations([good, [{"role": "assistant", "content": "Hi."}] + good], tok)
    with pytest.raises(ValueError, match="dataset row 0: a \"tools\" column"):
        tokenize_conversations([{"messages": good, "tools": [{"name": "f"}]}], tok)
    with pytest.raises(ValueError, match="unknown scheme"):
        tokenize_conversations([good], tok, scheme="full")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_with_half_the_batch_train_as_one_with_all(tmp_path):
    # The shipped example under `accelerate launch` (two torch.distributed processes on the CPU, gloo), then in
    # this process with the whole batch: the same loss at every step (TRL averages over all processes' tokens).
    common = ["--max-steps", "2", "--limit", "8", "--sequential", "--pack", "--scheme", "ism", "--cpu"]
    # No GPU visible: the processes train on the CPU over gloo even on a machine with GPUs.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(REPO / "examples" / "train_trl.py"),
           "--out", str(two), "--batch-size", "2", *common]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert "on 2 process(es) (DistributedType.MULTI_CPU)" in proc.stdout, proc.stdout[-2000:]

    sys.path.insert(0, str(REPO / "examples"))
    try:
        import train_trl
    finally:
        sys.path.remove(str(REPO / "examples"))
    one = train_trl.main(["--out", str(tmp_path / "one"), "--batch-size", "4", *common])
    two_losses = json.loads((two / "losses.json").read_text())
    assert len(one) == len(two_losses) == 2
    torch.testing.assert_close(two_losses, one, rtol=1e-5, atol=1e-6)
