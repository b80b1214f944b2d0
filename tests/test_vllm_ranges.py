"""The vLLM plugin's span logic (ism_ext.integrations.vllm.ranges): no vLLM needed.

kv_limit is checked against the project's segment-id rule (`kv_limit_from_segment_ids`), the chunking rule
against a brute-force definition, and the prefix-cache keys against what a block's keys/values depend on.
"""

from __future__ import annotations

import random

import pytest
import torch
from vllm_models import block_ids_of

from ism_ext.integrations.vllm.ranges import (
    block_hash_keys,
    chunk_tokens,
    flatten,
    kv_limit_for_chunk,
    parse_ranges,
    ranges_from_block_ids,
    request_ranges,
)
from ism_ext.masks import kv_limit_from_segment_ids


def random_ranges(rng: random.Random, length: int) -> tuple[tuple[int, int], ...]:
    """Sorted disjoint spans of at least two tokens inside [0, length)."""
    ranges, position = [], 0
    while position < length - 1:
        start = position + rng.randint(0, 6)
        end = start + rng.randint(2, 12)
        if end > length:
            break
        ranges.append((start, end))
        position = end if rng.random() < 0.5 else end + rng.randint(0, 4)
    return tuple(ranges)


@pytest.mark.parametrize("seed", range(20))
def test_kv_limit_matches_the_segment_rule_for_every_chunk(seed):
    rng = random.Random(seed)
    length = rng.randint(1, 60)
    ranges = random_ranges(rng, length)
    expected = kv_limit_from_segment_ids(torch.tensor(block_ids_of(length, ranges)))
    computed = rng.randint(0, length - 1)
    size = rng.randint(1, length - computed)
    got = kv_limit_for_chunk(ranges, computed, size)
    assert got.dtype == torch.int32
    assert got.tolist() == expected[computed: computed + size].tolist()
    # Generated tokens after the prompt are causal.
    assert kv_limit_for_chunk(ranges, length, 3).tolist() == [length + 1, length + 2, length + 3]


@pytest.mark.parametrize("seed", range(20))
def test_chunk_never_ends_inside_a_span_and_is_the_longest_that_does_not(seed):
    rng = random.Random(seed)
    length = rng.randint(2, 80)
    ranges = random_ranges(rng, length)
    inside = {p for start, end in ranges for p in range(start + 1, end)}
    for computed in range(length):
        for scheduled in range(1, length - computed + 1):
            got = chunk_tokens(ranges, computed, scheduled)
            best = max(n for n in range(scheduled + 1) if n == 0 or computed + n not in inside)
            assert got == best, (ranges, computed, scheduled)


def test_chunk_rule_examples():
    ranges = ((4, 10), (10, 20))
    assert chunk_tokens(ranges, 0, 7) == 4  # would end inside (4, 10): stop at its start
    assert chunk_tokens(ranges, 0, 10) == 10  # ends exactly at a span end
    assert chunk_tokens(ranges, 5, 3) == 0  # inside a span already begun (a cache hit): wait for budget
    assert chunk_tokens(ranges, 12, 8) == 8
    assert chunk_tokens((), 3, 5) == 5


def test_ranges_from_block_ids_round_trip():
    rng = random.Random(0)
    for _ in range(50):
        length = rng.randint(0, 50)
        ranges = random_ranges(rng, length)
        assert ranges_from_block_ids(block_ids_of(length, ranges)) == ranges
    # One-token blocks are causal and dropped; adjacent blocks with different ids stay apart.
    assert ranges_from_block_ids([0, 1, 1, -1, 2, 2, 2, 3]) == ((1, 3), (4, 7))


def test_parse_ranges_accepts_flat_and_pairs_and_canonicalises():
    assert parse_ranges([0, 5, 5, 9], 10) == ((0, 5), (5, 9))
    assert parse_ranges([[0, 5], [7, 8], [8, 10]], 10) == ((0, 5), (8, 10))  # [7, 8) is one causal token
    assert parse_ranges([], 3) == ()
    assert request_ranges({"ism_ranges": flatten(((0, 5), (8, 10)))}) == ((0, 5), (8, 10))
    assert request_ranges(None) == () and request_ranges({"other": 1}) == ()


@pytest.mark.parametrize("value, message", [
    ("0,5", "must be a list"),
    ([0, 5, 6], "odd count"),
    ([[0, 5, 6]], "two numbers"),
    ([0, 5.0], "integers"),
    ([True, 5], "integers"),
    ([3, 3], "empty or outside"),
    ([5, 2], "empty or outside"),
    ([-1, 2], "empty or outside"),
    ([0, 11], "empty or outside"),
    ([0, 5, 4, 8], "sorted and disjoint"),
    ([6, 8, 0, 2], "sorted and disjoint"),
])
def test_parse_ranges_refuses_malformed_values_naming_the_field(value, message):
    with pytest.raises(ValueError, match=message) as error:
        parse_ranges(value, 10)
    assert "ism_ranges" in str(error.value)


