"""`python -m ism_ext ops`: the masks of a sample dialogue, their pictures, and the op at work.

1. Prints the ISM and MAS layouts of a small dialogue (segment ids, kv_limit, the mask as text).
2. Saves mask pictures (PNG) of that dialogue and of an 8-round one under ``--out``.
3. Runs `segment_attention` (forward and forward+backward) on an 8-round ISM dialogue, checks it
   against float64 attention with the dense mask (PyTorch's own SDPA, an independent
   implementation) and times it against SDPA with that dense boolean mask.
"""

from __future__ import annotations

import argparse
import pathlib
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..masks import dense_mask, kv_limit_for_turns, rounds_dialogue, segment_ids_for_turns, turn_boundaries
from ..ops import segment_attention
from ..perf import median_ms

# A short dialogue where ISM and MAS differ: the user sends two messages in a row before the answer.
SAMPLE_TURNS: list[tuple[str, int]] = [
    ("system", 5), ("user", 6), ("assistant", 6), ("user", 3), ("user", 4), ("assistant", 5),
]


def mask_as_text(turns: Sequence[tuple[str, int]], scheme: str) -> str:
    """The dense mask of a small layout as text: '#' = may attend, '.' = masked, '|' = turn edge."""
    mask = dense_mask(kv_limit_for_turns(turns, scheme))
    edges = set(turn_boundaries(turns)[1:-1])
    lines = []
    for i, row in enumerate(mask.tolist()):
        if i in edges:
            lines.append("-" * (len(row) + len(edges)))
        cells = "".join(("|" if j in edges else "") + ("#" if a else ".") for j, a in enumerate(row))
        lines.append(cells)
    return "\n".join(lines)


def check_and_time(tokens: int, heads: int, heads_kv: int, head_dim: int, dtype: torch.dtype,
                   repeats: int) -> dict[str, float]:
    """Error against float64 dense attention, and timings of segment_attention vs SDPA + dense mask.

    Raises ValueError when ``tokens`` is too few for the 8-round dialogue (one token per turn at least).
    """
    if tokens < MIN_TOKENS:
        raise ValueError(f"tokens must be at least {MIN_TOKENS} (a system turn and {ROUNDS} rounds), got {tokens}")
    gen = torch.Generator().manual_seed(0)
    kv_limit = kv_limit_for_turns(rounds_dialogue(tokens, ROUNDS), "ism")
    q = torch.randn(1, tokens, heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(1, tokens, heads_kv, head_dim, generator=gen).to(dtype)
    v = torch.randn(1, tokens, heads_kv, head_dim, generator=gen).to(dtype)
    mask = dense_mask(kv_limit)

    out = segment_attention(q, k, v, kv_limit[None])
    group = heads // heads_kv
    qt, kt, vt = (x.double().transpose(1, 2) for x in (q, k, v))
    ref = F.scaled_dot_product_attention(qt, kt.repeat_interleave(group, 1), vt.repeat_interleave(group, 1),
                                         attn_mask=mask).transpose(1, 2)
    err = (out.double() - ref).abs().max().item()

    qs, ks, vs = (x.transpose(1, 2) for x in (q, k, v))
    ms_ism = median_ms(lambda: segment_attention(q, k, v, kv_limit[None]), repeats)
    ms_sdpa = median_ms(lambda: F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=True),
                         repeats)
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    ms_ism_bwd = median_ms(lambda: segment_attention(qg, kg, vg, kv_limit[None]).sum().backward(), repeats)
    qg2, kg2, vg2 = (x.transpose(1, 2).clone().requires_grad_() for x in (q, k, v))
    ms_sdpa_bwd = median_ms(
        lambda: F.scaled_dot_product_attention(qg2, kg2, vg2, attn_mask=mask, enable_gqa=True).sum().backward(),
        repeats)
    return {"max_err": err, "ism_fwd": ms_ism, "sdpa_fwd": ms_sdpa, "ism_fwd_bwd": ms_ism_bwd,
            "sdpa_fwd_bwd": ms_sdpa_bwd}


def run(out_dir: pathlib.Path, tokens: int, repeats: int) -> None:
    """Runs the whole demo, printing to stdout and writing pictures into `out_dir`."""
    print("ism_ext ops: segment-masked attention (ISM / MAS)\n")
    print("Sample dialogue (role, tokens):", SAMPLE_TURNS)
    for scheme in ("ism", "mas"):
        ids = segment_ids_for_turns(SAMPLE_TURNS, scheme)
        lim = kv_limit_for_turns(SAMPLE_TURNS, scheme)
        print(f"\n[{scheme}] segment ids (-1 = causal): {ids.tolist()}")
        print(f"[{scheme}] kv_limit (row i sees keys j < kv_limit[i]): {lim.tolist()}")
        print(mask_as_text(SAMPLE_TURNS, scheme))

    try:
        from ..viz import save_mask_picture, save_scheme_comparison
    except ImportError as exc:  # matplotlib is optional for the library, not for the pictures
        print(f"\n(no pictures: {exc})")
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = [save_mask_picture(SAMPLE_TURNS, s, out_dir / f"sample_mask_{s}.png") for s in ("ism", "mas")]
        paths.append(save_scheme_comparison(rounds_dialogue(512), out_dir / "schemes_8_rounds.png"))
        print("\nPictures:", *[str(p) for p in paths], sep="\n  ")

    print(f"\nsegment_attention on an 8-round ISM dialogue, {tokens} tokens, 8 q heads / 2 kv heads, head dim 64,"
          f" {torch.get_num_threads()} CPU threads; error vs float64 dense attention, median of {repeats} runs:")
    header = f"{'dtype':>9} {'max err':>9} {'fwd ms':>8} {'sdpa+mask':>10} {'fwd+bwd ms':>11} {'sdpa+mask':>10}"
    print(header)
    for dtype in (torch.float32, torch.bfloat16):
        r = check_and_time(tokens, 8, 2, 64, dtype, repeats)
        print(f"{str(dtype).replace('torch.', ''):>9} {r['max_err']:9.2e} {r['ism_fwd']:8.2f} {r['sdpa_fwd']:10.2f}"
              f" {r['ism_fwd_bwd']:11.2f} {r['sdpa_fwd_bwd']:10.2f}")


ROUNDS = 8  # rounds of the timed dialogue
MIN_TOKENS = 2 * ROUNDS + 1  # a system turn and 8 (user, assistant) rounds of at least one token each


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an int >= ``minimum`` (argparse then names the option in its error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry of the demo."""
    parser = argparse.ArgumentParser(prog="python -m ism_ext ops", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("demo_out"), help="folder for the PNGs")
    parser.add_argument("--tokens", type=_int_at_least(MIN_TOKENS), default=2048,
                        help=f"tokens of the timed {ROUNDS}-round dialogue (at least {MIN_TOKENS})")
    parser.add_argument("--repeats", type=_int_at_least(1), default=5, help="timed runs per measurement")
    args = parser.parse_args(argv)
    run(args.out, args.tokens, args.repeats)
