"""Reliability of the HTTP layer against the fake engine: requests that can never be served are 400s (not a
retryable 503), the optional API key, and slow or vanishing clients."""

from __future__ import annotations

import httpx

from tests.support.fake_engine import FakeEngine
from tests.unit.test_http_app import assert_error, serve  # noqa: F401 - `serve` is a fixture


def test_a_list_input_larger_than_the_queue_is_a_400_not_a_retryable_503(serve):
    served = serve(FakeEngine(), job_queue_size=2)
    response = served.post({"inputs": ["a", "b", "c"], "parameters": {"max_new_tokens": 1}})
    body = assert_error(response, 400, "InvalidRequest", "3 prompts", "job_queue_size=2")
    assert "Retry-After" not in response.headers, body
    assert served.engine.added == []  # nothing was submitted
    ok = served.post({"inputs": ["a", "b"], "parameters": {"max_new_tokens": 1}})
    assert ok.status_code == 200 and len(ok.json()) == 2
