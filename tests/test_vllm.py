"""The vLLM plugin (ism_ext.integrations.vllm) on real vLLM engines (vllm-cpu), against the project's own path.

Every served answer is compared with `generate(block_sequence_ids=)` of the same weights (tests/vllm_models.py):
greedy tokens equal, log-probabilities close. Engines run in this process (vLLM's in-process executor,
``enforce_eager`` to skip its compile warm-up); the server test starts `python -m ism_ext serve` on loopback.
CI installs vLLM (`make install`) and checks that it imports, so these tests run there.
"""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import subprocess
import sys
import time

import pytest

vllm = pytest.importorskip("vllm")

from vllm import LLM, SamplingParams  # noqa: E402
from vllm_models import Reference, tiny_model_dir  # noqa: E402

from ism_ext.integrations.vllm.chat import render_chat  # noqa: E402
from ism_ext.integrations.vllm.models import export_model_dir  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# vLLM's own switches for a test process: engine in this process, no thread pinning, no hub, a small cache.
ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "HF_HUB_OFFLINE": "1",
              "VLLM_CPU_KVCACHE_SPACE": "1"}
SYSTEM = "you are a small red cat and you sit on the big mat all day and tell me about the sun and the moon"
TOL = {"tiny": 2e-5, "smollm2": 1e-4}  # measured at most 4e-7 and 2.9e-5


@pytest.fixture(scope="module", autouse=True)
def _engine_env():
    saved = {key: os.environ.get(key) for key in ENGINE_ENV}
    os.environ.update(ENGINE_ENV)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@contextlib.contextmanager
def engine(model_dir, ism: bool = True, **kwargs):
    """An in-process vLLM engine (float32, prefix caching on, ISM configured unless ``ism=False``)."""
    options = dict(dtype="float32", distributed_executor_backend="uni", enforce_eager=True, max_model_len=1024,
                   enable_prefix_caching=True, seed=0)
    if ism:
        options["additional_config"] = {"ism": {}}
    llm = LLM(str(model_dir), **(options | kwargs))
    try:
        yield llm
    finally:
        del llm
        gc.collect()


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    return {family: tiny_model_dir(tmp_path_factory.mktemp(family), family) for family in ("llama", "qwen2")}


@pytest.fixture(scope="module")
def references(tiny_dirs):
    return {family: Reference(path) for family, path in tiny_dirs.items()}


@pytest.fixture(scope="module")
def tiny_llm(tiny_dirs):
    with engine(tiny_dirs["llama"], block_size=32) as llm:
        yield llm


def greedy(tokens: int, **extra) -> SamplingParams:
    return SamplingParams(max_tokens=tokens, temperature=0, logprobs=0, ignore_eos=True, extra_args=extra or None)


def check_output(output, reference: Reference, ranges, tolerance: float) -> None:
    """``output`` (a vLLM RequestOutput) has the reference's greedy tokens, log-probs within ``tolerance``."""
    tokens = list(output.outputs[0].token_ids)
    expected, expected_logprobs = reference.generate(list(output.prompt_token_ids), ranges, len(tokens))
    assert tokens == expected
    logprobs = [step[t].logprob for step, t in zip(output.outputs[0].logprobs, tokens, strict=True)]
    assert max(abs(a - b) for a, b in zip(logprobs, expected_logprobs, strict=True)) < tolerance


def chat_and_check(llm, reference, messages, scheme, tokens=8, tolerance=TOL["tiny"]):
    output = llm.chat(messages, greedy(tokens, ism_scheme=scheme), use_tqdm=False)[0]
    token_ids, ranges = render_chat(llm.get_tokenizer(), messages, scheme)
    assert list(output.prompt_token_ids) == token_ids
    check_output(output, reference, ranges, tolerance)
    return output, ranges


def first_round(system: str = SYSTEM, user: str = "what is the red dog doing on the mat today") -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


@pytest.mark.parametrize("scheme", ["causal", "ism", "mas", "prefix_lm"])
def test_single_round_equals_the_projects_generate(tiny_llm, references, scheme):
    _, ranges = chat_and_check(tiny_llm, references["llama"], first_round(), scheme)
    assert (len(ranges) > 0) == (scheme != "causal")


