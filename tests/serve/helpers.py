"""A tiny random SD pipeline with the real MiniLM encoder, a LoRA for it, and a real `t2i serve` process."""

from __future__ import annotations

import base64
import copy
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

API_KEY = "test-key-0123"
SIZE = 16  # pixels; the VAE halves and the UNet halves again, so sizes are multiples of 4
SRC = Path(__file__).resolve().parents[2] / "src"


def _tiny_model() -> dict:
    """tests/pipelines' tiny MiniLM pipeline at 16 px (latents 8 x 8) with prompts of up to 16 tokens."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))
    from test_loading import TINY_MINILM_MODEL

    model = copy.deepcopy(TINY_MINILM_MODEL)
    model["unet_config"]["image_size"] = SIZE // 2
    model["first_stage_config"]["ddconfig"]["resolution"] = SIZE
    model["cond_stage_config"]["max_length"] = 16
    return model


TINY_MODEL = _tiny_model()


def build_tiny_pipeline(model: dict | None = None):
    from test_loading import randomize_zero_params

    from t2i.pipelines.build import build_components
    from t2i.pipelines.loading import assemble_pipeline

    torch.manual_seed(0)
    model = model or TINY_MODEL
    components = build_components(model)
    randomize_zero_params(components["unet"])
    return assemble_pipeline(model, **components)


def save_tiny_lora(pipe, path: Path, seed: int = 1) -> Path:
    """A random rank-2 LoRA on the UNet's attention layers of `pipe`'s architecture, saved as safetensors."""
    from t2i.lora.files import save_lora_file
    from t2i.lora.peft_lora import apply_lora, lora_parameters

    unet = copy.deepcopy(pipe.unet)
    apply_lora(unet, rank=2)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(unet):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return save_lora_file({"unet": unet}, path)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`python -m t2i.cli.main serve ...` on a free port; its log goes to `log_path`."""

    def __init__(self, args: list[str], log_path: Path, api_key: str | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.log_path = log_path
        env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        env.pop("T2I_API_KEY", None)
        command = [sys.executable, "-m", "t2i.cli.main", "serve", "--port", str(self.port), *args]
        if api_key:
            command += ["--api-key", api_key]
        self.log = open(log_path, "w")  # noqa: SIM115 - open for the life of the process; closed in stop()
        self.process = subprocess.Popen(command, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.wait_ready()

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"t2i serve exited with {self.process.returncode}:\n{self.read_log()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"t2i serve did not answer /healthz in {timeout} s:\n{self.read_log()}")

    def read_log(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode


# ------------------------------------------------------------------ reading answers


def decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def close_images(a: Image.Image, b: Image.Image) -> bool:
    """The same image up to float rounding of batched kernels: at most 1 level apart, >= 99% identical."""
    diff = np.abs(pixels(a) - pixels(b))
    return diff.max() <= 1 and (diff == 0).mean() >= 0.99


def metric_values(server) -> dict[tuple[str, tuple], float]:
    text = httpx.get(server.url + "/metrics", headers=server.headers, timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}
