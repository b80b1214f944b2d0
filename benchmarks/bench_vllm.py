"""Serving on vLLM's CPU build with the project's plugin (ism_ext.integrations.vllm): multi-round chat time to first
token, concurrent chats, and the project's attention op against vLLM's own CPU attention.

    python benchmarks/bench_vllm.py                          # every stage -> results/vllm_{chat,throughput,backend}.*
    python benchmarks/bench_vllm.py --stages chat,backend --repeats 7
    python benchmarks/bench_vllm.py --quick                  # smoke run: tiny sizes, 1 repeat (~3 minutes)

The full run takes roughly 30 minutes on 2 cores (one pinned worker thread: chat ~7, concurrency ~9, backend
~11, engine starts); every stage is faster with more cores.

Model: SmolLM2-135M-Instruct with the shipped ISM adapter merged, float32, the folder that
`ism_ext.integrations.vllm.models.export_model_dir` writes once (offline: HF_HUB_OFFLINE=1 is set here). Each
stage writes a JSON list of records (`common.write_records`, with device, commit and torch from
`common.environment`) and a PNG beside it. A timing is the median of `--repeats` timed runs after one untimed
warm-up run, as `ism_ext.perf.median_ms` does (here written out, since a run needs untimed set-up around it).

Stages (`--stages`, comma-separated, default all):

chat -> vllm_chat.json/.png (bench="vllm_chat"). One chat of `--rounds` rounds, user turns of `--min-turn` ..
    `--max-turn` tokens (fixed random lengths, the same texts as benchmarks/bench_chat.py and for every impl), each
    answered with `--answer` greedy tokens (ignore_eos), through `LLM.chat` (the project's renderer) on one ISM
    engine with prefix caching. impls = the request's scheme: ism (user/system turns bidirectional, answers
    causal: the history's cached blocks keep their layout, so they are reused), prefix_lm (the whole history
    one bidirectional block: its layout changes every round, so nothing is reused and every round is
    recomputed), causal (reused). A round's TTFT must be taken with the cache as a real chat leaves it: every
    earlier round's prompt AND answer cached, this round's prompt not. So a timed repeat is one whole chat from
    an empty cache (`reset_prefix_cache`), and each round is sent twice: first timed with max_tokens=1 (its
    time to first token: the prefill of what is not cached, plus one token), then again untimed with the full
    answer, which finds its own prompt cached by the timed request (only the last, partial block is
    recomputed) and leaves the answer's full blocks cached, exactly what a real round leaves. The timed request
    cannot be repeated in place (it has cached its own prompt), and the alternative, replaying rounds 1..r-1
    from an empty cache before each timing of round r, costs O(rounds^2) prefill per repeat instead of one
    chat's. The first chat of each impl is the warm-up; its answers become the history of every later
    repeat (a later repeat's answer must equal it, else the record counts an answer mismatch). Repeats of the
    three impls are interleaved, so drift of a busy machine is shared. ttft_ms is the wall-clock of the
    `LLM.chat` call (rendering included, what a caller waits for); engine_ttft_ms is vLLM's own
    RequestOutput.metrics.first_token_latency (arrival in the engine to first token). cached_tokens is vLLM's
    num_cached_tokens: checked > 0 for ism and causal from round 2 on, and 0 for prefix_lm. Goal (the issue):
    the last round's ISM TTFT at least 5x faster than prefix_lm's and within 10% of causal's.

concurrency -> vllm_throughput.json/.png (bench="vllm_throughput", its own file so that each stage can be rerun
    alone). `--conc-rounds` rounds of N concurrent chats (N in `--concurrency`), each round one batched
    `LLM.chat` of the N conversations (all N arrive at once, a burst), answers of `--conc-answer` tokens; impls
    ism and causal (scheme of every request). Over rounds 2.. (every chat has its history cached): output
    tokens/s = generated tokens / wall time of those rounds, and TTFT p50/p99 over all their requests from
    RequestOutput.metrics.first_token_latency (needs disable_log_stats=False, set for every engine here;
    it works in vLLM 0.32). tokens/s is the median over `--conc-repeats` sessions (each from an empty cache,
    after a warm-up session), the TTFT percentiles pool the requests of every timed session.

backend -> vllm_backend.json/.png (bench="vllm_backend"). CAUSAL token prompts (no ranges, random tokens), the same
    model: impl ism_op (an engine with additional_config={"ism": {}}: attention by ism::attn_with_kvcache) vs
    vllm_cpu_attn (an engine without it: vLLM's own CPU attention), one engine after the other in this process.
    phase prefill: tokens/s of `--prefill-lens` prompts at batch `--prefill-batches` (wall time of generate with
    max_tokens=1 after `reset_prefix_cache`; no token cached, checked). phase decode: tokens/s of decode steps
    at batch `--decode-batches` over a `--decode-context`-token prompt, step time = (t(N tokens) - t(1 token))
    / (N - 1) with N = `--decode-tokens`, each t the median of repeats (prompts cached after the warm-up, so
    both calls prefill the same last block, which cancels). Goal: ism_op / vllm_cpu_attn >= 1.0 on prefill and
    >= 0.9 on decode.

Engine configuration (the same for every stage and impl, recorded in every record): vLLM's default multiprocess
engine, as `vllm serve` runs it (frontend, engine-core and worker processes, `executor`), with its default
OpenMP binding (VLLM_CPU_OMP_THREADS_BIND=auto): the worker's threads are pinned one per physical core, and one
core is left to the engine core and this frontend process. `worker_threads` / `worker_cpus` are read from the
worker process itself; `cpu_threads` is the worker's thread count. Why: in-process engines
(VLLM_ENABLE_V1_MULTIPROCESSING=0, executor "uni") put the busy scheduler loop and the frontend on the cores the
OpenMP threads compute on; with OMP_NUM_THREADS=2 on 2 cores vLLM's own CPU attention then ran pathologically
slowly (decode ~2 tok/s), which would flatter the project's op, and OMP_NUM_THREADS=1 in-process is a
setting no deployment uses. The multiprocess engine is what users run, and it gives both backends the same
pinned threads. enforce_eager=True (default): vLLM's torch.compile warm-up (30-60 s per engine start) is
skipped, and the model runs the same eager PyTorch around either attention kernel, so the comparison isolates
attention; `--compile` runs vLLM's compiled default instead (both impls alike). Also: dtype float32, prefix
caching on (the backend's prefill timings reset it first), VLLM_CPU_KVCACHE_SPACE=2 GiB unless set,
max_model_len = max_num_batched_tokens = 8192 (an ISM span must fit one step: prefix_lm's span is the whole
history), vLLM's default block size (128 tokens on the CPU).
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

from common import environment, save_impl_bars, write_records
from tqdm import tqdm

MODEL = "SmolLM2-135M-Instruct+ism-adapter"
STAGES = ("chat", "concurrency", "backend")
CHAT_IMPLS = ("ism", "prefix_lm", "causal")
CONC_IMPLS = ("ism", "causal")
BACKEND_IMPLS = {"ism_op": {"ism": {}}, "vllm_cpu_attn": None}  # impl -> additional_config
# vLLM's switches for this benchmark, unless the caller set them: offline, a KV cache that fits a laptop, quiet.
ENGINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "2",
              "VLLM_LOGGING_LEVEL": "WARNING"}


def check(condition: bool, message: str) -> None:
    """RuntimeError(message) unless `condition` (a measurement that would be wrong must not be written)."""
    if not condition:
        raise RuntimeError(message)


def median_s(run: Callable[[], float], repeats: int, setup: Callable[[], None] | None = None) -> float:
    """Median of `repeats` values of `run()` (seconds it measured itself) after one untimed warm-up run;
    `setup()` runs untimed before each."""
    times = []
    for i in range(repeats + 1):
        if setup is not None:
            setup()
        t = run()
        if i:
            times.append(t)
    return statistics.median(times)


def percentile(values: list[float], q: float) -> float:
    """The `q`-quantile (0..1) of `values`, linear between order statistics."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