def test_three_rounds_reuse_the_history_from_the_prefix_cache(tiny_llm, references):
    tiny_llm.reset_prefix_cache()
    messages = first_round()
    for round_ in range(3):
        output, _ = chat_and_check(tiny_llm, references["llama"], messages, "ism", tokens=12)
        if round_ > 0:
            assert output.num_cached_tokens > 0
        messages += [{"role": "assistant", "content": output.outputs[0].text},
                     {"role": "user", "content": f"tell me why the sun is big and the moon is small {round_}"}]


def test_two_chats_share_a_system_prompt(tiny_llm, references):
    tiny_llm.reset_prefix_cache()
    first, _ = chat_and_check(tiny_llm, references["llama"], first_round(user="one two three"), "ism")
    second, _ = chat_and_check(tiny_llm, references["llama"], first_round(user="four five six seven"), "ism")
    assert first.num_cached_tokens == 0 and second.num_cached_tokens >= 32  # the system turn's whole blocks


def test_the_same_tokens_under_another_layout_are_not_reused(tiny_llm, references):
    """An ISM prompt's blocks are keyed by their layout: the same tokens as a causal (or prefix-LM) request
    miss the cache and are answered as that layout answers, not as the cached one."""
    tiny_llm.reset_prefix_cache()
    messages = first_round()
    ism, _ = chat_and_check(tiny_llm, references["llama"], messages, "ism")
    token_ids = list(ism.prompt_token_ids)
    causal = tiny_llm.generate({"prompt_token_ids": token_ids}, greedy(8), use_tqdm=False)[0]
    assert causal.num_cached_tokens == 0
    check_output(causal, references["llama"], (), TOL["tiny"])
    prefix_lm, _ = chat_and_check(tiny_llm, references["llama"], messages, "prefix_lm")
    assert prefix_lm.num_cached_tokens == 0
    again, _ = chat_and_check(tiny_llm, references["llama"], messages, "ism")
    assert again.num_cached_tokens > 0


def test_batched_requests_of_different_lengths(tiny_llm, references):
    tiny_llm.reset_prefix_cache()
    conversations = [first_round(), first_round(user="one two three"), [{"role": "user", "content": "hello big house"}],
                     first_round(system="be brief", user="what is the answer to the question about the river")]
    outputs = tiny_llm.chat(conversations, greedy(10), use_tqdm=False)
    tokenizer = tiny_llm.get_tokenizer()
    for messages, output in zip(conversations, outputs, strict=True):
        token_ids, ranges = render_chat(tokenizer, messages, "ism")
        assert list(output.prompt_token_ids) == token_ids
        check_output(output, references["llama"], ranges, TOL["tiny"])


def test_explicit_ranges_on_a_token_prompt(tiny_llm, references):
    prompt = list(range(30, 130))
    ranges = ((0, 7), (7, 40), (52, 53), (60, 99))
    output = tiny_llm.generate({"prompt_token_ids": prompt}, greedy(6, ism_ranges=[b for r in ranges for b in r]),
                               use_tqdm=False)[0]
    check_output(output, references["llama"], ((0, 7), (7, 40), (60, 99)), TOL["tiny"])


@pytest.mark.parametrize("extra, message", [
    ({"ism_ranges": [0, 500]}, "outside the prompt"),
    ({"ism_ranges": [4, 2]}, "outside the prompt"),
    ({"ism_ranges": [0, 5, 3, 9]}, "sorted and disjoint"),
    ({"ism_ranges": "0-5"}, "must be a list"),
    ({"ism_scheme": "ism"}, "chat request"),
])
def test_malformed_requests_are_refused_naming_the_field(tiny_llm, extra, message):
    with pytest.raises(ValueError, match=message):
        tiny_llm.generate({"prompt_token_ids": list(range(30, 60))}, greedy(2, **extra), use_tqdm=False)


