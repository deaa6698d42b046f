"""`t2i serve` under a burst of N concurrent requests: dynamic batching against `--max-batch 1`.

Two real server processes (`python -m t2i.cli.main serve`) serve the same model, one with `--max-batch B`
(default 8) and one with `--max-batch 1`. Each round sends a burst of N concurrent `POST /v1/images/generations`
(n=1, distinct prompts and seeds, b64_json) to one server and then to the other, rotating which goes first. Per
server it reports throughput (images/s over the burst's wall time), p50/p99 request latency (send -> full answer,
as the client sees it), and the server process's resident set size before the first burst (loaded, warmed up,
idle), its peak during the bursts (sampled every 5 ms from /proc) and after the last burst (idle again).

Model: `--model PATH` (e.g. `runs/demo/pipeline` after `make demo`); by default the demo architecture
(`configs/demo/shapes-ldm.yaml` and the demo VAE, 32 px, MiniLM text) with random weights, which costs the
same compute per image as the trained demo model.

    python benchmarks/serve_load.py                          # N=32, 25 steps, guidance 7.5, batch 8 vs 1
    python benchmarks/serve_load.py --model runs/demo/pipeline --requests 64 --rounds 3
    python benchmarks/serve_load.py --smoke
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table

PROMPTS = [f"a {c} {s} in the {p}" for c in ("red", "green", "blue", "yellow") for s in ("circle", "square")
           for p in ("top left", "centre", "bottom right")]
MIB = 2**20


def demo_architecture_pipeline(folder: Path, smoke: bool) -> Path:
    """The demo's SD architecture with random weights, written as a t2i pipeline folder."""
    import torch

    from t2i.config import load_config
    from t2i.pipelines.build import build_components
    from t2i.pipelines.loading import assemble_pipeline

    overrides = ["model.unet_config.channel_mult=[1]", "model.unet_config.attention_resolutions=[1]"] if smoke else []
    model = load_config("demo/shapes-ldm", overrides).model
    torch.manual_seed(0)
    pipe = assemble_pipeline(model, **build_components(model))
    pipe.save_pretrained(folder)
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Server:
    """A `t2i serve` process on a free port, with an RSS sampler that can be switched on around bursts."""

    def __init__(self, model: Path, max_batch: int, queue: int, threads: int, log: Path) -> None:
        self.max_batch, self.port = max_batch, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        command = [sys.executable, "-m", "t2i.cli.main", "serve", "--model", str(model), "--port", str(self.port),
                   "--max-batch", str(max_batch), "--max-queue", str(queue), "--timeout", "3600"]
        self.log = open(log, "w")  # noqa: SIM115 - the server's log for its lifetime; closed in stop()
        self.process = subprocess.Popen(command, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.peak = 0
        self._sampling = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server did not start in {timeout} s; see {self.log.name}")

    def rss(self) -> int:
        return rss_bytes(self.process.pid)

    def _sample(self) -> None:
        while self.process.poll() is None:
            if self._sampling.is_set():
                try:
                    self.peak = max(self.peak, self.rss())
                except (FileNotFoundError, ProcessLookupError):
                    return
            time.sleep(0.005)

    def sampling(self, on: bool) -> None:
        (self._sampling.set if on else self._sampling.clear)()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()


def request_body(i: int, steps: int, size: str) -> dict:
    return {"prompt": PROMPTS[i % len(PROMPTS)], "seed": i, "steps": steps, "size": size, "n": 1,
            "response_format": "b64_json"}


async def burst(url: str, count: int, steps: int, size: str) -> tuple[float, list[float]]:
    """Wall seconds of `count` concurrent requests and each request's latency; every answer must be a 200."""
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=3600) as client:

        async def one(i: int) -> float:
            start = time.perf_counter()
            response = await client.post("/v1/images/generations", json=request_body(i, steps, size))
            if response.status_code != 200:
                raise RuntimeError(f"request {i}: HTTP {response.status_code}: {response.text[:200]}")
            return time.perf_counter() - start

        start = time.perf_counter()
        latencies = await asyncio.gather(*(one(i) for i in range(count)))
        return time.perf_counter() - start, list(latencies)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> dict[int, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="pipeline folder (default: the demo architecture, random weights)")
    parser.add_argument("--requests", type=int, default=32, help="N, the burst size")
    parser.add_argument("--rounds", type=int, default=3, help="bursts per server (the median is reported)")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--size", default="32x32")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each server (OMP_NUM_THREADS)")
    parser.add_argument("--smoke", action="store_true", help="tiny: N=4, 2 steps, 1 round")
    args = parser.parse_args(argv)
    if args.smoke:
        args.requests, args.rounds, args.steps, args.max_batch = 4, 1, 2, 4
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        tmp = Path(tmp)
        model = args.model or demo_architecture_pipeline(tmp / "demo-architecture", args.smoke)
        servers = [Server(model, b, max(64, args.requests), args.threads, tmp / f"server-{b}.log")
                   for b in (args.max_batch, 1)]
        try:
            return run(servers, args, model)
        finally:
            for server in servers:
                server.stop()


def run(servers: list[Server], args: argparse.Namespace, model: Path) -> dict[int, dict[str, float]]:
    for server in servers:
        server.wait_ready()
        asyncio.run(burst(server.url, server.max_batch, args.steps, args.size))  # warm-up: one full batch
    before = {s.max_batch: s.rss() for s in servers}
    walls: dict[int, list[float]] = {s.max_batch: [] for s in servers}
    latencies: dict[int, list[float]] = {s.max_batch: [] for s in servers}
    rss_rounds: dict[int, list[float]] = {s.max_batch: [] for s in servers}
    for r in range(args.rounds):
        for server in servers[r % 2:] + servers[: r % 2]:
            server.sampling(True)
            wall, lat = asyncio.run(burst(server.url, args.requests, args.steps, args.size))
            server.sampling(False)
            walls[server.max_batch].append(wall)
            latencies[server.max_batch] += lat
            rss_rounds[server.max_batch].append(server.rss() / MIB)
    time.sleep(1.0)
    results = {}
    for server in servers:
        b = server.max_batch
        wall = statistics.median(walls[b])
        results[b] = {"images_per_s": args.requests / wall, "p50": percentile(latencies[b], 50),
                      "p99": percentile(latencies[b], 99), "rss_before": before[b] / MIB,
                      "rss_peak": server.peak / MIB, "rss_after": server.rss() / MIB}
    print(f"model {model}, {args.size}, {args.steps} steps, guidance 7.5 (CFG), burst of {args.requests} "
          f"concurrent requests (n=1), {args.rounds} rounds, torch threads {args.threads} per server")
    rows = [[f"--max-batch {b}", f"{r['images_per_s']:.2f}", f"{r['p50']:.2f}", f"{r['p99']:.2f}",
             f"{r['rss_before']:.0f}", f"{r['rss_peak']:.0f}", f"{r['rss_after']:.0f}"] for b, r in results.items()]
    print_table(["server", "images/s", "p50 s", "p99 s", "RSS before MiB", "RSS peak MiB", "RSS after MiB"], rows)
    for b, values in rss_rounds.items():
        print(f"--max-batch {b}: RSS after each burst (MiB): {', '.join(f'{v:.0f}' for v in values)}")
    ratio = results[args.max_batch]["images_per_s"] / results[1]["images_per_s"]
    print(f"ratio line: batching (max batch {args.max_batch}) vs max batch 1 throughput = {ratio:.2f}")
    return results


if __name__ == "__main__":
    main()
