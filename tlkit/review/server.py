"""A saved model -> an HTTP server: MLflow's scoring server (the same /invocations, /ping, /version) behind a guard
that reads each request before MLflow does and refuses, in one line and without echoing it, what MLflow would
answer with a traceback or with the request itself.

What the guard refuses before MLflow parses anything (the model's own checks, `tlkit.review.serving`, follow):
- a body larger than the request limit (413; TLKIT_SERVE_MAX_REQUEST_MB, read while the body arrives);
- another content type than application/json (415);
- text that is not JSON, JSON nested deeper than MAX_DEPTH, or not a table of images in one of MLflow's request
  forms (400).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

MAX_DEPTH = 8  # {"dataframe_split": {"data": [["..."]]}} is 4 deep; a table of images never needs more
FRAMING = 2**16  # bytes of JSON around the images, beyond the images' own limit
DRAIN = 8  # a body over the limit is read to its end (and dropped) up to this many times the limit, then answered
CODE = "INVALID_PARAMETER_VALUE"  # the error code of every refusal, the model's own included
FORMS = ("dataframe_split", "dataframe_records", "inputs", "instances")

Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


def request_problem(body: bytes) -> str | None:
    """What is wrong with a JSON request body, in one line that quotes none of it; None when it is a table of images
    in one of MLflow's forms."""
    try:
        parsed = json.loads(body)
    except RecursionError:
        return f"the request is JSON nested deeper than {MAX_DEPTH} levels; send a table of images"
    except UnicodeDecodeError:
        return "the request is not UTF-8 text; send JSON"
    except json.JSONDecodeError as err:
        return f"the request is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})"
    if _depth(parsed) > MAX_DEPTH:
        return f"the request is JSON nested deeper than {MAX_DEPTH} levels; send a table of images"
    if not isinstance(parsed, dict) or len(set(parsed) & set(FORMS)) != 1:
        return f"the request must be a JSON object with one of the keys {', '.join(FORMS)}; see docs/serving.md"
    return None


def _depth(value: Any) -> int:
    """How deeply lists and objects nest in parsed JSON (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        if level > MAX_DEPTH:
            return level
        stack.extend((child, level + 1) for child in children)
    return deepest


class RequestGuard:
    """An ASGI wrapper: reads an /invocations request whole (up to `max_bytes` of images and FRAMING bytes of JSON),
    checks it, then hands the same bytes to the wrapped app; every other path goes straight through."""

    def __init__(self, app, *, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") != "/invocations" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        too_large = (
            f"the request is above the limit of {self.max_bytes / 2**20:g} MB (TLKIT_SERVE_MAX_REQUEST_MB); "
            "send fewer or smaller images per request"
        )
        mime = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if mime != b"application/json":
            await _refuse(send, 415, "send the images as JSON (Content-Type: application/json)")
            return
        body, received, limit = bytearray(), 0, self.max_bytes + FRAMING
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            received += len(chunk)
            if received <= limit:
                body += chunk
            # past the limit the rest is read and dropped (a client answered mid-upload sees a reset, not the answer),
            # up to DRAIN times the limit
            if not message.get("more_body", False) or received > DRAIN * limit:
                break
        if received > limit:
            await _refuse(send, 413, too_large)
            return
        problem = request_problem(bytes(body))
        if problem is not None:
            await _refuse(send, 400, problem)
            return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _refuse(send: Send, status: int, message: str) -> None:
    """MLflow's error shape ({"error_code", "message"}), so a client reads every refusal the same way."""
    payload = json.dumps({"error_code": CODE, "message": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": payload})


def create_app(model_folder: str, *, max_bytes: int):
    """The scoring app of the MLflow model in `model_folder` (a folder holding MLmodel), behind the guard."""
    import mlflow.pyfunc
    from mlflow.pyfunc import scoring_server

    return RequestGuard(scoring_server.init(mlflow.pyfunc.load_model(model_folder)), max_bytes=max_bytes)


def serve(model_folder: str, *, host: str, port: int, max_bytes: int) -> None:
    """Serve until SIGINT or SIGTERM (uvicorn's own handling: requests under way are finished)."""
    import uvicorn

    uvicorn.run(create_app(model_folder, max_bytes=max_bytes), host=host, port=port, log_level="warning")