def test_malformed_chats_are_refused(tiny_llm):
    with pytest.raises(ValueError, match="ism_scheme must be one of"):
        tiny_llm.chat(first_round(), greedy(2, ism_scheme="bidirectional"), use_tqdm=False)
    with pytest.raises(ValueError, match="token prompt"):
        tiny_llm.chat(first_round(), greedy(2, ism_ranges=[0, 3]), use_tqdm=False)
    with pytest.raises(ValueError, match="tools"):
        tiny_llm.chat(first_round(), greedy(2), tools=[{"type": "function", "function": {"name": "f"}}],
                      use_tqdm=False)
    with pytest.raises(ValueError, match="answer"):
        tiny_llm.chat(first_round() + [{"role": "assistant", "content": "hi"}], greedy(2), use_tqdm=False)


def test_chunked_prefill_never_splits_a_span(tiny_dirs, references):
    """With a step budget of 32 tokens, chunks end only at span ends (the answers are right), and a span longer
    than the budget is refused instead of served wrong."""
    with engine(tiny_dirs["llama"], max_num_batched_tokens=32, max_num_seqs=4, enable_prefix_caching=False) as llm:
        messages = first_round(system="be a cat", user="what is the red dog doing") + [
            {"role": "assistant", "content": "the dog sat on the mat"},
            {"role": "user", "content": "why is the sun big and the moon small"}]
        output, _ = chat_and_check(llm, references["llama"], messages, "ism")
        assert len(output.prompt_token_ids) > 32  # prefilled in more than one step
        prompt = list(range(30, 110))
        spans = [(0, 20), (20, 45), (45, 70)]  # 32 would fall inside (20, 45) and 64 inside (45, 70)
        out = llm.generate({"prompt_token_ids": prompt}, greedy(5, ism_ranges=[b for s in spans for b in s]),
                           use_tqdm=False)[0]
        check_output(out, references["llama"], spans, TOL["tiny"])
        with pytest.raises(ValueError, match="max_num_batched_tokens=32"):
            llm.generate({"prompt_token_ids": prompt}, greedy(2, ism_ranges=[0, 40]), use_tqdm=False)


def test_qwen2_family(tiny_dirs, references):
    with engine(tiny_dirs["qwen2"]) as llm:
        for scheme in ("ism", "mas"):
            chat_and_check(llm, references["qwen2"], first_round(), scheme)


def test_engine_without_ism_config_is_plain_vllm(tiny_dirs, references):
    with engine(tiny_dirs["llama"], ism=False) as llm:
        output = llm.chat(first_round(), greedy(8), use_tqdm=False)[0]
        check_output(output, references["llama"], (), TOL["tiny"])  # vLLM's rendering, causal attention
        with pytest.raises(ValueError, match="additional_config"):
            llm.generate({"prompt_token_ids": list(range(30, 60))}, greedy(2, ism_ranges=[0, 5]), use_tqdm=False)


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    return export_model_dir(tmp_path_factory.mktemp("smollm2"))


def test_smollm2_with_the_shipped_adapter_over_three_rounds(smollm2_dir):
    reference = Reference(smollm2_dir)
    with engine(smollm2_dir, max_model_len=2048, block_size=32) as llm:
        messages = [{"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": "What is the capital of France?"}]
        for scheme in ("causal", "mas"):
            chat_and_check(llm, reference, messages, scheme, tolerance=TOL["smollm2"])
        for round_, question in enumerate(["And of Germany?", "And of Italy?", "Thanks."]):
            output, _ = chat_and_check(llm, reference, messages, "ism", tokens=10, tolerance=TOL["smollm2"])
            assert round_ == 0 or output.num_cached_tokens > 0
            messages += [{"role": "assistant", "content": output.outputs[0].text},
                         {"role": "user", "content": question}]