# ----------------------------------------------------------------------------------------------- engines


class Engine:
    """One vLLM engine (`vllm.LLM`) in the benchmark's configuration; `close()` stops its processes."""

    def __init__(self, model_dir: str, additional_config: dict | None, args: argparse.Namespace) -> None:
        from vllm import LLM

        kwargs: dict[str, Any] = dict(model=model_dir, dtype="float32", enforce_eager=not args.compile,
                                      enable_prefix_caching=True, max_model_len=args.max_model_len,
                                      max_num_batched_tokens=args.max_model_len, disable_log_stats=False, seed=0)
        if additional_config is not None:
            kwargs["additional_config"] = additional_config
        self.additional_config = additional_config
        self.llm = LLM(**kwargs)
        self.llm.generate([{"prompt_token_ids": [200] * 64}], self.params(4), use_tqdm=False)  # warm-up
        self.config = self._describe()

    @staticmethod
    def params(max_tokens: int, scheme: str | None = None):
        """Greedy sampling of exactly `max_tokens` tokens, with the chat request's ISM scheme if given."""
        from vllm import SamplingParams

        extra = {"ism_scheme": scheme} if scheme is not None else None
        return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, extra_args=extra)

    def _describe(self) -> dict[str, Any]:
        """The engine's configuration as record fields."""
        import vllm
        from vllm import envs

        cfg = self.llm.llm_engine.vllm_config
        multiprocessing = bool(envs.VLLM_ENABLE_V1_MULTIPROCESSING)
        worker = _worker_process()
        return {
            "vllm": vllm.__version__,
            "engine_multiprocessing": multiprocessing,
            "executor": str(cfg.parallel_config.distributed_executor_backend),
            "omp_threads_bind": envs.VLLM_CPU_OMP_THREADS_BIND,
            "worker_threads": worker.get("threads"),
            "worker_cpus": worker.get("cpus"),
            "enforce_eager": bool(cfg.model_config.enforce_eager),
            "dtype": str(cfg.model_config.dtype).removeprefix("torch."),
            "block_size": cfg.cache_config.block_size,
            "max_num_batched_tokens": cfg.scheduler_config.max_num_batched_tokens,
            "max_model_len": cfg.model_config.max_model_len,
            "prefix_caching": bool(cfg.cache_config.enable_prefix_caching),
            "kv_cache_gib": float(os.environ["VLLM_CPU_KVCACHE_SPACE"]),
            "additional_config": self.additional_config,
            "model": MODEL,
        }

    def close(self) -> None:
        """Stops the engine core and worker processes (so that the next engine has the cores to itself)."""
        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
        gc.collect()


