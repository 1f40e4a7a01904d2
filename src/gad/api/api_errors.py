"""What an OpenAI-compatible server's failure means to a run: one request's problem, or one
that every request would repeat (and so stops the run), what to change, and the key never shown.

Stops (`Refused`): a 401/403/404 at once (bad key, no access, unknown model or endpoint), and a
400/422 when the first `SAME_REJECTIONS` answers of a call (or all of them, in a shorter call)
are that status with the same message and none succeeded before (`SameRejection`; a call of a
single request never stops): a request
setting the server refuses, e.g. vLLM's `max_tokens=1536 cannot be greater than
max_model_len=1024`. A 400 for one too-long prompt, among answers, stays that prompt's failure.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

MAX_ERROR_CHARS = 1000
"""Error texts are cut to this length (an HTML error page can be huge)."""

SAME_REJECTIONS = 3
"""A call's first answers that must all be the same 400 before it counts as the run's fault:
one is a prompt's problem, three identical in a row with no success is the settings'."""

LONG_KEY = 12
"""Keys at least this long are also redacted inside longer text (a URL-encoded header): a
random string that long never occurs by chance, while `x` or `EMPTY` do, inside words."""


class Refused(Exception):
    """The API refused the run with an error every other request would hit too (bad key, no
    access, unknown model, a request setting the server rejects). `detail` is that error with
    the key redacted, `status` its HTTP status, `message` the server's own words."""

    def __init__(self, detail: str, status: int | None = None, message: str = "") -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status
        self.message = message or detail


def redact(text: str, key: str) -> str:
    """`text` with `key` replaced by `***` where it stands as a whole token (not inside a word:
    with the key `x`, `max_tokens` stays as it is), and anywhere when the key is long."""
    if not key:
        return text
    if len(key) >= LONG_KEY:
        return text.replace(key, "***")
    return re.sub(rf"(?<![\w-]){re.escape(key)}(?![\w-])", "***", text)


def describe(err: BaseException) -> str:
    """`Type: message`, with the low-level cause of a connection error (else it says little)."""
    cause = err.__cause__
    if cause is not None and type(cause).__name__ == "MalformedResponse":
        return f"MalformedResponse: {cause}"[:MAX_ERROR_CHARS]
    text = f"{type(err).__name__}: {err}"
    if cause is not None and str(cause) not in text:
        text += f" ({type(cause).__name__}: {cause})"
    return text[:MAX_ERROR_CHARS]


def server_message(err: BaseException) -> str:
    """The server's own message of an error response (`{"message": ...}` at the top, as vLLM
    writes it, or under `error`, as OpenAI does), else the error's text."""
    body = getattr(err, "body", None)
    inner = body.get("error", body) if isinstance(body, dict) else None
    message = inner.get("message") if isinstance(inner, dict) else None
    text = message if isinstance(message, str) and message else str(err)
    return " ".join(text.split())[:MAX_ERROR_CHARS]


def status_of(err: BaseException) -> int | None:
    status = getattr(err, "status_code", None)
    return status if isinstance(status, int) else None


def completion_problem(body: bytes) -> str | None:
    """What makes a 200 body unusable as a chat completion, or None when it is one: not JSON
    (cut off, an HTML page, garbage), not an object, no choices, or no text in the first."""
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        head = body[:200].decode("utf-8", "replace").strip()
        preview = " ".join(head.split())[:80]
        if head.startswith("<"):
            return f"an HTML page, not JSON ({preview!r})"
        if head.startswith("{"):
            return f"a body that is not valid JSON, cut off or garbled ({len(body)} bytes)"
        return f"a body that is not JSON ({len(body)} bytes: {preview!r})"
    if not isinstance(obj, dict):
        return f"a JSON {type(obj).__name__}, not a completion object"
    choices = obj.get("choices")
    if not isinstance(choices, list) or not choices:
        error = obj.get("error")
        if isinstance(error, dict) and error.get("message"):
            return f"an error object ({str(error['message'])[:200]})"
        return "no choices"
    choice = choices[0]
    message = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(message, dict) or not isinstance(message.get("content"), str):
        reason = choice.get("finish_reason") if isinstance(choice, dict) else None
        return f"no content in the first choice (finish_reason={reason})"
    if not isinstance(obj.get("usage"), dict | None):
        return "a malformed usage field"
    return None


def refusals() -> tuple[type[BaseException], ...]:
    """API errors that every other request would hit too (bad key, no access, unknown model):
    they stop a run instead of filling its failures with a configuration problem."""
    import openai

    return (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError)


@dataclass
class SameRejection:
    """Whether a call's 400s are the settings' fault: its first answers all the same 400/422
    message and no success yet (see the module doc). One per `complete` call."""

    total: int
    """Requests of the call: a call shorter than `SAME_REJECTIONS` stops when all are refused
    (a call of one never stops: its failure is the item's)."""
    message: str | None = None
    count: int = 0
    open: bool = True
    """False once anything else happened first (a success, another error, another message)."""

    def failed(self, err: BaseException) -> bool:
        """Record a failed request; True when the run should stop on it."""
        if not self.open:
            return False
        if status_of(err) not in (400, 422):
            self.open = False
            return False
        message = server_message(err)
        if self.message is None:
            self.message = message
        elif message != self.message:
            self.open = False
            return False
        self.count += 1
        # One request's 400 is only ever that request's: it is journaled, not a stop.
        return self.total > 1 and self.count >= min(SAME_REJECTIONS, self.total)

    def succeeded(self) -> None:
        self.open = False


_TOKEN_WORDS = ("max_tokens", "max_model_len", "context length", "maximum context", "max_new")


def what_to_change(err: Refused, key_env: str, token_setting: str) -> str:
    """The setting a user changes to get past `err`, in words (`token_setting`: the stage's
    name for the answer-length budget the request sent as `max_tokens`)."""
    if err.status == 401:
        return f"the API key in ${key_env} (the server rejected it)"
    if err.status == 403:
        return f"the API key in ${key_env} or `model` (the key has no access to it)"
    if err.status == 404:
        return "`model` or `base_url` (the server has no such model or endpoint)"
    text = err.message.lower()
    if any(word in text for word in _TOKEN_WORDS):
        return f"`{token_setting}` (the server's limit is in its message)"
    for name in ("temperature", "top_p", "model"):
        if name in text:
            return f"`{name}`"
    return "the setting the server's message names"


def refused(err: BaseException, key: str) -> Refused:
    """The `Refused` of a stopping error, its texts redacted."""
    return Refused(redact(describe(err), key), status_of(err), redact(server_message(err), key))
