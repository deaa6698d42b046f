"""What `t2i serve` is started with: the models to load and the limits it enforces."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from t2i.errors import ConfigError


@dataclass(frozen=True)
class ModelSpec:
    """A model to serve: its public id and the folder or file `t2i.load_pipeline` / `t2i.load_cascade` reads."""

    id: str
    path: Path

    @classmethod
    def parse(cls, value: str) -> ModelSpec:
        """`PATH` (id: the folder or file name without suffix) or `NAME=PATH`."""
        name, sep, path = value.partition("=")
        if not sep:
            name, path = "", value
        path_obj = Path(path)
        name = name or (path_obj.stem if path_obj.suffix in (".safetensors", ".ckpt") else path_obj.name)
        if not name or not path:
            raise ConfigError(f"--model {value!r}: expected PATH or NAME=PATH")
        if not all(ch.isalnum() or ch in "-_." for ch in name):
            raise ConfigError(f"--model {value!r}: model id {name!r} may hold only letters, digits, '-', '_', '.'")
        return cls(name, path_obj)


@dataclass
class ServerSettings:
    """Server options; the CLI flags of `t2i serve` map one to one onto these fields.

    max_batch: most images in one sampler batch. max_queue: most requests waiting to start (more -> 429).
    timeout_s: a request's deadline from its arrival (past it -> 504, its work dropped).
    batch_wait_s: how long the worker waits for more compatible requests before starting a batch that is not
    full. url_ttl_s: how long `response_format=url` images stay downloadable (then deleted).
    """

    models: list[ModelSpec]
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_batch: int = 8
    max_queue: int = 64
    lora_dir: Path | None = None
    timeout_s: float = 300.0
    batch_wait_s: float = 0.005
    url_ttl_s: float = 3600.0
    max_stored_images: int = 4096
    max_steps: int = 200
    max_guidance: float = 30.0
    max_size: int = 2048
    max_upload_bytes: int = 16 * 2**20
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    device: str | None = None
    dtype: str = "float32"

    def validate(self) -> ServerSettings:
        if not self.models:
            raise ConfigError("--model: at least one model is needed")
        ids = [m.id for m in self.models]
        if len(set(ids)) != len(ids):
            raise ConfigError(f"--model: model ids repeat ({', '.join(ids)}); give NAME=PATH to tell them apart")
        for name in ("max_batch", "max_queue", "max_steps", "max_size", "max_stored_images"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}: {getattr(self, name)}; expected an integer >= 1")
        for name in ("timeout_s", "url_ttl_s"):
            if not float(getattr(self, name)) > 0:
                raise ConfigError(f"{name}: {getattr(self, name)}; expected a positive number of seconds")
        if self.lora_dir is not None and not Path(self.lora_dir).is_dir():
            raise ConfigError(f"--lora-dir {self.lora_dir}: not a folder")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port {self.port}: expected 0 to 65535")
        return self
