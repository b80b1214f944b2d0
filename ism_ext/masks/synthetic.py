"""Synthetic dialogue layouts of a given size, for benchmarks, the `bench` command and the `ops` demo."""

from __future__ import annotations

__all__ = ["rounds_dialogue"]


def rounds_dialogue(tokens: int, rounds: int = 8) -> list[tuple[str, int]]:
    """A system prompt and ``rounds`` (user, assistant) rounds, ``tokens`` tokens in all.

    Every turn has ``tokens // (2 * rounds + 1)`` tokens (at least 1); the last answer takes the rest, so
    the turns add up to ``tokens`` exactly (for ``tokens >= 2 * rounds + 1``). Roles and lengths only:
    feed them to :func:`ism_ext.masks.kv_limit_for_turns` with a scheme.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    unit = max(1, tokens // (2 * rounds + 1))
    turns = [("system", unit)] + [("user", unit), ("assistant", unit)] * rounds
    turns[-1] = ("assistant", tokens - unit * 2 * rounds)
    return turns
