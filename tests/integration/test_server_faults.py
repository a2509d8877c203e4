"""Faults against the real server process (`entrypoint.launch.serve` on the fake engine): SIGTERM with work
that outlasts the grace period, clients that send partial headers or bodies, and clients that give up
mid-upload."""

from __future__ import annotations

import json
import re
import signal
import socket
import threading
import time

import httpx

from tests.integration.test_server_process import processes, start, wait_listening  # noqa: F401 - fixture

LONG = {"max_new_tokens": 3000}  # 0.02 s a step: a minute, far past the grace period


def wait_ready(url: str, process) -> None:
    deadline = time.monotonic() + 30
    while httpx.get(url + "/ping", timeout=5).status_code != 200:
        assert process.poll() is None and time.monotonic() < deadline, "model never became ready"
        time.sleep(0.05)


def metric(url: str, name: str, labels: str = "") -> float:
    text = httpx.get(url + "/metrics", timeout=5).text
    match = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def wait_until(condition, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_sigterm_drains_short_work_and_ends_the_rest_with_the_error_shape_then_exits_0(processes):
    process, url = start("--step-delay", "0.02", "--graceful-shutdown", "2")
    processes.append(process)
    wait_listening(process, url)
    wait_ready(url, process)
    results: dict[str, object] = {}

    def call(name: str, body: dict) -> None:
        if body.get("stream"):
            with httpx.stream("POST", url + "/invocations", json=body, timeout=60) as response:
                results[name] = (response.status_code, [json.loads(line) for line in response.iter_lines() if line])
        else:
            response = httpx.post(url + "/invocations", json=body, timeout=60)
            results[name] = (response.status_code, response.json())

    bodies = {
        "json-1": {"inputs": "a", "parameters": LONG}, "json-2": {"inputs": "b", "parameters": LONG},
        "stream-1": {"inputs": "c", "stream": True, "parameters": LONG},
        "stream-2": {"inputs": "d", "stream": True, "parameters": LONG},
        "drains": {"inputs": "e", "parameters": {"max_new_tokens": 40}},  # ~1 s: finishes within the grace period
    }
    clients = [threading.Thread(target=call, args=item) for item in bodies.items()]
    for client in clients:
        client.start()
    wait_until(lambda: metric(url, "lmi_num_requests_active") == 5, what="all five requests admitted")
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    exited_after = time.monotonic() - signalled
    for client in clients:
        client.join(10)

    assert process.returncode == 0, stderr
    assert exited_after < 30, exited_after  # SageMaker's SIGKILL comes 30 s after SIGTERM
    assert results["drains"] == (200, {"generated_text": "abcdefghijklmnopqrstuvwxyzabcdefghijklmn"})
    for name in ("json-1", "json-2"):
        status, body = results[name]
        assert status == 503 and body["type"] == "ServerShuttingDown" and body["code"] == 503, results[name]
    for name in ("stream-1", "stream-2"):
        status, lines = results[name]
        assert status == 200 and "token" in lines[0], results[name]
        assert lines[-1]["type"] == "ServerShuttingDown", lines[-1]  # LMI's error token line
        assert lines[-1]["details"]["finish_reason"] == "error", lines[-1]
    logged = re.findall(r"request_id=\S+ route=/invocations status=(\d+)", stderr)
    assert sorted(logged) == ["200", "503", "503", "503", "503"], stderr[-3000:]
    assert "Traceback" not in stderr and "Internal Server Error" not in stderr


def raw_connection(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    connection = socket.create_connection((host, int(port)), timeout=30)
    return connection


def read_until_closed(connection: socket.socket) -> bytes:
    data = b""
    while chunk := connection.recv(65536):
        data += chunk
    return data


def test_partial_headers_and_bodies_time_out_and_an_abandoned_upload_is_a_499(processes):
    process, url = start("--request-read-timeout", "1")
    processes.append(process)
    wait_listening(process, url)
    wait_ready(url, process)

    # Partial headers: each connection is answered 408 and closed (the client waits up to 30 s).
    slow_headers = [raw_connection(url) for _ in range(5)]
    for connection in slow_headers:
        connection.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
    for connection in slow_headers:
        answer = read_until_closed(connection)
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["type"] == "RequestTimeout"
        connection.close()

    # A partial body: 408 in the error shape, and the connection is closed.
    connection = raw_connection(url)
    connection.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 100\r\n\r\n{\"inputs\": ")
    answer = read_until_closed(connection)
    connection.close()
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body["type"] == "RequestTimeout" and "request_read_timeout" in body["message"]

    # A client that gives up mid-upload: logged and counted as 499, not as a 500.
    connection = raw_connection(url)
    connection.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 100000\r\n\r\n{\"inputs\": \"" + b"x" * 1000)
    time.sleep(0.2)  # let the server start reading the body
    connection.close()
    wait_until(lambda: metric(url, "lmi_requests_total", '{route="/invocations",status="499"}') == 1,
               what="the abandoned upload counted as 499")
    assert metric(url, "lmi_requests_total", '{route="/invocations",status="500"}') == 0

    # The server still serves.
    response = httpx.post(url + "/invocations", json={"inputs": "hi", "parameters": {"max_new_tokens": 3}}, timeout=10)
    assert response.json() == {"generated_text": "abc"}
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0
    assert "unexpected error" not in stderr and "Traceback" not in stderr
    assert re.search(r"route=/invocations status=499", stderr)