def test_tensor_parallel_two_ranks_give_the_same_tokens(tiny_dirs, references, tmp_path):
    """tensor_parallel_size=2 (two worker processes, one core each) answers as the project's generate does."""
    script = tmp_path / "tp.py"
    script.write_text(
        "import sys, json\n"
        "from vllm import LLM, SamplingParams\n"
        "if __name__ == '__main__':\n"
        "    llm = LLM(sys.argv[1], dtype='float32', tensor_parallel_size=2, enforce_eager=True, max_model_len=512,\n"
        "              additional_config={'ism': {}})\n"
        "    out = llm.chat(json.loads(sys.argv[2]), SamplingParams(max_tokens=8, temperature=0, ignore_eos=True,\n"
        "                   logprobs=0), use_tqdm=False)[0]\n"
        "    toks = list(out.outputs[0].token_ids)\n"
        "    print('RESULT', json.dumps([list(out.prompt_token_ids), toks,\n"
        "          [s[t].logprob for s, t in zip(out.outputs[0].logprobs, toks)]]))\n")
    import json

    env = {k: v for k, v in os.environ.items() if k not in ENGINE_ENV} | {
        "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    run = subprocess.run([sys.executable, str(script), str(tiny_dirs["llama"]), json.dumps(first_round())],
                         capture_output=True, text=True, env=env, timeout=600)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    prompt, tokens, logprobs = json.loads(lines[-1][len("RESULT "):])
    token_ids, ranges = render_chat(_tokenizer(tiny_dirs["llama"]), first_round(), "ism")
    assert prompt == token_ids
    expected, expected_logprobs = references["llama"].generate(prompt, ranges, len(tokens))
    assert tokens == expected
    assert max(abs(a - b) for a, b in zip(logprobs, expected_logprobs, strict=True)) < TOL["tiny"]


def _tokenizer(model_dir):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(model_dir)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ask(client, messages, **extra):
    """One greedy chat completion of 8 tokens, with the prompt's and the answer's token ids returned."""
    return client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                          extra_body={"ignore_eos": True, "return_token_ids": True, **extra})


def check_reply(reply, reference, tokenizer, messages, scheme) -> None:
    """The server's prompt is the renderer's, and its answer is the project's generate answer."""
    token_ids, ranges = render_chat(tokenizer, messages, scheme)
    assert reply.prompt_token_ids == token_ids and reply.usage.prompt_tokens == len(token_ids)
    expected, _ = reference.generate(token_ids, ranges, 8)
    assert reply.choices[0].token_ids == expected


def test_openai_server_round_trip(tiny_dirs, references):
    """`python -m ism_ext serve` on loopback, two rounds through the `openai` client, and malformed requests."""
    openai = pytest.importorskip("openai")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ENGINE_ENV} | {"VLLM_CPU_KVCACHE_SPACE": "1"}
    command = [sys.executable, "-m", "ism_ext", "serve", "--model", str(tiny_dirs["llama"]), "--adapter", "none",
               "--port", str(port), "--served-model-name", "tiny", "--max-model-len", "1024", "--",
               "--enforce-eager"]
    server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, server.stdout.read()[-3000:]
            with contextlib.suppress(openai.APIConnectionError):
                client.models.list()
                break
            assert time.monotonic() < deadline, "the server did not start in 300 s"
            time.sleep(1)
        tokenizer = _tokenizer(tiny_dirs["llama"])
        messages = first_round()
        for _ in range(2):
            reply = ask(client, messages)
            check_reply(reply, references["llama"], tokenizer, messages, "ism")
            messages = messages + [{"role": "assistant", "content": reply.choices[0].message.content},
                                   {"role": "user", "content": "and the moon"}]
        mas = ask(client, first_round(), vllm_xargs={"ism_scheme": "mas"})
        check_reply(mas, references["llama"], tokenizer, first_round(), "mas")
        with pytest.raises(openai.BadRequestError, match="ism_scheme"):
            client.chat.completions.create(model="tiny", messages=first_round(), max_tokens=2,
                                           extra_body={"vllm_xargs": {"ism_scheme": "nope"}})
        with pytest.raises(openai.BadRequestError, match="ism_ranges"):
            client.completions.create(model="tiny", prompt="the cat sat", max_tokens=2,
                                      extra_body={"vllm_xargs": {"ism_ranges": [0, 999]}})
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
