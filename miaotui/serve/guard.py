"""ASGI middleware in front of every route: API key, shutdown, body size, request metrics and access logs.

Everything but OPEN_PATHS needs the key when one is configured, so a route added later cannot be left open
by mistake. Bodies are read here, up to the limit, before any handler sees them.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid

from miaotui.serve.metrics import Metrics

OPEN_PATHS = frozenset({"/health", "/ready"})
access_log = logging.getLogger("miaotui.serve.access")


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    503: "service_unavailable",
    504: "timeout_error",
}


async def send_error(send, status: int, message: str, code: str | None = None, headers: dict | None = None) -> None:
    body = json.dumps(error_body(message, ERROR_TYPES.get(status, "error"), None, code)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def key_matches(headers: list[tuple[bytes, bytes]], key: bytes) -> bool:
    """Whether `Authorization: Bearer KEY` (or `x-api-key: KEY`) carries the key, compared in constant time."""
    h = {k.lower(): v for k, v in headers}
    given = h.get(b"authorization", b"")
    token = given[7:].strip() if given[:7].lower() == b"bearer " else h.get(b"x-api-key", b"")
    return hmac.compare_digest(token, key)


class ServerState:
    """What the routes and the shutdown logic share: readiness, draining, requests in flight."""

    def __init__(self):
        self.ready = False
        self.draining = False
        self.inflight = 0


class Guard:
    """The outermost ASGI layer of the app."""

    def __init__(self, app, *, api_key: str | None, max_body: int, state: ServerState, metrics: Metrics, routes):
        self.app, self.max_body, self.state, self.metrics = app, max_body, state, metrics
        self.key = api_key.encode() if api_key else None
        self.routes = frozenset(routes)

    def _authorized(self, scope) -> bool:
        return key_matches(scope.get("headers") or [], self.key)

    async def _read_body(self, receive) -> bytes | None:
        """The whole body, or None when it exceeds the limit (checked before reading where the length is given)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"".join(chunks)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return None
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, start, status = scope["path"], time.perf_counter(), [500]
        scope.setdefault("state", {})  # shared with the handlers (request.state), read back for the access log
        request_id = uuid.uuid4().hex[:16]

        async def tracked_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            await self._handle(scope, receive, tracked_send, path)
        finally:
            route = path if path in self.routes else "other"
            self.metrics.requests.labels(route, str(status[0])).inc()
            entry = {
                "request_id": request_id,
                "method": scope.get("method"),
                "route": route,
                "status": status[0],
                "ms": round(1000 * (time.perf_counter() - start), 1),
                **scope["state"].get("log", {}),
            }
            access_log.info(json.dumps(entry))

    async def _handle(self, scope, receive, send, path: str) -> None:
        if path in OPEN_PATHS:
            return await self.app(scope, receive, send)
        if self.key is not None and not self._authorized(scope):
            return await send_error(
                send,
                401,
                "missing or wrong API key: send Authorization: Bearer KEY",
                "invalid_api_key",
                {"www-authenticate": "Bearer"},
            )
        if self.state.draining:
            return await send_error(send, 503, "the server is shutting down", "shutting_down", {"retry-after": "5"})
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await send_error(send, 413, f"request body larger than {self.max_body} bytes", "body_too_large")
        body = await self._read_body(receive)
        if body is None:
            return await send_error(send, 413, f"request body larger than {self.max_body} bytes", "body_too_large")
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        headers = [(k, v) for k, v in scope.get("headers", []) if k != b"content-type"]
        scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}  # bodies are JSON, always
        self.state.inflight += 1
        try:
            await self.app(scope, replay, send)
        finally:
            self.state.inflight -= 1
