"""`t2i serve`: an OpenAI-compatible image server over t2i pipelines, with dynamic batching and a web page.

    settings = ServerSettings(models=[ModelSpec("demo", "runs/demo/pipeline")])
    serve(settings)                       # uvicorn on 127.0.0.1:8000 until SIGTERM / Ctrl-C

Layers, each importing only the ones below it:
- `adapters`: one adapter per pipeline class (SD `LatentPipeline`, Imagen `CascadePipeline`) turning a batch of
  image rows into PIL images; a new model family is one more adapter.
- `batcher`: the bounded request queue and the single sampling thread that groups compatible rows into one
  sampler batch.
- `requests`: OpenAI request fields -> validated jobs; every bad field is an `APIError` (HTTP 4xx).
- `app`: the FastAPI routes, auth, metrics, expiring `url` images, server-sent progress and the static page.
- `server`: model loading and the uvicorn process with graceful SIGTERM.

The server owns HTTP, queueing and batching, never sampling math.
"""

from t2i.serve.settings import ModelSpec, ServerSettings

__all__ = ["ModelSpec", "ServerSettings"]