def test_block_hash_keys_cover_what_a_blocks_keys_and_values_depend_on():
    tokens = list(range(100, 164))
    ranges = ((4, 40), (50, 52))
    # A causal block before any span: no key, so it is shared with causal requests.
    assert block_hash_keys(ranges, tokens, 0, 4) is None
    first = block_hash_keys(ranges, tokens, 0, 16)
    assert first[0][:3] == ("ism", 4, 40) and len(first[0]) == 4  # the span runs past the block: tail digest
    # The tail digest follows the span's later tokens, and only those.
    changed_tail = list(tokens)
    changed_tail[30] += 1
    assert block_hash_keys(ranges, changed_tail, 0, 16) != first
    changed_after = list(tokens)
    changed_after[45] += 1
    assert block_hash_keys(ranges, changed_after, 0, 16) == first
    # A block whose spans end inside it needs no digest; another layout gives another key.
    assert block_hash_keys(ranges, tokens, 32, 48) == (("ism", 4, 40),)
    assert block_hash_keys(((4, 41),), tokens, 32, 48) != block_hash_keys(ranges, tokens, 32, 48)
    assert block_hash_keys(ranges, tokens, 48, 64) == (("ism", 50, 52),)


def test_serving_config_from_additional_config():
    from types import SimpleNamespace

    from ism_ext.integrations.vllm.config import IsmServingConfig

    assert IsmServingConfig.from_vllm_config(SimpleNamespace(additional_config={})) is None
    assert IsmServingConfig.from_vllm_config(SimpleNamespace(additional_config=None)) is None
    assert IsmServingConfig.from_vllm_config(SimpleNamespace(additional_config={"ism": {}})).scheme == "ism"
    assert IsmServingConfig.from_mapping({"scheme": "mas"}).scheme == "mas"
    with pytest.raises(ValueError, match="unknown keys \\['schema'\\]"):
        IsmServingConfig.from_mapping({"schema": "mas"})
    with pytest.raises(ValueError, match="scheme'\\] must be one of"):
        IsmServingConfig.from_mapping({"scheme": "bidirectional"})
    with pytest.raises(ValueError, match="must be a dict"):
        IsmServingConfig.from_mapping("ism")


def test_chat_messages_as_text():
    from ism_ext.integrations.vllm.chat import text_messages

    parts = [{"type": "text", "text": "what is "}, {"type": "text", "text": "this"}]
    assert text_messages([{"role": "user", "content": parts}]) == [{"role": "user", "content": "what is this"}]
    with pytest.raises(ValueError, match=r"messages\[1\].content: ISM serving renders text only"):
        text_messages([{"role": "system", "content": "hi"},
                       {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    with pytest.raises(ValueError, match=r"messages\[0\]: tool calls"):
        text_messages([{"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}])


def test_serve_command_line():
    from ism_ext.cli.serve import _parser, vllm_serve_argv

    args = _parser().parse_args(["--scheme", "mas", "--port", "8123", "--", "--enforce-eager"])
    argv = vllm_serve_argv(args, "/models/x")
    assert argv[:2] == ["--model", "/models/x"] and argv[-1] == "--enforce-eager"
    assert argv[argv.index("--additional-config") + 1] == '{"ism": {"scheme": "mas"}}'
    assert "--enable-prefix-caching" in argv and argv[argv.index("--port") + 1] == "8123"


def test_model_export_folders(tmp_path, monkeypatch):
    from ism_ext.integrations.hf.models import DEFAULT_ADAPTER
    from ism_ext.integrations.vllm.models import default_model_dir, export_model_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_model_dir().name == "smollm2-135m-instruct-ism"
    assert default_model_dir(adapter=str(DEFAULT_ADAPTER)).name == "smollm2-135m-instruct-ism"
    assert default_model_dir(adapter=None).name == "smollm2-135m-instruct"
    other = default_model_dir(str(tmp_path / "mine"), DEFAULT_ADAPTER)
    assert other.name.startswith("mine-") and other != default_model_dir(str(tmp_path / "theirs"), DEFAULT_ADAPTER)
    # A local folder without an adapter is served as it is: nothing is written.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.json").write_text("{}")
    assert export_model_dir(model=str(tmp_path / "mine"), adapter=None) == tmp_path / "mine"
    assert not (tmp_path / "cache").exists()
    with pytest.raises(FileNotFoundError, match="model not found"):
        export_model_dir(model=str(tmp_path / "missing"), adapter=None)
