"""Self-distillation: the prompt set, the teacher's answers, the KL objective, and `python -m ism_ext distill`
end to end on a tiny model saved to a folder (so the run is the real command, on the CPU, in seconds)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from ism_ext.cli.distill import main as distill_main  # noqa: E402
from ism_ext.integrations.hf.models import load_chat_model  # noqa: E402
from ism_ext.training import ChatCollator, TrainConfig, TrainError, train  # noqa: E402
from ism_ext.training.datasets import make_distill_prompts  # noqa: E402
from ism_ext.training.objectives import distill_loss  # noqa: E402
from ism_ext.training.teacher import DEFAULT_PROMPTS, answer_dialogues, load_prompts  # noqa: E402
from ism_ext.training.toy import build_tiny_llama, build_toy_tokenizer, dialogue_texts  # noqa: E402

PROMPTS = [
    {"id": 0, "split": "train", "system": None, "user": ["What is the moon?", "Why?"]},
    {"id": 1, "split": "train", "system": "Be brief.", "user": ["Tell me about trees.", "Give an example.", "Thanks!"]},
    {"id": 2, "split": "heldout", "system": None, "user": ["What is rain?"]},
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama and its toy tokenizer, saved as a transformers folder (what --model takes)."""
    tok = build_toy_tokenizer(dialogue_texts([[{"role": "user", "content": u} for p in PROMPTS for u in p["user"]]]))
    model = build_tiny_llama(len(tok), seed=0)
    folder = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, model.eval(), tok


def test_shipped_prompts_are_the_generator_output_and_split():
    generated = make_distill_prompts.to_jsonl(make_distill_prompts.make_prompts())
    assert DEFAULT_PROMPTS.read_text(encoding="utf-8") == generated
    train_split, held = load_prompts(DEFAULT_PROMPTS, "train"), load_prompts(DEFAULT_PROMPTS, "heldout")
    assert len(train_split) + len(held) == 300 and len(held) == 50
    assert sum(len(p["user"]) for p in train_split + held) >= 600  # a few hundred user turns and more
    assert {p["id"] for p in train_split}.isdisjoint({p["id"] for p in held})


def test_load_prompts_rejects_bad_rows(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 0, "user": []}\n')
    with pytest.raises(ValueError, match="line 1"):
        load_prompts(bad)


def test_teacher_answers_every_round_in_batches(tiny):
    _, model, tok = tiny
    dialogues = answer_dialogues(model, tok, PROMPTS, max_new_tokens=5, batch_size=2, progress=False)
    assert [d["id"] for d in dialogues] == [0, 1, 2]
    roles = [[m["role"] for m in d["messages"]] for d in dialogues]
    assert roles[1] == ["system"] + ["user", "assistant"] * 3 and roles[0] == ["user", "assistant"] * 2
    # Batching and padding do not change the answers: one dialogue alone gets the same ones.
    alone = answer_dialogues(model, tok, PROMPTS[1:2], max_new_tokens=5, batch_size=1, progress=False)
    assert alone[0]["messages"] == dialogues[1]["messages"]


def test_the_kl_is_zero_for_a_fresh_adapter_under_causal_masks_only(tiny):
    _, model, tok = tiny
    dialogues = answer_dialogues(model, tok, PROMPTS, max_new_tokens=5, batch_size=3, progress=False)
    student = peft.get_peft_model(build_tiny_llama(len(tok), seed=0), peft.LoraConfig(r=4, target_modules="all-linear"))
    for scheme, zero in (("causal", True), ("ism", False)):
        batch = ChatCollator(tok, scheme=scheme)([d["messages"] for d in dialogues])
        kl = distill_loss(student, student, batch).item()
        assert (kl < 1e-6) == zero, f"{scheme}: KL {kl}"


def test_the_adapter_learns_the_teacher_distributions(tiny):
    # Overfitting one batch: the KL of the ISM student falls by more than half in a few Adam steps on LoRA only.
    _, model, tok = tiny
    dialogues = answer_dialogues(model, tok, PROMPTS, max_new_tokens=5, batch_size=3, progress=False)
    batch = ChatCollator(tok, scheme="ism")([d["messages"] for d in dialogues])
    torch.manual_seed(0)
    student = peft.get_peft_model(build_tiny_llama(len(tok), seed=0), peft.LoraConfig(r=8, target_modules="all-linear"))
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=3e-3)
    first = distill_loss(student, student, batch).item()
    for _ in range(40):
        loss = distill_loss(student, student, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert distill_loss(student, student, batch).item() < 0.5 * first


def test_distill_objective_needs_lora():
    with pytest.raises(TrainError, match="needs --lora"):
        train(TrainConfig(objective="distill", steps=1))


def test_distill_command_end_to_end(tiny, tmp_path):
    folder, _, _ = tiny
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS * 3))
    out, export = tmp_path / "run", tmp_path / "adapter"
    args = ["--out", str(out), "--model", str(folder), "--prompts", str(prompts), "--max-new-tokens", "6",
            "--steps", "8", "--batch-size", "2", "--lr", "5e-3", "--lora-r", "4", "--save-every", "4",
            "--no-progress"]
    distill_main(args + ["--export", str(export)])
    log = [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]
    assert len(log) == 8 and all(r["loss"] >= 0 for r in log)
    teacher = (out / "teacher_train.jsonl").read_text()
    # A second run reuses the teacher's answers and resumes the checkpoints: the same loss curve.
    distill_main([*args[:args.index("--steps") + 1], "10", *args[args.index("--steps") + 2:], "--resume"])
    assert (out / "teacher_train.jsonl").read_text() == teacher
    resumed = [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]
    assert resumed[:8] == log and len(resumed) == 10
    readme = (export / "README.md").read_text()
    assert (export / "adapter_model.safetensors").is_file() and "python -m ism_ext distill" in readme
    # The README names the model and the scheme it was made with, not SmolLM2 and ISM whatever they were.
    assert readme.startswith(f"# {folder} adapted to the ism layout") and "SmolLM2" not in readme
    assert json.loads((export / "adapter_config.json").read_text())["base_model_name_or_path"] == str(folder)
    merged, _ = load_chat_model(str(folder), adapter=export)
    base, _ = load_chat_model(str(folder))
    ids = torch.tensor([[3, 4, 5, 6]])
    assert not torch.allclose(merged(ids).logits, base(ids).logits)  # the adapter changed the model
