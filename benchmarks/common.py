"""Shared pieces of the benchmarks: layouts, FLOP counting, timing, memory, and result records.

FLOPs follow FlashAttention's convention (docs/performance.md): only visible (query, key) pairs count,
forward = 4 * head_dim * q_heads * pairs, backward = 2.5 x forward. Layouts come from
`ism_ext.masks.rounds_dialogue` and timings from `ism_ext.perf` (`median_ms`, and `interleaved_median_ms` where
implementations are compared), as in `python -m ism_ext bench`.
"""

from __future__ import annotations

import ctypes
import gc
import json
import pathlib
import platform
import subprocess
from collections.abc import Callable
from typing import Any

import torch

from ism_ext.masks import kv_limit_for_turns, rounds_dialogue

# The benchmarks' timers: the package's one timer (ism_ext.perf).
from ism_ext.perf import interleaved_median_ms, median_ms  # noqa: F401

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def layout_kv_limit(scheme: str, tokens: int) -> torch.Tensor:
    """kv_limit of an 8-round dialogue of `tokens` tokens under `scheme`."""
    return kv_limit_for_turns(rounds_dialogue(tokens), scheme)


def visible_pairs(kv_limit: torch.Tensor) -> int:
    """Number of (query, key) pairs the mask lets through (one head, one sequence or a batch)."""
    return int(kv_limit.long().sum())


# FLOPs of each timed pass in units of the forward's (docs/performance.md): the backward counts 2.5 forwards.
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}


def attention_flops(kv_limit: torch.Tensor, heads_q: int, head_dim: int, bench: str) -> float:
    """FLOPs of attention over the visible pairs for the pass `bench`: fwd, bwd or fwd_bwd."""
    return 4.0 * head_dim * heads_q * visible_pairs(kv_limit) * FLOP_FACTOR[bench]


class CpuPeakMemory:
    """Peak resident memory that a call adds, from Linux's VmHWM (reset through clear_refs).

    glibc is told to serve every block over 128 KiB with mmap and to never raise that threshold, so
    freed tensors leave the resident set and the baseline before each call is honest.
    """

    def __init__(self) -> None:
        self.available = platform.system() == "Linux"
        if self.available:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: fixed, disables the dynamic threshold
            self._trim = libc.malloc_trim

    @staticmethod
    def _status_kb(field: str) -> int:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise RuntimeError(f"{field} not in /proc/self/status")

    def measure_mb(self, fn: Callable[[], Any]) -> float | None:
        """MB of resident memory above the pre-call level at the call's peak (None off Linux)."""
        if not self.available:
            return None
        gc.collect()
        self._trim(0)
        pathlib.Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        before = self._status_kb("VmRSS")
        result = fn()
        peak = self._status_kb("VmHWM")
        del result
        return max(0.0, (peak - before) / 1024.0)


def git_commit() -> str:
    """Short hash of HEAD (with '+dirty' when the tree has changes), or 'unknown'."""
    root = pathlib.Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        # Results written by earlier benchmarks of the same run (benchmarks/results/) do not make the code dirty.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results"], cwd=root, capture_output=True, text=True,
                               check=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# The CPU flags that decide which instructions the op's kernels and PyTorch's can use.
ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")


def cpu_identity() -> dict[str, Any]:
    """`device` (the model name), `cpu_id` (vendor, family and model: "AMD EPYC" alone names several
    generations) and `cpu_flags` (those of ISA_FLAGS the CPU has), from the first processor in /proc/cpuinfo;
    empty where there is none."""
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    found = {}
    if "model name" in fields:
        found["device"] = fields["model name"]
    if "vendor_id" in fields:
        family, model = fields.get("cpu family", "?"), fields.get("model", "?")
        found["cpu_id"] = f"{fields['vendor_id']} family {family} model {model}"
    if "flags" in fields:
        have = set(fields["flags"].split())
        found["cpu_flags"] = [flag for flag in ISA_FLAGS if flag in have]
    return found


def environment() -> dict[str, Any]:
    """Fields every record carries: device (with the CPU's identity and instruction-set flags, cpu_identity),
    threads, torch and CUDA versions, commit, and the CPU instruction sets that ran: torch's (`cpu_capability`)
    and the op's CPU kernels' (`kernel_isa`)."""
    import ism_ext  # noqa: F401  (registers torch.ops.ism)

    env = {
        "device": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "commit": git_commit(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "kernel_isa": torch.ops.ism.cpu_kernel_isa(),
    }
    env.update(cpu_identity())
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def write_records(name: str, records: list[dict[str, Any]]) -> pathlib.Path:
    """Writes `records` to benchmarks/results/<name>.json and returns the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(records, indent=1) + "\n")
    return path


def save_impl_bars(series: dict[str, list[float]], labels: list[str], ylabel: str, title: str, path,
                   note_ratio: tuple[str, str] | None = None) -> None:
    """Grouped bars (log scale), one group per case `labels[i]` and one bar per impl of `series`; with
    `note_ratio` = (a, b), each group is annotated with series[b] / series[a] (a's speedup when lower is better)."""
    from matplotlib.figure import Figure

    from ism_ext.viz import save_figure

    fig = Figure(figsize=(max(6.5, 1.1 * len(labels) + 2), 4.2), dpi=110)
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    for k, (impl, values) in enumerate(series.items()):
        offset = (k - (len(series) - 1) / 2) * width
        ax.bar([i + offset for i in range(len(labels))], values, width, label=impl)
    if note_ratio is not None:
        a, b = note_ratio
        for i, (va, vb) in enumerate(zip(series[a], series[b], strict=True)):
            ax.annotate(f"{vb / va:.2f}x", (i, max(va, vb)), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(labels)), labels=labels, fontsize=7)
    ax.set(ylabel=ylabel, yscale="log", title=title)
    ax.grid(alpha=0.3, axis="y", which="both")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
