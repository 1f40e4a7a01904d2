"""The chat client under the teacher, the judge and the labeller: conversations in, replies out.

`connect(settings)` gives a client for an OpenAI-compatible chat-completions API
(`backend="openai"`) or a local model (`backend="local"`). `client.complete(conversations,
sampling, on_reply)` answers every conversation once, calls `on_reply(i, reply)` the moment
reply i is there (so the caller can journal it before the next one, see `gad.journal`) and
returns the replies in order. A `Reply` holds the text, or the error that left it without one.
`client.requests` counts HTTP attempts (API) or generated sequences (local), `client.retried`
the attempts that were retries.

API backend: one request per conversation (no `n`: every reply maps to its own request, which
keeps exactly-once bookkeeping trivial and works with servers that ignore `n`), at most
`concurrency` in flight. Retries are the official client's own: `max_retries` attempts more on
408/409/429/5xx, timeouts and dropped connections, and on a 200 that is not a usable chat
completion (a body that is not JSON or is cut off, an HTML page, no choices, no content: see
`completion_problem`; such a response is turned into a transport error, so the client retries it
exactly like a dropped connection), waiting `retry-after-ms` / `Retry-After` (seconds or HTTP
date) when the server gives one of at most 120 s, else exponential backoff 0.5 s * 2^k capped at
8 s with up to 25% jitter. A `Retry-After` above 120 s makes the client give up at once. A
request that still fails becomes a reply with its error (`describe`); errors no request can get
past (bad key, no permission, unknown model, a request setting the server rejects every time:
see `gad.api_errors`) stop the run with `Refused` once the requests in flight have finished
(their replies still reach `on_reply`, so they are journaled).

Local backend: `gad.models.load` + `TransformersRollout`; conversations longer than
`max_prompt_tokens` after the chat template are replies with an error, never cut; the rest is
generated in batches of similar length.

The API key is read from the environment variable `api_key_env` (`api_key`) and never logged or
returned: a server that echoes it has it replaced by `***` in every text and error (as a whole
token: a key `x` leaves `max_tokens` alone, see `api_errors.redact`).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal, Protocol

from gad.api.api_errors import (
    Refused as Refused,
)
from gad.api.api_errors import (
    SameRejection,
    completion_problem,
    describe,
    redact,
    refusals,
    refused,
)
from gad.config import load as cfg
from gad.config.parts import ChatSettings as ChatSettings
from gad.data import chats

Messages = list[dict[str, str]]


class ChatError(cfg.UserError, RuntimeError):
    """The chat client cannot start (no API key); stages pass their own error type instead."""


@dataclass(frozen=True)
class Sampling:
    """How one `complete` call samples."""

    temperature: float
    max_response_tokens: int
    top_p: float | None = None
    """None: not sent to the API (some refuse it; its default applies), 1.0 for a local model."""


@dataclass(frozen=True)
class Reply:
    """The answer to one conversation: `text`, or the `error` that left it without one."""

    text: str | None = None
    error: str | None = None
    finish_reason: str = "stop"
    prompt_tokens: int | None = None
    """As the server counted them (None when it did not say), or the local template's length."""
    completion_tokens: int | None = None
    prompt_too_long: bool = False
    """Local backend: not run because the templated conversation exceeds `max_prompt_tokens`."""


OnReply = Callable[[int, Reply], None]


class Client(Protocol):
    requests: int
    retried: int

    def complete(
        self, conversations: list[Messages], sampling: Sampling, on_reply: OnReply | None = None
    ) -> list[Reply]:
        """One reply per conversation, in order; `on_reply(i, reply)` as each arrives."""
        ...


def connect(
    settings: ChatSettings,
    *,
    error: type[Exception] = ChatError,
    seeding: Literal["once", "per_batch"] = "once",
) -> Client:
    """The client `settings.backend` names; `error` is raised when the API key is missing.

    `seeding` (local backend): `once` seeds torch with `seed` at the start of every `complete`
    call, so a collection is one reproducible stream (`gad collect`, `gad generate`);
    `per_batch` gives every batch of every call its own seeds, so asking again is a fresh sample
    when temperature > 0 (the judge's retries of an unparsable verdict).
    """
    if settings.backend == "openai":
        return ApiClient(settings, error)
    if settings.backend == "local":
        return LocalClient(settings, seeding)
    raise cfg.ConfigError(f"'backend' must be 'openai' or 'local', got {settings.backend!r}")


