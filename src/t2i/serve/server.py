"""Load the models and run the app under uvicorn until SIGTERM or Ctrl-C.

SIGTERM: the batcher stops taking requests (503, /healthz says draining), uvicorn closes the listening socket,
the requests in flight finish and are answered, then the sampling thread ends and `serve` returns 0.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

from t2i.errors import PipelineLoadError
from t2i.serve.adapters import ModelAdapter, make_adapter
from t2i.serve.settings import ModelSpec, ServerSettings

log = logging.getLogger("t2i.serve")


def is_cascade(path: Path) -> bool:
    """A cascade folder (cascade.yaml / cascade.json) or a single Imagen stage folder (stage.json)."""
    return path.is_dir() and any((path / name).is_file() for name in ("cascade.yaml", "cascade.json", "stage.json"))


def load_model(spec: ModelSpec, settings: ServerSettings) -> Any:
    """The pipeline at `spec.path`: an SD pipeline (folder or single file) or an Imagen cascade."""
    import torch

    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not spec.path.exists():
        raise PipelineLoadError(f"--model {spec.path}: no such file or folder")
    if is_cascade(spec.path):
        from t2i.pipelines.cascade import load_cascade

        stages = [spec.path] if (spec.path / "stage.json").is_file() else spec.path
        return load_cascade(stages, device)
    from t2i.pipelines.loading import load_pipeline

    pipe = load_pipeline(spec.path, config=settings.config, dtype=getattr(torch, settings.dtype),
                         overrides=settings.overrides or None)
    return pipe.to(device)


def load_adapters(settings: ServerSettings) -> dict[str, ModelAdapter]:
    import transformers

    transformers.utils.logging.set_verbosity_error()  # no tokenizer warnings for over-long prompts (we refuse them)
    transformers.utils.logging.disable_progress_bar()
    return {spec.id: make_adapter(spec.id, load_model(spec, settings), settings.lora_dir) for spec in settings.models}


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def serve(settings: ServerSettings, adapters: dict[str, ModelAdapter] | None = None) -> int:
    """Run the server in this process (blocks); returns 0 after a graceful shutdown."""
    import uvicorn

    from t2i.serve.app import create_app

    configure_logging()
    settings.validate()
    adapters = adapters if adapters is not None else load_adapters(settings)
    app = create_app(settings, adapters)
    batcher = app.state.t2i.batcher

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            batcher.drain()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_config=None, access_log=False, lifespan="on",
        timeout_graceful_shutdown=int(settings.timeout_s) + 10,
    )
    for adapter in adapters.values():
        info = adapter.info()
        log.info("model %s: %s, default %s, sizes in multiples of %d, samplers %s", adapter.id, info["kind"],
                 info["default_size"], info["size_multiple"], ", ".join(info["samplers"]) or "per stage")
    log.info("max batch %d images, max queue %d requests, timeout %g s%s", settings.max_batch, settings.max_queue,
             settings.timeout_s, ", API key required" if settings.api_key else "")
    # uvicorn re-raises the signal it caught after its graceful shutdown; a no-op handler makes that a clean exit
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        uvicorn_server = Server(config)
        uvicorn_server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0 if uvicorn_server.started else 1
