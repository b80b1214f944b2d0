"""Tests of ``ism_ext.masks`` (dialogue schemes, dense mask) and ``ism_ext.viz`` (PNG pictures)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ism_ext.masks import (
    SCHEMES,
    TURN_ROLES,
    dense_mask,
    kv_limit_for_turns,
    kv_limit_from_segment_ids,
    segment_ids_for_turns,
    turn_boundaries,
)

# The usual alternation: system, user, assistant, user, assistant.
DIALOGUE = [("system", 3), ("user", 2), ("assistant", 3), ("user", 2), ("assistant", 2)]
# Adjacent turns of the same role: two system messages, then two user messages.
ADJACENT = [("system", 2), ("system", 1), ("user", 2), ("user", 1), ("assistant", 2)]

EXPECTED_IDS = {
    "DIALOGUE": {
        "ism": [0, 0, 0, 1, 1, -1, -1, -1, 2, 2, -1, -1],
        "mas": [0, 0, 0, 1, 1, -1, -1, -1, 2, 2, -1, -1],
        "mas_merged": [0, 0, 0, 1, 1, -1, -1, -1, 2, 2, -1, -1],
        "prefix_lm": [0] * 10 + [-1, -1],
        "causal": [-1] * 12,
    },
    "ADJACENT": {
        "ism": [0, 0, 1, 2, 2, 3, -1, -1],
        "mas": [0, 0, 1, 2, 2, 3, -1, -1],  # the authors' MAS: every message its own block
        "mas_merged": [0, 0, 0, 1, 1, 1, -1, -1],
        "prefix_lm": [0] * 6 + [-1, -1],
        "causal": [-1] * 8,
    },
}
EXPECTED_KV = {
    "DIALOGUE": {
        "ism": [3, 3, 3, 5, 5, 6, 7, 8, 10, 10, 11, 12],
        "mas": [3, 3, 3, 5, 5, 6, 7, 8, 10, 10, 11, 12],
        "mas_merged": [3, 3, 3, 5, 5, 6, 7, 8, 10, 10, 11, 12],
        "prefix_lm": [10] * 10 + [11, 12],
        "causal": list(range(1, 13)),
    },
    "ADJACENT": {
        "ism": [2, 2, 3, 5, 5, 6, 7, 8],
        "mas": [2, 2, 3, 5, 5, 6, 7, 8],
        "mas_merged": [3, 3, 3, 6, 6, 6, 7, 8],
        "prefix_lm": [6] * 6 + [7, 8],
        "causal": list(range(1, 9)),
    },
}
DIALOGUES = {"DIALOGUE": DIALOGUE, "ADJACENT": ADJACENT}


def reference_kv(turns: list[tuple[str, int]], scheme: str) -> list[int]:
    """Independent kv_limit straight from the turns (no segment ids), one token at a time."""
    live = [(r, n) for r, n in turns if n > 0]
    starts = [0]
    for _, n in live:
        starts.append(starts[-1] + n)
    total = starts[-1]
    out: list[int] = []
    for k, (role, n) in enumerate(live):
        for i in range(starts[k], starts[k] + n):
            causal_roles = {"ism": ("assistant", "template"), "mas": ("assistant", "template", "tool"),
                            "mas_merged": ("assistant", "template")}.get(scheme, ())
            if scheme == "causal" or role in causal_roles:
                out.append(i + 1)
            elif scheme in ("ism", "mas"):
                out.append(starts[k + 1])
            elif scheme == "mas_merged":
                # The block runs on while the next turn has the same role (tool counting as user).
                side = ["user" if r == "tool" else r for r, _ in live]
                end = k
                while end + 1 < len(live) and side[end + 1] == side[k]:
                    end += 1
                out.append(starts[end + 1])
            else:  # prefix_lm
                if live and live[-1][0] == "assistant":
                    answer_start = starts[len(live) - 1]
                    out.append(answer_start if i < answer_start else i + 1)
                else:
                    out.append(total)
    return out


dialogues = st.lists(st.tuples(st.sampled_from(TURN_ROLES), st.integers(0, 5)), max_size=12)


# --- hand-written layouts -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["DIALOGUE", "ADJACENT"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_segment_ids_hand_written(name: str, scheme: str) -> None:
    ids = segment_ids_for_turns(DIALOGUES[name], scheme)
    assert ids.dtype == torch.int32
    assert ids.dim() == 1
    assert ids.tolist() == EXPECTED_IDS[name][scheme]


@pytest.mark.parametrize("name", ["DIALOGUE", "ADJACENT"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_kv_limit_hand_written(name: str, scheme: str) -> None:
    kv = kv_limit_for_turns(DIALOGUES[name], scheme)
    assert kv.dtype == torch.int32
    assert kv.tolist() == EXPECTED_KV[name][scheme]


def test_ism_and_mas_merged_differ_only_for_adjacent_same_role_turns() -> None:
    assert torch.equal(kv_limit_for_turns(DIALOGUE, "ism"), kv_limit_for_turns(DIALOGUE, "mas_merged"))
    assert not torch.equal(kv_limit_for_turns(ADJACENT, "ism"), kv_limit_for_turns(ADJACENT, "mas_merged"))
    assert torch.equal(kv_limit_for_turns(ADJACENT, "ism"), kv_limit_for_turns(ADJACENT, "mas"))


def test_tool_turns_under_each_scheme() -> None:
    turns = [("user", 2), ("assistant", 1), ("tool", 2), ("assistant", 1)]
    assert segment_ids_for_turns(turns, "ism").tolist() == [0, 0, -1, 1, 1, -1]
    assert segment_ids_for_turns(turns, "mas_merged").tolist() == [0, 0, -1, 1, 1, -1]
    assert segment_ids_for_turns(turns, "mas").tolist() == [0, 0, -1, -1, -1, -1]  # the authors: tools causal
    # mas_merged merges a tool result into an adjacent user block; ISM keeps every turn separate.
    merged = [("user", 2), ("tool", 1), ("assistant", 1)]
    assert segment_ids_for_turns(merged, "mas_merged").tolist() == [0, 0, 0, -1]
    assert segment_ids_for_turns(merged, "ism").tolist() == [0, 0, 1, -1]
    assert segment_ids_for_turns(merged, "mas").tolist() == [0, 0, -1, -1]


def test_template_turns_are_causal_under_every_scheme_but_prefix_lm() -> None:
    turns = [("template", 1), ("user", 2), ("template", 2), ("assistant", 1)]
    for scheme in ("ism", "mas", "mas_merged"):
        assert segment_ids_for_turns(turns, scheme).tolist() == [-1, 0, 0, -1, -1, -1]
    assert segment_ids_for_turns(turns, "prefix_lm").tolist() == [0, 0, 0, 0, 0, -1]


def test_prefix_lm_without_assistant_is_one_block() -> None:
    turns = [("system", 2), ("user", 3)]
    assert segment_ids_for_turns(turns, "prefix_lm").tolist() == [0] * 5
    assert kv_limit_for_turns(turns, "prefix_lm").tolist() == [5] * 5


def test_prefix_lm_only_last_assistant_turn_is_causal() -> None:
    turns = [("user", 1), ("assistant", 2), ("tool", 1), ("assistant", 2)]
    assert segment_ids_for_turns(turns, "prefix_lm").tolist() == [0, 0, 0, 0, -1, -1]
    assert kv_limit_for_turns(turns, "prefix_lm").tolist() == [4, 4, 4, 4, 5, 6]


def test_prefix_lm_dialogue_ending_with_user_is_all_prefix() -> None:
    # A prompt waiting for the next answer: the whole history is the prefix.
    turns = [("user", 2), ("assistant", 2), ("user", 1)]
    assert kv_limit_for_turns(turns, "prefix_lm").tolist() == [5] * 5


def test_prefix_lm_only_assistant() -> None:
    assert kv_limit_for_turns([("assistant", 3)], "prefix_lm").tolist() == [1, 2, 3]


def test_zero_length_turns_take_no_tokens_and_do_not_split() -> None:
    turns = [("system", 0), ("user", 2), ("assistant", 0), ("user", 1), ("assistant", 1)]
    # Ids start at 0 even though the first turn is empty.
    assert segment_ids_for_turns(turns, "ism").tolist() == [0, 0, 1, -1]
    # The empty assistant turn does not separate the two user turns.
    assert segment_ids_for_turns(turns, "mas_merged").tolist() == [0, 0, 0, -1]
    # A trailing empty assistant turn is not "the last assistant turn".
    assert segment_ids_for_turns([("user", 2), ("assistant", 0)], "prefix_lm").tolist() == [0, 0]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_empty_dialogue(scheme: str) -> None:
    for turns in ([], [("user", 0), ("assistant", 0)]):
        ids = segment_ids_for_turns(turns, scheme)
        assert ids.shape == (0,) and ids.dtype == torch.int32
        assert kv_limit_for_turns(turns, scheme).shape == (0,)


def test_turn_tuples_may_be_lists_and_numpy_ints() -> None:
    np = pytest.importorskip("numpy")
    turns = [["user", np.int64(2)], ("assistant", 1)]
    assert segment_ids_for_turns(turns, "ism").tolist() == [0, 0, -1]  # type: ignore[arg-type]


# --- against the independent reference ----------------------------------------------------------------


@settings(max_examples=300, deadline=None, database=None)
@given(turns=dialogues, scheme=st.sampled_from(SCHEMES))
def test_kv_limit_matches_reference(turns: list[tuple[str, int]], scheme: str) -> None:
    kv = kv_limit_for_turns(turns, scheme)
    assert kv.tolist() == reference_kv(turns, scheme)
    ids = segment_ids_for_turns(turns, scheme)
    assert ids.shape == (sum(n for _, n in turns),)
    # Ids are numbered 0, 1, 2, ... in order of first appearance.
    firsts = list(dict.fromkeys(x for x in ids.tolist() if x >= 0))
    assert firsts == list(range(len(firsts)))
    # Every scheme gives a non-decreasing kv_limit with kv_limit[i] > i (tile skipping relies on it).
    values = kv.tolist()
    assert all(a <= b for a, b in zip(values, values[1:], strict=False))
    assert all(v > i for i, v in enumerate(values))
    assert torch.equal(kv, kv_limit_from_segment_ids(ids))


def test_kv_limit_for_turns_device_argument() -> None:
    kv = kv_limit_for_turns(DIALOGUE, "ism", device="cpu")
    assert kv.device.type == "cpu" and kv.dtype == torch.int32
    assert kv.tolist() == EXPECTED_KV["DIALOGUE"]["ism"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kv_limit_for_turns_on_cuda() -> None:
    kv = kv_limit_for_turns(ADJACENT, "mas", device="cuda")
    assert kv.device.type == "cuda"
    assert kv.cpu().tolist() == EXPECTED_KV["ADJACENT"]["mas"]


# --- errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("turns", "match"),
    [
        ([("user", -1)], "length must be >= 0"),
        ([("user", 2.0)], "length must be an int"),
        ([("user", "3")], "length must be an int"),
        ([("user", True)], "length must be an int"),
        ([("robot", 2)], "unknown role 'robot'"),
        ([("user", 2, 3)], "must be a \\(role, length\\) pair"),
        (["user"], "must be a \\(role, length\\) pair"),
    ],
)
def test_bad_turns_raise(turns: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        segment_ids_for_turns(turns, "ism")
    with pytest.raises(ValueError, match=match):
        turn_boundaries(turns)


def test_unknown_scheme_raises() -> None:
    with pytest.raises(ValueError, match="unknown scheme 'flash'"):
        segment_ids_for_turns(DIALOGUE, "flash")
    with pytest.raises(ValueError, match="unknown scheme 'flash'"):
        kv_limit_for_turns(DIALOGUE, "flash")


# --- turn_boundaries ----------------------------------------------------------------------------------


def test_turn_boundaries() -> None:
    assert turn_boundaries(DIALOGUE) == [0, 3, 5, 8, 10, 12]
    assert turn_boundaries([("user", 0), ("assistant", 2)]) == [0, 0, 2]
    assert turn_boundaries([]) == [0]


# --- dense_mask ---------------------------------------------------------------------------------------


def loop_mask(kv: list[int], lk: int) -> list[list[bool]]:
    """mask[i][j] = j < kv[i], by loops."""
    return [[j < kv[i] for j in range(lk)] for i in range(len(kv))]


@pytest.mark.parametrize("name", ["DIALOGUE", "ADJACENT"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_dense_mask_matches_loop(name: str, scheme: str) -> None:
    kv = kv_limit_for_turns(DIALOGUES[name], scheme)
    mask = dense_mask(kv)
    assert mask.dtype == torch.bool
    assert mask.shape == (kv.numel(), kv.numel())
    assert mask.tolist() == loop_mask(kv.tolist(), kv.numel())


def test_dense_mask_small_explicit() -> None:
    mask = dense_mask(torch.tensor([2, 2, 3], dtype=torch.int32))
    assert mask.tolist() == [[True, True, False], [True, True, False], [True, True, True]]


def test_dense_mask_query_shorter_than_keys() -> None:
    # A new user turn of 2 tokens and 1 answer token on top of 5 cached keys.
    kv = torch.tensor([7, 7, 8])
    mask = dense_mask(kv, seqlen_k=8)
    assert mask.shape == (3, 8)
    assert mask.tolist() == loop_mask([7, 7, 8], 8)


def test_dense_mask_allows_empty_rows_and_empty_input() -> None:
    assert dense_mask(torch.tensor([0, 2])).tolist() == [[False, False], [True, True]]
    assert dense_mask(torch.zeros(0, dtype=torch.int32)).shape == (0, 0)
    assert dense_mask(torch.zeros(0, dtype=torch.int32), seqlen_k=4).shape == (0, 4)


def test_dense_mask_errors() -> None:
    with pytest.raises(ValueError, match="seqlen_k"):
        dense_mask(torch.tensor([1, 3]))  # 3 > Lq = 2: forgot seqlen_k
    with pytest.raises(ValueError, match="seqlen_k"):
        dense_mask(torch.tensor([1, -1]), seqlen_k=4)
    with pytest.raises(ValueError, match="seqlen_k must be >= 0"):
        dense_mask(torch.zeros(0, dtype=torch.int32), seqlen_k=-1)
    with pytest.raises(ValueError, match="1-D"):
        dense_mask(torch.ones((2, 2), dtype=torch.int32))
    with pytest.raises(TypeError, match="integer"):
        dense_mask(torch.ones(2))


# --- pictures -----------------------------------------------------------------------------------------


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.mark.parametrize("scheme", SCHEMES)
def test_save_mask_picture(tmp_path: Path, scheme: str) -> None:
    pytest.importorskip("matplotlib")
    from ism_ext.viz import save_mask_picture

    turns = [("system", 20), ("user", 30), ("assistant", 60), ("user", 15), ("assistant", 40)]
    out = save_mask_picture(turns, scheme, tmp_path / "sub" / f"{scheme}.png")
    assert out == tmp_path / "sub" / f"{scheme}.png"
    assert out.stat().st_size > 5_000
    width, height = png_size(out)
    assert abs(width - 600) <= 4 and abs(height - 640) <= 4


def test_save_mask_picture_title_and_large_dialogue(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from ism_ext.viz import save_mask_picture

    turns = [("system", 100)] + [("user", 80), ("assistant", 240)] * 6
    out = save_mask_picture(turns, "ism", str(tmp_path / "big.png"), title="ISM, 2000 tokens")
    assert out.stat().st_size > 5_000
    assert png_size(out) == (600, 640)


def test_mask_picture_pixels_show_the_mask(tmp_path: Path) -> None:
    mpl_image = pytest.importorskip("matplotlib.image")
    from ism_ext.viz import save_mask_picture

    # The upper-right corner is masked under causal and allowed under prefix_lm (one block): compare a
    # pixel there (image interior, away from lines and labels).
    turns = [("user", 100), ("assistant", 1)]
    causal = mpl_image.imread(save_mask_picture(turns, "causal", tmp_path / "c.png"))
    prefix = mpl_image.imread(save_mask_picture(turns, "prefix_lm", tmp_path / "p.png"))
    # Axes span x in [0.1, 0.95] and y in [0.12, 0.90] of a 600 x 640 figure; probe near the top right.
    row, col = int(640 * (1 - 0.88)), int(600 * 0.90)
    assert causal[row, col, :3].min() > 0.95  # white: masked
    assert prefix[row, col, :3].min() < 0.9  # coloured: allowed


def test_save_scheme_comparison(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from ism_ext.viz import save_scheme_comparison

    out = save_scheme_comparison(ADJACENT * 10, tmp_path / "cmp.png")
    assert out.stat().st_size > 5_000
    width, height = png_size(out)
    assert abs(width - 400 * len(SCHEMES)) <= 4 and abs(height - 460) <= 4

    two = save_scheme_comparison(DIALOGUE, tmp_path / "two.png", schemes=("ism", "mas"))
    assert abs(png_size(two)[0] - 800) <= 4


def test_picture_errors(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from ism_ext.viz import save_mask_picture, save_scheme_comparison

    with pytest.raises(ValueError, match="unknown scheme"):
        save_mask_picture(DIALOGUE, "nope", tmp_path / "x.png")
    with pytest.raises(ValueError, match="unknown scheme"):
        save_scheme_comparison(DIALOGUE, tmp_path / "x.png", schemes=("ism", "nope"))
    with pytest.raises(ValueError, match="no tokens"):
        save_mask_picture([("user", 0)], "ism", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