def _settle(replies: list[Reply | None], i: int, reply: Reply, on_reply: OnReply | None) -> None:
    replies[i] = reply
    if on_reply is not None:
        on_reply(i, reply)


# ---------------------------------------------------------------- API backend


def api_key(env_name: str, error: type[Exception]) -> str:
    """The API key from the environment variable `env_name`; `error` when it is missing."""
    key = os.environ.get(env_name, "")
    if not key:
        raise error(
            f"no API key: the environment variable {env_name} is not set or empty "
            f"(set it, or point `api_key_env` at the variable that holds the key)"
        )
    return key


@cache
def _malformed_type(http_error: type[Exception]) -> type[Exception]:
    """A subclass of the HTTP library's decoding error, which the SDK retries as it retries a
    dropped connection (same backoff) and finally raises as APIConnectionError from it."""
    return type("MalformedResponse", (http_error,), {"__module__": __name__})


def _http_library(client_type: type) -> Any:
    """The httpx-like module the SDK's HTTP client comes from (httpx, or httpx2 in newer SDKs)."""
    for base in client_type.__mro__:
        root = base.__module__.split(".")[0]
        if root.startswith("httpx"):
            return sys.modules[root]
    import httpx

    return httpx


def api_client(settings: ChatSettings, key: str, on_request: Callable[[Any], Any]) -> Any:
    """AsyncOpenAI with the client's own retries and backoff, plus a hook called on every
    attempt (for counting) and one that makes an unusable 200 a retryable fault (see
    `completion_problem`)."""
    import openai

    http = _http_library(openai.DefaultAsyncHttpxClient)
    malformed = _malformed_type(http.DecodingError)

    async def check_completion(response: Any) -> None:
        path = response.request.url.path
        if response.status_code != 200 or not path.endswith("/chat/completions"):
            return
        # A body cut short of its Content-Length raises the library's own protocol error here,
        # which the SDK retries too.
        problem = completion_problem(await response.aread())
        if problem is not None:
            raise malformed(f"HTTP 200 with {problem}", request=response.request)

    hooks = {"request": [on_request], "response": [check_completion]}
    return openai.AsyncOpenAI(
        api_key=key,
        base_url=settings.base_url,
        max_retries=settings.max_retries,
        timeout=settings.request_timeout,
        # The SDK's default client (its connection limits, redirects) plus the two hooks.
        http_client=openai.DefaultAsyncHttpxClient(event_hooks=hooks),
    )


async def run_pool(
    client: Any,
    items: Iterable[Any],
    ask: Callable[[Any], Any],
    concurrency: int,
    fatal: list[BaseException],
) -> None:
    """`await ask(item)` for every item with `concurrency` workers; once `fatal` holds an error,
    no further item is started."""
    pending = iter(items)  # shared by the workers; next() never awaits, so no item runs twice

    async def worker() -> None:
        for item in pending:
            if fatal:
                return
            await ask(item)

    async with client:
        await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))


