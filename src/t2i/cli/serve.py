"""`t2i serve`: an OpenAI-compatible image server (FastAPI on uvicorn) with dynamic batching and a web page.

    t2i serve --model runs/demo/pipeline                      # http://127.0.0.1:8000/ (page) and /v1/...
    t2i serve --model sd=models/sd15 --model cascade=runs/demo-imagen/cascade --api-key KEY --max-batch 8
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from t2i.cli.common import add_command

API_KEY_ENV = "T2I_API_KEY"


def register(subparsers: Any) -> None:
    parser = add_command(
        subparsers,
        "serve",
        run,
        help="serve models over an OpenAI-compatible HTTP API with a web page",
        description="Serve pipelines (SD folders or files, Imagen cascades) at /v1/images/generations and "
        "/v1/images/edits, batching concurrent requests; GET / is a page to try them.",
    )
    parser.add_argument("--model", action="append", required=True, metavar="[NAME=]PATH",
                        help="a pipeline folder, single file or cascade folder; the id is the folder name or NAME "
                        "(repeatable)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None,
                        help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV} when set)")
    parser.add_argument("--max-batch", type=int, default=8, help="most images in one sampler batch")
    parser.add_argument("--max-queue", type=int, default=64, help="most requests waiting; more get 429")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a request may take; then 504")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0,
                        help="how long a batch that is not full waits for more requests")
    parser.add_argument("--lora-dir", type=Path, default=None,
                        help="folder of LoRA .safetensors files requests may name in `loras`")
    parser.add_argument("--url-ttl", type=float, default=3600.0, help="seconds `url` images stay downloadable")
    parser.add_argument("--max-steps", type=int, default=200, help="largest `steps` a request may ask for")
    parser.add_argument("--max-size", type=int, default=2048, help="largest image side in pixels")
    parser.add_argument("--config", help="architecture of single-file models: sd15, sd2, sd21-v or a YAML path")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a --config key (repeatable)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")


def settings_from_args(args: argparse.Namespace) -> Any:
    from t2i.serve.settings import ModelSpec, ServerSettings

    return ServerSettings(
        models=[ModelSpec.parse(m) for m in args.model],
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        timeout_s=args.timeout,
        batch_wait_s=args.batch_wait_ms / 1000,
        lora_dir=args.lora_dir,
        url_ttl_s=args.url_ttl,
        max_steps=args.max_steps,
        max_size=args.max_size,
        config=args.config,
        overrides=args.overrides,
        device=args.device,
        dtype=args.dtype,
    ).validate()


def run(args: argparse.Namespace) -> int:
    from t2i.serve.server import serve

    return serve(settings_from_args(args))
