"""The Hopper forward kernel's plan, on the CPU: the C++ the kernel takes its decisions from
(csrc/cuda/hopper_fwd_plan.h), run through ism._hopper_fwd_plan / _hopper_fwd_loads /
_hopper_fwd_pingpong: test-only ops (tests/cpp/hopper_fwd_plan_op.cpp) compiled on first use, on any build.

- The tile rule: against the dense mask of random layouts (every scheme, varlen batches, more keys than
  queries, GQA, lengths on the 128-row/128-key tile edges), each block visits every key tile that holds
  a visible pair and no tile past the last one, runs unmasked only tiles that every row of it sees
  entirely, and masks every other visited tile; the visited tiles come last-to-first, masked ones first.
- The grid: every (sequence, head, query tile) with rows exactly once, the heaviest (last) query tiles
  first, heads fastest, and every other block exits at once.
- The pipelines: the producer's loads and the consumers' waits of the kernel's loop, simulated with
  mbarrier phase semantics, never deadlock, never overwrite a stage before both consumer warpgroups
  released it, and always hand each iteration its own tiles.
- The ping-pong: the two consumer warpgroups' wgmma windows alternate, every bar.sync meets exactly one
  bar.arrive, no barrier ever holds two pending arrivals, and none is left half-arrived.
"""

from __future__ import annotations

import pathlib
import random

import pytest
import torch
from reference import make_case
from torch.utils.cpp_extension import load

import ism_ext  # noqa: F401  (registers torch.ops.ism)

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def _plan_ops():
    """Compiles and loads the test-only plan ops once per session (they register into torch.ops.ism)."""
    if not hasattr(torch.ops.ism, "_hopper_fwd_plan"):
        load(name="ism_ext_hopper_plan_test_ops", sources=[str(ROOT / "tests" / "cpp" / "hopper_fwd_plan_op.cpp")],
             extra_include_paths=[str(ROOT / "csrc" / "cuda"), str(ROOT / "csrc")], extra_cflags=["-O2", "-std=c++17"],
             is_python_module=False, verbose=False)

BLOCK_M = BLOCK_N = 128
FIELDS = ["block", "m_tile", "head", "seq", "kv_head", "q_row0", "rows", "min_limit", "max_limit", "n_tiles",
          "n_masked", "past_end"]


def _plan(case, head_dim: int, max_seqlen_q: int | None = None) -> list[dict[str, int]]:
    h_q, h_kv = case.q.shape[1], case.k.shape[1]
    lens = (case.cu_seqlens_q[1:] - case.cu_seqlens_q[:-1]).tolist()
    longest = max(lens, default=0) if max_seqlen_q is None else max_seqlen_q
    rows = torch.ops.ism._hopper_fwd_plan(case.kv_limit, case.cu_seqlens_q, case.cu_seqlens_k, h_q, h_kv, longest,
                                          head_dim)
    return [dict(zip(FIELDS, r, strict=True)) for r in rows.tolist()]


