"""`tlkit serve`'s request guard, in-process: what it refuses before MLflow parses a request, and what it passes on
unchanged. The real server on loopback: test_serving."""

import asyncio
import json

import pytest

from tlkit.review.server import MAX_DEPTH, RequestGuard, request_problem


class Inner:
    """The wrapped app: records the body it was handed and answers 200."""

    def __init__(self):
        self.bodies = []

    async def __call__(self, scope, receive, send):
        message = await receive()
        self.bodies.append(message["body"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


def call(guard, body: bytes, *, path="/invocations", content_type=b"application/json", chunk=1000):
    """One request through the guard, its body in chunks; (status, parsed answer or None)."""
    parts = [body[i : i + chunk] for i in range(0, len(body), chunk)] or [b""]
    messages = [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)]
    sent = []

    async def receive():
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "path": path,
        "method": "POST",
        "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())],
    }
    asyncio.run(guard(scope, receive, send))
    status = sent[0]["status"]
    payload = b"".join(m.get("body", b"") for m in sent[1:])
    return status, (json.loads(payload) if status != 200 else None)


def table(*images: str) -> bytes:
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": [[i] for i in images]}}).encode()


def test_a_table_of_images_passes_unchanged():
    inner = Inner()
    body = table("aGVsbG8=", "d29ybGQ=")
    assert call(RequestGuard(inner, max_bytes=2**20), body, chunk=7) == (200, None)
    assert inner.bodies == [body]


@pytest.mark.parametrize(
    "body, fragment",
    [
        (b"[" * 100_000 + b"]" * 100_000, f"nested deeper than {MAX_DEPTH}"),  # json.loads: RecursionError
        (json.dumps({"inputs": [[[[[[[[[["x"]]]]]]]]]]}).encode(), f"nested deeper than {MAX_DEPTH}"),
        (b'{"dataframe_split": {"columns": ["image"], "data": [["secret-request-text', "not valid JSON"),
        (b"\xff\xfe not text", "not UTF-8"),
        (json.dumps({"something": "secret-request-text"}).encode(), "one of the keys"),
        (json.dumps(["secret-request-text"]).encode(), "one of the keys"),
    ],
)
def test_what_mlflow_would_echo_or_crash_on_is_refused_in_one_line_without_the_request(body, fragment):
    inner = Inner()
    status, answer = call(RequestGuard(inner, max_bytes=2**20), body)
    assert status == 400
    assert answer["error_code"] == "INVALID_PARAMETER_VALUE"
    assert fragment in answer["message"]
    assert "secret" not in answer["message"]
    assert "\n" not in answer["message"]
    assert inner.bodies == []  # MLflow never saw it


def test_a_body_over_the_limit_is_refused_while_it_arrives_and_other_types_are_refused():
    inner = Inner()
    guard = RequestGuard(inner, max_bytes=1000)
    status, answer = call(guard, table("A" * 200_000))
    assert status == 413
    assert "TLKIT_SERVE_MAX_REQUEST_MB" in answer["message"]
    status, answer = call(guard, b"image\nAAAA\n", content_type=b"text/csv")
    assert status == 415
    assert "application/json" in answer["message"]
    assert inner.bodies == []


def test_other_paths_go_straight_through():
    inner = Inner()
    assert call(RequestGuard(inner, max_bytes=10), b"x" * 100, path="/ping", content_type=b"text/plain")[0] == 200


def test_request_problem_accepts_each_of_mlflows_forms():
    for body in (table("x"), json.dumps({"dataframe_records": [{"image": "x"}]}).encode()):
        assert request_problem(body) is None