def _worker_process() -> dict[str, Any]:
    """CPUs and OpenMP threads of the engine's model worker: the descendant process vLLM titles
    "VLLM::Worker", pinned by vLLM to its cores with one OpenMP thread per core (OMP_NUM_THREADS = the number
    of cores bound, `vllm.utils.ompmultiprocessing`); this process's own when the engine runs in it."""
    import psutil
    import torch

    for proc in psutil.Process().children(recursive=True):
        try:
            if "Worker" in proc.name() or "Worker" in " ".join(proc.cmdline()):
                cpus = sorted(proc.cpu_affinity())
                return {"threads": len(cpus), "cpus": cpus}
        except psutil.Error:
            continue
    return {"threads": torch.get_num_threads(), "cpus": sorted(psutil.Process().cpu_affinity())}


# ----------------------------------------------------------------------------------------------- chat


def chat_pass(engine: Engine, scheme: str, turns: list[str], answer: int, answers: list[str | None]) -> list[dict]:
    """One chat from an empty cache; per round: TTFT (max_tokens=1), then the same round again with its answer.

    `answers[r]` is the assistant text put into the history after round r: set by the first pass, later
    passes check that they generate the same text (`answer_mismatch`).
    """
    llm = engine.llm
    llm.reset_prefix_cache()
    messages: list[dict[str, str]] = []
    stats = []
    for r, text in enumerate(turns):
        messages.append({"role": "user", "content": text})
        start = time.perf_counter()
        first = llm.chat(messages, engine.params(1, scheme), use_tqdm=False)[0]
        wall = time.perf_counter() - start
        full = llm.chat(messages, engine.params(answer, scheme), use_tqdm=False)[0]
        reply = full.outputs[0].text
        if answers[r] is None:
            answers[r] = reply
        metrics = first.metrics
        stats.append({"ttft_s": wall,
                      "engine_ttft_s": metrics.first_token_latency if metrics is not None else float("nan"),
                      "prompt_tokens": len(first.prompt_token_ids), "cached_tokens": first.num_cached_tokens or 0,
                      "answer_mismatch": reply != answers[r]})
        messages.append({"role": "assistant", "content": answers[r]})
    return stats