def _count(value: Any) -> int | None:
    """A token count as the server gave it, if it is one (servers are not all careful)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# Attempts of the request the current task is making; the httpx hook runs in the same task.
_attempts: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "gad_chat_attempts", default=None
)


class ApiClient:
    """Chat completions from an OpenAI-compatible API (see the module doc)."""

    def __init__(self, settings: ChatSettings, error: type[Exception] = ChatError) -> None:
        self.settings = settings
        self.key = api_key(settings.api_key_env, error)
        self.requests = 0
        self.retried = 0

    def redact(self, text: str) -> str:
        return redact(text, self.key)

    def complete(
        self, conversations: list[Messages], sampling: Sampling, on_reply: OnReply | None = None
    ) -> list[Reply]:
        if not conversations:
            return []  # no client opened for nothing
        return asyncio.run(self._complete(conversations, sampling, on_reply))

    async def _complete(
        self, conversations: list[Messages], sampling: Sampling, on_reply: OnReply | None
    ) -> list[Reply]:
        import openai

        async def count_attempt(request: Any) -> None:
            self.requests += 1
            box = _attempts.get()
            if box is not None:
                box[0] += 1

        client = api_client(self.settings, self.key, count_attempt)
        replies: list[Reply | None] = [None] * len(conversations)
        fatal: list[BaseException] = []
        same = SameRejection(len(conversations))
        # Sent only when the caller sets it: a judge never sent top_p.
        extra = {} if sampling.top_p is None else {"top_p": sampling.top_p}

        async def ask(i: int) -> None:
            box = [0]
            token = _attempts.set(box)
            try:
                response = await client.chat.completions.create(
                    model=self.settings.model,
                    messages=conversations[i],  # type: ignore[arg-type]
                    temperature=sampling.temperature,
                    max_tokens=sampling.max_response_tokens,
                    **extra,
                )
            except refusals() as err:
                fatal.append(err)
                return
            except openai.APIError as err:
                reply = Reply(error=self.redact(describe(err)))
                if same.failed(err):
                    fatal.append(err)
            else:
                reply = self._reply(response)
                same.succeeded()
            finally:
                self.retried += max(0, box[0] - 1)
                _attempts.reset(token)
            _settle(replies, i, reply, on_reply)

        await run_pool(client, range(len(conversations)), ask, self.settings.concurrency, fatal)
        if fatal:
            raise refused(fatal[0], self.key)
        return replies  # type: ignore[return-value]

    def _reply(self, response: Any) -> Reply:
        choice = response.choices[0] if response.choices else None
        text = choice.message.content if choice is not None else None
        if text is None:
            reason = choice.finish_reason if choice is not None else "no choices"
            return Reply(error=f"EmptyAnswer: the response has no text (finish_reason={reason})")
        usage = response.usage
        return Reply(
            # Only a server that echoes credentials puts the key here; it must reach no file.
            text=self.redact(text),
            finish_reason=choice.finish_reason or "stop",  # type: ignore[union-attr]
            prompt_tokens=_count(getattr(usage, "prompt_tokens", None)),
            completion_tokens=_count(getattr(usage, "completion_tokens", None)),
        )


# ---------------------------------------------------------------- local backend


class LocalClient:
    """A local model: `store.load` + `TransformersRollout`, or a vLLM engine on its folder
    (`engine`; see `connect` for `seeding`)."""

    def __init__(
        self, settings: ChatSettings, seeding: Literal["once", "per_batch"] = "once"
    ) -> None:

        from gad.train import engines

        self.settings = settings
        self.seeding = seeding
        self.rollout, self.tokenizer = engines.for_model(settings, settings.model)
        self.requests = 0
        self.retried = 0
        self._batches = 0

    def complete(
        self, conversations: list[Messages], sampling: Sampling, on_reply: OnReply | None = None
    ) -> list[Reply]:
        import torch

        from gad.train import rollout

        how = rollout.Sampling(
            temperature=sampling.temperature,
            top_p=1.0 if sampling.top_p is None else sampling.top_p,
            max_response_tokens=sampling.max_response_tokens,
        )
        replies: list[Reply | None] = [None] * len(conversations)
        limit = self.settings.max_prompt_tokens
        encoded: dict[str, list[int]] = {}  # samples of one prompt share its encoding
        runnable: list[tuple[int, list[int]]] = []
        for i, messages in enumerate(conversations):
            key = json.dumps(messages, sort_keys=True, ensure_ascii=False)
            if key not in encoded:
                encoded[key] = chats.encode_prompt(self.tokenizer, messages)
            ids = encoded[key]
            if len(ids) > limit:
                too_long = f"prompt too long: {len(ids)} tokens > {limit}"
                _settle(replies, i, Reply(error=too_long, prompt_too_long=True), on_reply)
            else:
                runnable.append((i, ids))
        # Similar lengths in one batch waste less compute on padding.
        runnable.sort(key=lambda pair: len(pair[1]))
        if self.seeding == "once":
            torch.manual_seed(self.settings.seed)
        size = self.settings.generation_batch_size
        for start in range(0, len(runnable), size):
            batch = runnable[start : start + size]
            completions = self._generate(batch, how)
            self.requests += len(batch)
            for (i, ids), (completion,) in zip(batch, completions, strict=True):
                reply = Reply(
                    text=completion.text,
                    finish_reason=completion.finish_reason,
                    prompt_tokens=len(ids),
                    completion_tokens=len(completion.token_ids),
                )
                _settle(replies, i, reply, on_reply)
        return replies  # type: ignore[return-value]

    def _generate(self, batch: list[tuple[int, list[int]]], how: Any) -> list[list[Any]]:
        prompts = [ids for _, ids in batch]
        if self.seeding == "once":
            return self.rollout.generate(prompts, 1, how)
        # Distinct seeds per batch and call: a retried verdict is a fresh sample when
        # temperature > 0.
        self._batches += 1
        seed = self.settings.seed * 1_000_003 + self._batches * 1009
        return self.rollout.generate(prompts, 1, how, [seed + i for i, _ in batch])
