"""A guard in front of the app's HTTP routes: request bodies capped before anything parses them, and calls with
missing or malformed inputs answered with one clear sentence instead of reaching a handler.

Written as plain ASGI middleware (Gradio hands it to the FastAPI app it builds): Gradio reads the whole body of a
call before it checks anything, and answers a call with the wrong inputs with ``{"error": null}``.
"""
from __future__ import annotations

import json
import re

#: Routes that run an event handler: Gradio's queue (what gradio_client and the page use) and its REST API.
CALL = re.compile(r"/(?:gradio_api/)?(?:call|run|api)/(?P<api_name>[\w-]+)/?$")
QUEUE = re.compile(r"/(?:gradio_api/)?queue/join/?$")


class RequestGuard:
    """ASGI middleware: ``max_bytes`` per request body; ``inputs`` maps an api name and a fn index to
    ``(name, number of inputs)`` of the handler it calls."""

    def __init__(self, app, max_bytes: int, inputs: dict):
        self.app, self.max_bytes, self.inputs = app, max_bytes, inputs

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await _refuse(send, 413, self._too_large(declared.decode(errors="replace")))
        body, more = b"", True
        while more:  # read at most max_bytes + 1, whatever the headers said
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await _refuse(send, 413, self._too_large(f"more than {self.max_bytes}"))
        problem = self._malformed(scope["path"], body)
        if problem:
            return await _refuse(send, 422, problem)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    def _too_large(self, size: str) -> str:
        return (f"request body of {size} bytes is over this app's limit of {self.max_bytes} bytes "
                "(server.max_request_bytes)")

    def _malformed(self, path: str, body: bytes) -> str | None:
        """One sentence if a call to a handler lacks its inputs or names no handler; None otherwise."""
        call, queue = CALL.search(path), QUEUE.search(path)
        if not (call or queue):
            return None
        try:
            payload = json.loads(body or b"null")
        except (ValueError, RecursionError):
            return "request body: expected JSON"
        if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
            return "request body: expected a JSON object with a 'data' list of the inputs"
        key = call.group("api_name") if call else payload.get("fn_index")
        if key not in self.inputs or isinstance(key, bool):
            return f"no such endpoint: {key!r}" if call else "request body: 'fn_index' names no endpoint"
        name, expected = self.inputs[key]
        if len(payload["data"]) != expected:
            return f"{name}: expected {expected} inputs in 'data', got {len(payload['data'])}"
        return None


async def _refuse(send, status: int, sentence: str) -> None:
    body = json.dumps({"error": sentence}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def endpoint_inputs(demo) -> dict:
    """``{api_name or fn_index: (name, number of inputs)}`` of every event handler of a Gradio Blocks."""
    found = {}
    for index, fn in demo.fns.items():
        name = fn.api_name if isinstance(fn.api_name, str) else f"event {index}"
        found[index] = (name, len(fn.inputs))
        if isinstance(fn.api_name, str):
            found[fn.api_name] = (name, len(fn.inputs))
    return found