def stage_chat(engine: Engine, tokenizer, env: dict, args: argparse.Namespace) -> None:
    from bench_chat import user_turns

    from ism_ext.viz import save_ttft_plot

    turns = user_turns(args.rounds, args.min_turn, args.max_turn, tokenizer, seed=0)
    answers: dict[str, list[str | None]] = {impl: [None] * args.rounds for impl in CHAT_IMPLS}
    runs: dict[str, list[list[dict]]] = {impl: [] for impl in CHAT_IMPLS}
    with tqdm(total=(args.repeats + 1) * len(CHAT_IMPLS), desc="vllm chat", unit="chat") as bar:
        for repeat in range(args.repeats + 1):  # repeat 0: warm-up
            for impl in CHAT_IMPLS:
                bar.set_postfix(impl=impl, repeat=repeat)
                stats = chat_pass(engine, impl, turns, args.answer, answers[impl])
                for r, s in enumerate(stats):
                    if impl == "prefix_lm":
                        check(s["cached_tokens"] == 0, f"prefix_lm round {r + 1}: {s['cached_tokens']} tokens came "
                                                       f"from the prefix cache; its layout should change every round")
                    elif r > 0:
                        check(s["cached_tokens"] > 0, f"{impl} round {r + 1}: nothing came from the prefix cache")
                if repeat:
                    runs[impl].append(stats)
                bar.update()

    records: list[dict[str, Any]] = []
    for impl in CHAT_IMPLS:
        for r in range(args.rounds):
            per_repeat = [run[r] for run in runs[impl]]
            records.append(dict(
                bench="vllm_chat", impl=impl, round=r + 1,
                ttft_ms=1e3 * statistics.median(s["ttft_s"] for s in per_repeat),
                engine_ttft_ms=1e3 * statistics.median(s["engine_ttft_s"] for s in per_repeat),
                prompt_tokens=per_repeat[-1]["prompt_tokens"], cached_tokens=per_repeat[-1]["cached_tokens"],
                answer_tokens=args.answer, answer_mismatches=sum(s["answer_mismatch"] for s in per_repeat),
                repeats=args.repeats, **env, **engine.config))
    path = write_records(args.name + "chat", records)
    ttft = {impl: [r["ttft_ms"] for r in records if r["impl"] == impl] for impl in CHAT_IMPLS}
    save_ttft_plot(ttft, path.with_suffix(".png"), log_y=True,
                   title=f"vLLM {engine.config['vllm']} CPU, SmolLM2-135M, turns {args.min_turn}-{args.max_turn} "
                         f"tokens\n{env['device']}, {engine.config['worker_threads']} worker thread(s)")

    def rec(impl: str, rnd: int) -> dict:
        return next(r for r in records if r["impl"] == impl and r["round"] == rnd)

    print(f"\n{'round':>5} {'ISM ms':>9} {'prefix-LM ms':>13} {'causal ms':>10} {'prompt':>7} {'cached':>7}")
    for k in range(1, args.rounds + 1):
        i, p, c = rec("ism", k), rec("prefix_lm", k), rec("causal", k)
        print(f"{k:>5} {i['ttft_ms']:>9.1f} {p['ttft_ms']:>13.1f} {c['ttft_ms']:>10.1f} {i['prompt_tokens']:>7} "
              f"{i['cached_tokens']:>7}")
    last = args.rounds
    speedup = rec("prefix_lm", last)["ttft_ms"] / rec("ism", last)["ttft_ms"]
    vs_causal = rec("ism", last)["ttft_ms"] / rec("causal", last)["ttft_ms"]
    print(f"goal (issue): round {last} ISM >= 5x faster than prefix_lm: {speedup:.2f}x "
          f"[{'met' if speedup >= 5 else 'NOT met'}]; within 10% of causal: ISM/causal = {vs_causal:.3f} "
          f"[{'met' if vs_causal <= 1.1 else 'NOT met'}]")
    mismatches = sum(r["answer_mismatches"] for r in records)
    if mismatches:
        print(f"note: {mismatches} round(s) generated an answer other than the warm-up's (history kept fixed)")
    print(f"wrote {path} and {path.with_suffix('.png')}")


# ----------------------------------------------------------------------------------------------- concurrency


