"""Deadlines, clients that leave, url expiry and SIGTERM, on servers of their own (no API key here).

Slow work is a 256 px request of 100-200 steps on the tiny model (tens of seconds on a CPU); the metrics show
whether its batch was stopped mid-way (`t2i_serve_cancelled_rows_total`) or ran to the end
(`..._batch_images_count`).
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from helpers import ServerProcess, metric_values

SLOW = {"prompt": "a red circle", "size": "256x256", "steps": 200, "response_format": "b64_json"}
QUICK = {"prompt": "a blue square", "steps": 2, "response_format": "url"}


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory, model_dir):
    log = tmp_path_factory.mktemp("serve_lifecycle") / "server.log"
    proc = ServerProcess(["--model", str(model_dir), "--timeout", "8", "--url-ttl", "1", "--max-batch", "2",
                          "--max-size", "256"], log)
    yield proc
    proc.stop()


def counter(server, name: str) -> float:
    return metric_values(server).get((name, ()), 0.0)


def wait_for(condition, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def running(server) -> bool:
    return metric_values(server).get(("t2i_serve_running_images", ()), 0) > 0


def test_past_its_deadline_a_request_gets_504_and_its_batch_stops(slow_server):
    cancelled = counter(slow_server, "t2i_serve_cancelled_rows_total")
    batches = counter(slow_server, "t2i_serve_batch_images_count")
    response = httpx.post(slow_server.url + "/v1/images/generations", json=SLOW, timeout=120)
    assert response.status_code == 504 and response.json()["error"]["code"] == "deadline_exceeded"
    assert wait_for(lambda: counter(slow_server, "t2i_serve_cancelled_rows_total") == cancelled + 1)
    assert counter(slow_server, "t2i_serve_batch_images_count") == batches  # it never ran to the end
    quick = httpx.post(slow_server.url + "/v1/images/generations", json=QUICK, timeout=60)
    assert quick.status_code == 200


def test_clients_that_leave_have_their_work_dropped(slow_server):
    url = slow_server.url + "/v1/images/generations"
    cancelled = counter(slow_server, "t2i_serve_cancelled_rows_total")
    batches = counter(slow_server, "t2i_serve_batch_images_count")

    def leave_after(body, seconds):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url, json=body, timeout=httpx.Timeout(seconds, connect=10))

    running_client = threading.Thread(target=leave_after, args=({**SLOW, "steps": 100}, 2.5))
    running_client.start()
    assert wait_for(lambda: running(slow_server), 30)
    leave_after({**QUICK, "seed": 1}, 0.5)  # queued behind the slow one, gone before it starts
    running_client.join()
    assert wait_for(lambda: counter(slow_server, "t2i_serve_cancelled_rows_total") == cancelled + 1)
    assert wait_for(lambda: not running(slow_server))
    assert counter(slow_server, "t2i_serve_batch_images_count") == batches  # neither request was computed
    assert metric_values(slow_server)[("t2i_serve_queue_requests", ())] == 0
    log = slow_server.read_log()
    assert log.count("status=499 code=client_disconnected") >= 2


def test_url_images_expire(slow_server):
    response = httpx.post(slow_server.url + "/v1/images/generations", json=QUICK, timeout=60)
    url = response.json()["data"][0]["url"]
    assert httpx.get(url, timeout=10).status_code == 200
    time.sleep(1.3)
    expired = httpx.get(url, timeout=10)
    assert expired.status_code == 404 and expired.json()["error"]["code"] == "not_found"


def test_health_without_a_key(slow_server):
    assert httpx.get(slow_server.url + "/healthz", timeout=10).json() == {"status": "ok", "auth": False}
    assert httpx.get(slow_server.url + "/v1/models", timeout=10).status_code == 200


def test_sigterm_finishes_requests_in_flight_then_exits(slow_server):
    """Last in this module: it ends the module's server. The request streams, so the test knows it is running."""
    server, events = slow_server, []
    body = {"prompt": "a red circle", "steps": 30, "n": 2, "stream": True, "response_format": "b64_json"}
    with httpx.stream("POST", server.url + "/v1/images/generations", json=body, timeout=120) as response:
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("event: "):
                events.append(line[7:])
            if events and events[-1] == "started":
                break
        server.process.terminate()  # SIGTERM while the batch runs
        assert wait_for(lambda: refused(server), 30)  # it stops taking requests at once
        events += [line[7:] for line in lines if line.startswith("event: ")]
    assert events.count("image_generation.completed") == 2 and events[-1] == "done"
    assert server.process.wait(60) == 0
    log = server.read_log()
    assert "Shutting down" in log and log.rindex("status=200") < log.index("Finished server process")


def refused(server) -> bool:
    try:
        httpx.get(server.url + "/healthz", timeout=2)
    except httpx.ConnectError:
        return True
    except httpx.HTTPError:
        return False
    return False
