"""A fake OpenAI-compatible chat-completions server on loopback, with scripted faults.

Tests point a real client (`openai.AsyncOpenAI`, `gad collect`, a judge) at `FakeOpenAI().url` and
get deterministic answers, while the server records every request (headers included) and can
answer a given prompt's first attempts with faults: an HTTP error status (optionally with
`Retry-After`), a hang past the client's timeout, a connection closed without a response, or a
200 that is no usable completion (see `BODY_FAULTS`: a body that is not JSON, one cut off
mid-way, an HTML page, no choices, no content).

    with FakeOpenAI(latency=0.05, faults={"q3": [Fault(429, retry_after=0.3)]}) as server:
        ...  # base_url=server.url
        server.requests  # every request, in arrival order

Faults are keyed by `key(request_json)` (default: the last user message's content) and
consumed in order, one per request with that key; once a key's list is used up it is answered
normally, so `[Fault(500)] * 100` makes a prompt fail for good. The server only binds
127.0.0.1 and shuts itself down after `lifetime` seconds even if a test forgets to.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal


@dataclass(frozen=True)
class Fault:
    """What the server does instead of answering one request."""

    status: int = 500
    """HTTP status of the error response (used when `kind == "status"`)."""
    kind: Literal[
        "status",
        "hang",
        "drop",
        "bad_json",
        "truncated",
        "cut",
        "html",
        "no_choices",
        "no_content",
        "not_object",
    ] = "status"
    """`status`: an error response; `hang`: wait `hang_s` then close; `drop`: close at once;
    the others are 200 responses that are no usable completion (`BODY_FAULTS`)."""
    retry_after: float | None = None
    """`Retry-After` header value in seconds, if any."""
    retry_after_ms: float | None = None
    """`retry-after-ms` header value, if any."""
    hang_s: float = 5.0
    """How long a `hang` holds the request (make it longer than the client's timeout)."""
    echo_auth: bool = False
    """Put the request's Authorization header into the error body (a careless server)."""
    body: dict[str, Any] | None = None
    """The error response's JSON body as sent (e.g. vLLM's `{"object": "error", "message": ...}`),
    instead of the default OpenAI-style `{"error": {...}}`."""


BODY_FAULTS = ("bad_json", "truncated", "cut", "html", "no_choices", "no_content", "not_object")
"""200 responses a careless proxy or server sends: garbage with a JSON content type
(`bad_json`), a completion cut off mid-way with a matching Content-Length (`truncated`) or with
the full Content-Length and the connection closed early (`cut`), an HTML error page (`html`),
`"choices": []` (`no_choices`), a choice whose content is null (`no_content`), a JSON list
(`not_object`)."""


def last_user_content(request: dict[str, Any]) -> str:
    """Default fault key and answer seed: the content of the last user message."""
    users = [m for m in request.get("messages", []) if m.get("role") == "user"]
    return str(users[-1].get("content", "")) if users else ""


def echo_answer(request: dict[str, Any]) -> str:
    """Default answer: derived from the prompt only, so any run can predict it."""
    return f"Answer to: {last_user_content(request)}"


@dataclass
class Request:
    """One received request and what the server did with it."""

    path: str
    headers: dict[str, str]
    """Request headers, names lower-cased."""
    body: dict[str, Any] | None
    key: str
    received: float
    """`time.monotonic()` when the request's body had been read."""
    outcome: str = ""
    """`ok`, or the fault: `status 429`, `hang`, `drop`."""
    finished: float = 0.0
    """`time.monotonic()` when the server answered (or gave up on) the request."""


@dataclass
class FakeOpenAI:
    """A threaded HTTP server speaking enough of the OpenAI API for chat completions."""

    responder: Callable[[dict[str, Any]], str] = echo_answer
    """Request JSON -> the assistant's answer text."""
    faults: dict[str, Sequence[Fault]] = field(default_factory=dict)
    """Per key, the faults served to that key's first requests, in order."""
    key: Callable[[dict[str, Any]], str] = last_user_content
    """Request JSON -> the key that `faults` is looked up by."""
    latency: float = 0.0
    """Seconds every successful answer waits before it is sent (a model's think time)."""
    lifetime: float = 120.0
    """The server stops by itself after this many seconds."""
    requests: list[Request] = field(default_factory=list)
    """Every request received, in order."""

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[str, int] = {}
        self._stopped = threading.Event()
        self._sockets: set[socket.socket] = set()
        self._server: ThreadingHTTPServer | None = None
        self._timer: threading.Timer | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        """Base URL for a client (`.../v1`)."""
        assert self._server is not None, "the server is not running"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> FakeOpenAI:
        """Bind a free loopback port and serve in a daemon thread."""
        handler = type("Handler", (_Handler,), {"fake": self})
        # The default listen backlog (5) resets connections when many clients connect at once.
        server_cls = type("Server", (ThreadingHTTPServer,), {"request_queue_size": 256})
        self._server = server_cls(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._server.block_on_close = False
        # A short poll interval lets stop() return quickly.
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        ).start()
        self._timer = threading.Timer(self.lifetime, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        """Stop serving, wake hanging handlers and close every open connection."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._timer is not None:
            self._timer.cancel()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ queries

    def requests_for(self, key: str) -> list[Request]:
        """The requests whose key is `key`, in arrival order."""
        with self._lock:
            return [r for r in self.requests if r.key == key]

    def completions(self) -> list[Request]:
        """Chat-completion requests only (not stray paths)."""
        with self._lock:
            return [r for r in self.requests if r.path.endswith("/chat/completions")]

    # ------------------------------------------------------------------ serving

    def _next_fault(self, key: str) -> Fault | None:
        with self._lock:
            attempt = self._seen.get(key, 0)
            self._seen[key] = attempt + 1
        scheduled = self.faults.get(key, ())
        return scheduled[attempt] if attempt < len(scheduled) else None

    def _answer(self, request: dict[str, Any]) -> dict[str, Any]:
        n = int(request.get("n") or 1)
        choices, completion_tokens = [], 0
        for i in range(n):
            text = self.responder(request)
            completion_tokens += len(text.split())
            choices.append(
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            )
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in request["messages"])
        return {
            "id": f"chatcmpl-{len(self.requests)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.get("model", "fake"),
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 keeps connections alive like a real API; every response sets Content-Length.
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; with Nagle's algorithm the second one waits
    # for the client's delayed ACK (~40 ms), which would swamp any latency being measured.
    disable_nagle_algorithm = True
    fake: FakeOpenAI

    def setup(self) -> None:
        super().setup()
        with self.fake._lock:
            self.fake._sockets.add(self.connection)

    def finish(self) -> None:
        with self.fake._lock:
            self.fake._sockets.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean

    def _send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        payload = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def _send_raw(self, payload: bytes, content_type: str, length: int | None = None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload) if length is None else length))
        self.end_headers()
        self.wfile.write(payload)

    def _send_body_fault(self, kind: str, answer: dict[str, Any]) -> None:
        full = json.dumps(answer).encode()
        if kind == "bad_json":
            self._send_raw(b"{'choices': [oops" + b"\x00garbage", "application/json")
        elif kind == "truncated":
            self._send_raw(full[: len(full) // 2], "application/json")
        elif kind == "cut":
            # Promise the whole body, send half, close: the client sees the body end early.
            self._send_raw(full[: len(full) // 2], "application/json", length=len(full))
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        elif kind == "html":
            page = b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"
            self._send_raw(page, "text/html")
        elif kind == "no_choices":
            self._send_raw(json.dumps({**answer, "choices": []}).encode(), "application/json")
        elif kind == "no_content":
            choice = {**answer["choices"][0], "message": {"role": "assistant", "content": None}}
            self._send_raw(json.dumps({**answer, "choices": [choice]}).encode(), "application/json")
        else:  # not_object
            self._send_raw(json.dumps([answer]).encode(), "application/json")

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        fake = self.fake
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw)
        except json.JSONDecodeError:
            body = None
        record = Request(
            path=self.path,
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
            key=fake.key(body) if isinstance(body, dict) else "",
            received=time.monotonic(),
        )
        with fake._lock:
            fake.requests.append(record)
        try:
            if not self.path.endswith("/chat/completions"):
                record.outcome = "status 404"
                self._send_json(404, {"error": {"message": "not found", "type": "invalid"}})
                return
            if not isinstance(body, dict):
                # Also what a client killed in the middle of sending its body leaves behind.
                record.outcome = "status 400"
                self._send_json(400, {"error": {"message": "body is not JSON", "type": "invalid"}})
                return
            fault = fake._next_fault(record.key)
            if fault is None:
                if fake.latency and fake._stopped.wait(fake.latency):
                    raise ConnectionAbortedError("server stopped")
                answer = fake._answer(body)
                record.outcome = "ok"
                self._send_json(200, answer)
            elif fault.kind == "status":
                record.outcome = f"status {fault.status}"
                headers = {}
                if fault.retry_after is not None:
                    headers["Retry-After"] = str(fault.retry_after)
                if fault.retry_after_ms is not None:
                    headers["retry-after-ms"] = str(fault.retry_after_ms)
                message = f"injected fault {fault.status}"
                if fault.echo_auth:
                    message += f" (you sent Authorization: {self.headers.get('Authorization')})"
                error = {"message": message, "type": "fake_fault", "code": fault.status}
                body = {"error": error} if fault.body is None else fault.body
                self._send_json(fault.status, body, headers)
            elif fault.kind in BODY_FAULTS:
                record.outcome = fault.kind
                self._send_body_fault(fault.kind, fake._answer(body))
            else:
                record.outcome = fault.kind
                if fault.kind == "hang":
                    fake._stopped.wait(fault.hang_s)
                # Close without a status line: the client sees a dropped connection.
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            # The client gave up (timeout) or the server is stopping: nothing left to send.
            self.close_connection = True
        finally:
            record.finished = time.monotonic()