def concurrent_session(engine: Engine, scheme: str, turn_sets: list[list[str]], answer: int) -> dict:
    """One session of len(turn_sets) chats, a batched `LLM.chat` per round, from an empty cache; the statistics
    of rounds 2.. (of round 1 when there is only one)."""
    llm = engine.llm
    llm.reset_prefix_cache()
    conversations: list[list[dict[str, str]]] = [[] for _ in turn_sets]
    rounds = len(turn_sets[0])
    ttft, cached, tokens, wall = [], [], 0, 0.0
    for r in range(rounds):
        for conv, turns in zip(conversations, turn_sets, strict=True):
            conv.append({"role": "user", "content": turns[r]})
        start = time.perf_counter()
        outs = llm.chat(conversations, engine.params(answer, scheme), use_tqdm=False)
        elapsed = time.perf_counter() - start
        for conv, out in zip(conversations, outs, strict=True):
            conv.append({"role": "assistant", "content": out.outputs[0].text})
        if r >= 1 or rounds == 1:
            check(all(out.metrics is not None for out in outs), "RequestOutput.metrics is None (log stats off?)")
            ttft += [out.metrics.first_token_latency for out in outs]
            cached += [out.num_cached_tokens or 0 for out in outs]
            tokens += sum(len(out.outputs[0].token_ids) for out in outs)
            wall += elapsed
    return {"ttft_s": ttft, "cached": cached, "tokens_per_s": tokens / wall}


def stage_concurrency(engine: Engine, tokenizer, env: dict, args: argparse.Namespace) -> None:
    from bench_chat import user_turns

    turn_sets = [user_turns(args.conc_rounds, args.min_turn, args.max_turn, tokenizer, seed=100 + i)
                 for i in range(max(args.concurrency))]
    records: list[dict[str, Any]] = []
    cases = [(n, impl) for n in args.concurrency for impl in CONC_IMPLS]
    for n, impl in tqdm(cases, desc="vllm concurrency", unit="case"):
        sessions = [concurrent_session(engine, impl, turn_sets[:n], args.conc_answer)
                    for _ in range(args.conc_repeats + 1)][1:]  # the first: warm-up
        ttft = [t for s in sessions for t in s["ttft_s"]]
        cached = [c for s in sessions for c in s["cached"]]
        if args.conc_rounds > 1:
            check(min(cached) > 0, f"{impl} x{n}: a request of round 2+ found nothing in the prefix cache")
        records.append(dict(
            bench="vllm_throughput", impl=impl, concurrency=n, rounds=args.conc_rounds,
            timed_rounds=max(args.conc_rounds - 1, 1), answer_tokens=args.conc_answer,
            output_tokens_per_s=statistics.median(s["tokens_per_s"] for s in sessions),
            ttft_p50_ms=1e3 * percentile(ttft, 0.5), ttft_p99_ms=1e3 * percentile(ttft, 0.99),
            requests=len(ttft), cached_tokens_mean=statistics.mean(cached), repeats=args.conc_repeats,
            **env, **engine.config))
    path = write_records(args.name + "throughput", records)
    save_throughput_plot(records, path.with_suffix(".png"), env)
    print(f"\n{'impl':>7} {'chats':>5} {'out tok/s':>10} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12} {'cached':>7}")
    for r in records:
        print(f"{r['impl']:>7} {r['concurrency']:>5} {r['output_tokens_per_s']:>10.1f} {r['ttft_p50_ms']:>12.1f} "
              f"{r['ttft_p99_ms']:>12.1f} {r['cached_tokens_mean']:>7.0f}")
    print(f"wrote {path} and {path.with_suffix('.png')}")


def save_throughput_plot(records: list[dict], path, env: dict) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    from ism_ext.viz import save_figure

    fig = Figure(figsize=(10, 4.2), dpi=110)
    tput, lat = fig.subplots(1, 2)
    for impl in CONC_IMPLS:
        rows = sorted((r for r in records if r["impl"] == impl), key=lambda r: r["concurrency"])
        n = [r["concurrency"] for r in rows]
        tput.plot(n, [r["output_tokens_per_s"] for r in rows], marker="o", label=impl)
        line = lat.plot(n, [r["ttft_p50_ms"] for r in rows], marker="o", label=f"{impl} p50")[0]
        lat.plot(n, [r["ttft_p99_ms"] for r in rows], marker="s", ls="--", color=line.get_color(), label=f"{impl} p99")
    tput.set(xlabel="concurrent chats", ylabel="output tokens/s", xscale="log", title="throughput (rounds 2+)")
    lat.set(xlabel="concurrent chats", ylabel="time to first token (ms)", xscale="log", yscale="log",
            title="TTFT (rounds 2+)")
    levels = sorted({r["concurrency"] for r in records})
    for ax in (tput, lat):
        ax.set_xticks(levels, labels=[str(v) for v in levels])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.suptitle(f"vLLM CPU, SmolLM2-135M, concurrent chats; {env['device']}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


# ----------------------------------------------------------------------------------------------- backend


def random_prompts(batch: int, length: int, seed: int) -> list[dict]:
    """`batch` token prompts of `length` ordinary tokens (SmolLM2's special tokens are the first ids)."""
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(1000, 48000) for _ in range(length)]} for _ in range(batch)]