def _check_plan(case, head_dim: int) -> None:
    h_q, h_kv = case.q.shape[1], case.k.shape[1]
    cu_q, cu_k = case.cu_seqlens_q.tolist(), case.cu_seqlens_k.tolist()
    batch = len(cu_q) - 1
    lens_q = [cu_q[i + 1] - cu_q[i] for i in range(batch)]
    longest = max(lens_q, default=0)
    m_tiles = -(-longest // BLOCK_M)
    plan = _plan(case, head_dim)
    assert len(plan) == m_tiles * h_q * batch
    seen = set()
    for i, b in enumerate(plan):
        assert b["block"] == i
        # Launch order: tile-major from the last query tile down, heads fastest, then sequences.
        assert b["m_tile"] == m_tiles - 1 - i // (h_q * batch)
        assert b["head"] == i % h_q and b["seq"] == (i % (h_q * batch)) // h_q
        seq, row0 = b["seq"], b["m_tile"] * BLOCK_M
        if row0 >= lens_q[seq]:
            assert b["past_end"] == 1
            continue
        assert b["past_end"] == 0
        key = (seq, b["head"], b["m_tile"])
        assert key not in seen
        seen.add(key)
        assert b["kv_head"] == b["head"] // (h_q // h_kv)
        assert b["q_row0"] == cu_q[seq] + row0 and b["rows"] == min(BLOCK_M, lens_q[seq] - row0)
        seqlen_k = cu_k[seq + 1] - cu_k[seq]
        limits = case.kv_limit[b["q_row0"]:b["q_row0"] + b["rows"]].clamp(0, seqlen_k).tolist()
        assert b["min_limit"] == min(limits) and b["max_limit"] == max(limits)
        n, n_masked = b["n_tiles"], b["n_masked"]
        assert 0 <= n_masked <= n
        # The dense rule, tile by tile: which key tiles hold a visible pair, which every row sees whole.
        visible_tiles = {j // BLOCK_N for lim in limits for j in range(lim)}
        assert set(range(n)) >= visible_tiles, "a key tile with a visible pair is not visited"
        if n > 0:
            assert n - 1 in visible_tiles, "the last visited key tile holds no visible pair"
        for it in range(n):
            tile = n - 1 - it  # iterations walk the tiles from the last to the first
            full = all((tile + 1) * BLOCK_N <= lim for lim in limits)
            masked = it < n_masked
            assert masked == (not full), f"tile {tile}: masked={masked}, but every row sees it whole={full}"
    expected = {(s, h, m) for s in range(batch) for h in range(h_q) for m in range(-(-lens_q[s] // BLOCK_M))}
    assert seen == expected


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("scheme", ["ism", "mas", "prefix_lm", "causal", "random", "full", "empty"])
def test_tile_rule_on_layouts(scheme, head_dim):
    case = make_case([700, 128, 129, 3, 0, 257], [700, 128, 300, 3, 5, 1000], heads_q=4, heads_kv=2,
                     head_dim=head_dim, limits=scheme, seed=len(scheme))
    _check_plan(case, head_dim)


@pytest.mark.parametrize("seed", range(30))
def test_tile_rule_on_random_varlen_batches(seed):
    rng = random.Random(seed)
    batch = rng.randint(1, 5)
    edges = [1, 127, 128, 129, 255, 256, 257, 383, 384, 385]
    lens_q = [rng.choice([rng.randint(0, 900), rng.choice(edges)]) for _ in range(batch)]
    lens_k = [lq + (rng.randint(0, 400) if rng.random() < 0.4 else 0) for lq in lens_q]
    group = rng.choice([1, 2, 4])
    case = make_case(lens_q, lens_k, heads_q=4, heads_kv=4 // group, head_dim=8,
                     limits=rng.choice(["ism", "mas", "causal", "random", "full", "empty"]), seed=seed)
    _check_plan(case, rng.choice([64, 128]))


def test_plan_with_a_larger_max_seqlen_hint_adds_only_exiting_blocks():
    case = make_case([300, 17], [310, 400], heads_q=2, head_dim=8, limits="ism", seed=3)
    exact, larger = _plan(case, 128), _plan(case, 128, max_seqlen_q=1000)
    live = [b for b in larger if not b["past_end"]]
    key = ("seq", "head", "m_tile", "min_limit", "max_limit", "n_tiles", "n_masked")
    assert sorted(tuple(b[k] for k in key) for b in live) == sorted(
        tuple(b[k] for k in key) for b in exact if not b["past_end"])


def test_heavy_tiles_start_first_under_causal_and_ism():
    # Under causal and ISM layouts the key tiles a query tile visits never decrease with its index, so
    # the launch order (last query tiles first) starts every (sequence, head) with its heaviest tile.
    for scheme in ("causal", "ism"):
        case = make_case([2048, 1500], heads_q=2, head_dim=8, limits=scheme, seed=1)
        plan = [b for b in _plan(case, 128) if not b["past_end"]]
        for seq in (0, 1):
            for head in (0, 1):
                work = [b["n_tiles"] for b in plan if b["seq"] == seq and b["head"] == head]
                assert work == sorted(work, reverse=True) and work[0] > work[-1]


def test_out_of_range_limits_are_clamped_like_the_kernel():
    case = make_case([200], [150], heads_q=1, head_dim=8, limits="random", seed=2)
    case.kv_limit[::3] = -5
    case.kv_limit[1::3] = 10_000
    for b in _plan(case, 64):
        if not b["past_end"]:
            assert 0 <= b["min_limit"] <= b["max_limit"] <= 150


# ---- The pipelines and the ping-pong, simulated.

def _consumer_program(wg: int, n: int) -> list[tuple]:
    """The kernel's consumer loop (hopper_fwd_kernel.cuh, step 3) as the barrier operations it does."""
    prog: list[tuple] = []
    if n == 0:
        return prog
    prog += [("wait_full", "K", 0), ("sync", wg, 0), ("arrive", wg, 0), ("release", "K", 0)]
    for i in range(1, n):
        prog += [("wait_full", "K", i), ("sync", wg, i), ("wait_full", "V", i - 1), ("arrive", wg, i),
                 ("release", "K", i), ("release", "V", i - 1)]
    prog += [("wait_full", "V", n - 1), ("sync", wg, n), ("arrive", wg, n), ("release", "V", n - 1)]
    return prog


def _simulate(n: int, rng: random.Random) -> list[int]:
    """Runs the producer and both consumer warpgroups to completion under mbarrier and named-barrier
    semantics, in a random interleaving; returns the order in which the wgmma windows were issued."""
    loads = torch.ops.ism._hopper_fwd_loads(n).tolist()
    pingpong = torch.ops.ism._hopper_fwd_pingpong(n).tolist()
    stages = 1 + max((s for _, _, s, _, _ in loads), default=0)
    windows = len(pingpong[0]) - 1
    assert windows == (n + 1 if n else 0)
    kinds = {0: "K", 1: "V"}
    # (kind, iteration) -> (stage, full parity), from the producer's table (the consumers use the same
    # functions of the iteration).
    where = {(kinds[k], it): (s, fp) for k, it, s, _, fp in loads}
    producer = []
    for k, it, s, ep, _ in loads:
        producer += [("wait_empty", kinds[k], it, s, ep), ("fill", kinds[k], it, s)]
    progs = {"P": producer, 0: _consumer_program(0, n), 1: _consumer_program(1, n)}
    for wg in (0, 1):
        if pingpong[wg][0]:
            progs[wg].insert(0, ("head_start", wg))
    pc = dict.fromkeys(progs, 0)
    full = {(k, s): 0 for k in "KV" for s in range(stages)}  # completed phases
    empty = {(k, s): 0 for k in "KV" for s in range(stages)}
    empty_arrivals = {(k, s): 0 for k in "KV" for s in range(stages)}
    content = {(k, s): None for k in "KV" for s in range(stages)}
    released = {}  # (kind, iteration) -> consumer warpgroups done with it
    pending = {0: 0, 1: 0}  # named barrier of warpgroup w: arrivals waiting for w's bar.sync
    order: list[int] = []

    def step(actor) -> bool:
        op = progs[actor][pc[actor]]
        if op[0] == "wait_empty":
            _, kind, it, s, parity = op
            if empty[(kind, s)] % 2 == parity:  # phase of that parity not complete yet
                return False
            prev = content[(kind, s)]
            assert prev is None or released.get((kind, prev), 0) == 2, "stage refilled before both released it"
        elif op[0] == "fill":
            _, kind, it, s = op
            content[(kind, s)] = it
            full[(kind, s)] += 1
        elif op[0] == "wait_full":
            _, kind, it = op
            s, parity = where[(kind, it)]
            if full[(kind, s)] % 2 == parity:
                return False
            assert content[(kind, s)] == it, f"{kind} stage {s} holds iteration {content[(kind, s)]}, not {it}"
        elif op[0] == "release":
            _, kind, it = op
            s, _ = where[(kind, it)]
            released[(kind, it)] = released.get((kind, it), 0) + 1
            empty_arrivals[(kind, s)] += 1
            if empty_arrivals[(kind, s)] == 2:  # both warpgroups: the empty barrier completes a phase
                empty_arrivals[(kind, s)] = 0
                empty[(kind, s)] += 1
        elif op[0] == "head_start":
            pending[0] += 1
            assert pending[0] <= 1
        elif op[0] == "sync":
            _, wg, _ = op
            if pending[wg] == 0:
                return False
            pending[wg] -= 1
            order.append(wg)
        elif op[0] == "arrive":
            _, wg, window = op
            if pingpong[wg][1 + window]:
                pending[1 - wg] += 1
                assert pending[1 - wg] <= 1, "two arrivals pending on one named barrier"
        pc[actor] += 1
        return True

    while any(pc[a] < len(progs[a]) for a in progs):
        actors = [a for a in progs if pc[a] < len(progs[a])]
        rng.shuffle(actors)
        assert any(step(a) for a in actors), f"deadlock at n={n}: {pc}"
    assert pending == {0: 0, 1: 0}, "a named barrier is left half-arrived"
    assert all(released.get((k, it), 0) == 2 for k in "KV" for it in range(n))
    return order


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 8, 17])
def test_pipelines_and_pingpong_never_deadlock(n):
    for trial in range(20):
        order = _simulate(n, random.Random(trial * 100 + n))
        windows = n + 1 if n else 0
        assert order == [w for _ in range(windows) for w in (0, 1)], "the windows must alternate 0, 1, 0, 1"


def test_producer_issues_loads_in_the_consumers_order():
    for n in (1, 2, 5):
        loads = torch.ops.ism._hopper_fwd_loads(n).tolist()
        seq = [("KV"[k], it) for k, it, *_ in loads]
        expected = [("K", 0)] + [x for i in range(1, n) for x in (("K", i), ("V", i - 1))] + [("V", n - 1)]
        assert seq == expected
        assert all(s == it % 2 and fp == (it // 2) % 2 and ep == 1 - fp for _, it, s, ep, fp in loads)