def timed_generate(engine: Engine, prompts: list[dict], max_tokens: int, fresh: bool) -> Callable[[], float]:
    """A run for `median_s`: seconds of one `generate`; with `fresh`, checks that no prompt token was cached."""
    def run() -> float:
        start = time.perf_counter()
        outs = engine.llm.generate(prompts, engine.params(max_tokens), use_tqdm=False)
        elapsed = time.perf_counter() - start
        if fresh:
            check(all((o.num_cached_tokens or 0) == 0 for o in outs), "a prefill found tokens in the prefix cache")
        check(all(len(o.outputs[0].token_ids) == max_tokens for o in outs), "generate stopped early")
        return elapsed

    return run


def backend_measure(engine: Engine, args: argparse.Namespace, bar) -> list[dict]:
    """Prefill and decode tokens/s of one engine."""
    rows = []
    for length in args.prefill_lens:
        for batch in args.prefill_batches:
            prompts = random_prompts(batch, length, seed=length * 100 + batch)
            t = median_s(timed_generate(engine, prompts, 1, fresh=True), args.repeats,
                         setup=engine.llm.reset_prefix_cache)
            rows.append(dict(phase="prefill", batch=batch, prompt_tokens=length, seconds=t,
                             tokens_per_s=batch * length / t))
            bar.update()
    n = args.decode_tokens
    for batch in args.decode_batches:
        prompts = random_prompts(batch, args.decode_context, seed=7 + batch)
        one, many = timed_generate(engine, prompts, 1, fresh=False), timed_generate(engine, prompts, n, fresh=False)
        pairs = [(one(), many()) for _ in range(args.repeats + 1)][1:]  # interleaved; the first: warm-up
        step = (statistics.median(p[1] for p in pairs) - statistics.median(p[0] for p in pairs)) / (n - 1)
        check(step > 0, f"decode batch {batch}: {n} tokens took no longer than 1 (too few --decode-tokens?)")
        rows.append(dict(phase="decode", batch=batch, prompt_tokens=args.decode_context, decode_tokens=n,
                         seconds=step, tokens_per_s=batch / step))
        bar.update()
    return rows


def stage_backend(model_dir: str, env: dict, args: argparse.Namespace, ism_engine: Engine | None) -> Engine | None:
    """Returns the ISM engine if it is still open (it was closed to free the cores for the other one)."""
    records: list[dict[str, Any]] = []
    per_engine = len(args.prefill_lens) * len(args.prefill_batches) + len(args.decode_batches)
    with tqdm(total=per_engine * len(BACKEND_IMPLS), desc="vllm backend", unit="case") as bar:
        for impl, additional in BACKEND_IMPLS.items():
            bar.set_postfix(impl=impl)
            if impl == "ism_op" and ism_engine is not None:
                engine = ism_engine
            else:
                if ism_engine is not None:
                    ism_engine.close()  # one engine at a time: both would pin their workers to the same cores
                    ism_engine = None
                engine = Engine(model_dir, additional, args)
            for row in backend_measure(engine, args, bar):
                records.append(dict(bench="vllm_backend", impl=impl, **row, repeats=args.repeats,
                                    **env, **engine.config))
            if engine is not ism_engine:
                engine.close()
    path = write_records(args.name + "backend", records)
    save_backend_plot(records, path.with_suffix(".png"), env)

    def rate(impl: str, r: dict) -> float:
        return next(x["tokens_per_s"] for x in records if x["impl"] == impl and x["phase"] == r["phase"]
                    and x["batch"] == r["batch"] and x["prompt_tokens"] == r["prompt_tokens"])

    print(f"\n{'phase':>8} {'batch':>5} {'prompt':>7} {'ism_op tok/s':>13} {'vllm tok/s':>11} {'ratio':>6}")
    worst: dict[str, float] = {}
    for r in (x for x in records if x["impl"] == "ism_op"):
        ratio = r["tokens_per_s"] / rate("vllm_cpu_attn", r)
        worst[r["phase"]] = min(worst.get(r["phase"], ratio), ratio)
        print(f"{r['phase']:>8} {r['batch']:>5} {r['prompt_tokens']:>7} {r['tokens_per_s']:>13.1f} "
              f"{rate('vllm_cpu_attn', r):>11.1f} {ratio:>6.2f}")
    goals = {"prefill": 1.0, "decode": 0.9}
    print("goal (issue): " + "; ".join(
        f"{phase} ism_op/vllm_cpu_attn >= {goal}: worst {worst[phase]:.2f} "
        f"[{'met' if worst[phase] >= goal else 'NOT met'}]" for phase, goal in goals.items() if phase in worst))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return ism_engine


def save_backend_plot(records: list[dict], path, env: dict) -> None:
    cases = [(r["phase"], r["batch"], r["prompt_tokens"]) for r in records if r["impl"] == "ism_op"]
    series = {impl: [next(r["tokens_per_s"] for r in records if r["impl"] == impl
                          and (r["phase"], r["batch"], r["prompt_tokens"]) == case) for case in cases]
              for impl in BACKEND_IMPLS}
    save_impl_bars(series, [f"{p}\nb={b}, {t} tok" for p, b, t in cases], "tokens/s",
                   f"vLLM CPU, SmolLM2-135M, causal requests\n{env['device']}", path)


# ----------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(STAGES)}")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rounds, 1 repeat, small sizes")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (after one warm-up)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--min-turn", type=int, default=128)
    parser.add_argument("--max-turn", type=int, default=512)
    parser.add_argument("--answer", type=int, default=16, help="answer tokens per chat round")
    parser.add_argument("--concurrency", type=lambda s: [int(v) for v in s.split(",")], default=[1, 4, 16])
    parser.add_argument("--conc-rounds", type=int, default=3)
    parser.add_argument("--conc-answer", type=int, default=32)
    parser.add_argument("--conc-repeats", type=int, default=3, help="timed sessions per case (after one warm-up)")
    parser.add_argument("--prefill-lens", type=lambda s: [int(v) for v in s.split(",")], default=[512, 2048])
    parser.add_argument("--prefill-batches", type=lambda s: [int(v) for v in s.split(",")], default=[1, 4])
    parser.add_argument("--decode-batches", type=lambda s: [int(v) for v in s.split(",")], default=[1, 4, 16])
    parser.add_argument("--decode-context", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--compile", action="store_true", help="vLLM's torch.compile default instead of eager")
    parser.add_argument("--name", default="vllm_", help="prefix of the result files")
    args = parser.parse_args()
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; known: {', '.join(STAGES)}")
    if args.quick:
        args.repeats = args.conc_repeats = 1
        args.rounds, args.conc_rounds, args.answer, args.conc_answer = 2, 2, 8, 8
        args.concurrency, args.prefill_lens, args.prefill_batches = [1, 4], [256], [1, 2]
        args.decode_batches, args.decode_context, args.decode_tokens = [1, 4], 128, 8

    for key, value in ENGINE_ENV.items():
        os.environ.setdefault(key, value)
    from transformers import AutoTokenizer

    from ism_ext.integrations.vllm.models import export_model_dir

    model_dir = str(export_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    env = environment()
    env["frontend_threads"] = env.pop("cpu_threads")
    engine = None
    if {"chat", "concurrency", "backend"} & set(stages):
        engine = Engine(model_dir, BACKEND_IMPLS["ism_op"], args)  # chat requests choose their scheme
        env["cpu_threads"] = engine.config["worker_threads"]
        print(f"engine: {', '.join(f'{k}={v}' for k, v in engine.config.items())}")
    if "chat" in stages:
        stage_chat(engine, tokenizer, env, args)
    if "concurrency" in stages:
        stage_concurrency(engine, tokenizer, env, args)
    if "backend" in stages:
        engine = stage_backend(model_dir, env, args, engine)
    if engine is not None:
        engine.close()


if __name__ == "__main__":
    main()
