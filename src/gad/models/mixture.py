"""A teacher that is a mixture of hidden contexts, with its exact probabilities.

A local teacher answers under a hidden context (`teacher_context`); a *mixture* draws one of
K contexts per answer with prior weight w_k and answers under it. Its exact next-token
distribution after y<t is then Σ_k w_k(t) p_k(·|y<t) with the posterior
w_k(t) ∝ w_k p_k(y<t): K teacher passes give every exact number, and the sequence log-prob
telescopes to log Σ_k w_k p_k(y). A single context is the mixture of one.

The file is either a JSON list of {role, content} messages (one context) or
``{"mixture": [{"weight": 0.5, "messages": [...]}, ...]}``; weights are normalised.

Pure functions of tensors below; suffixes name shapes: ``_k`` [components], ``_kt``
[components, positions], ``_ktv`` [components, positions, vocab].
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from gad.config import load as cfg


@dataclass(frozen=True)
class Component:
    """One hidden context of the teacher and its prior weight (the weights sum to 1)."""

    weight: float
    messages: list[dict[str, str]]


def load(path: str | None) -> list[Component]:
    """The teacher's contexts from `path` (none: one empty context). Errors name the file."""
    if not path:
        return [Component(1.0, [])]
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise cfg.ConfigError(f"teacher_context: cannot read {path}: {err}") from err
    if isinstance(raw, dict) and set(raw) == {"mixture"} and isinstance(raw["mixture"], list):
        parts = raw["mixture"]
    else:
        parts = [{"weight": 1.0, "messages": raw}]
    out = []
    for i, part in enumerate(parts):
        where = f"teacher_context: {path}: mixture[{i}]" if len(parts) > 1 else path
        weight = part.get("weight") if isinstance(part, dict) else None
        if not isinstance(weight, (int, float)) or not weight > 0 or not math.isfinite(weight):
            raise cfg.ConfigError(f"{where}: 'weight' must be a positive number")
        out.append(Component(float(weight), _messages(part.get("messages"), where)))
    if not out:
        raise cfg.ConfigError(f"teacher_context: {path}: 'mixture' holds no context")
    total = sum(c.weight for c in out)
    return [Component(c.weight / total, c.messages) for c in out]


def _messages(messages: object, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not all(
        isinstance(x, dict) and {"role", "content"} <= set(x) for x in messages
    ):
        raise cfg.ConfigError(f"{where} must hold a JSON list of {{'role', 'content'}} messages")
    return [{"role": x["role"], "content": x["content"]} for x in messages]


def log_weights(components: list[Component]) -> torch.Tensor:
    """[K] log prior weights."""
    return torch.tensor([math.log(c.weight) for c in components], dtype=torch.float64)


def posterior(token_logp_kt: torch.Tensor, log_weight_k: torch.Tensor) -> torch.Tensor:
    """Log posterior over components *before* each position: log w_k(t) ∝ log w_k + Σ_{s<t}
    log p_k(y_s|y<s).

    Args:
        token_logp_kt: [K, T] each component's log-prob of the sequence's token at each position.
        log_weight_k: [K] log prior weights.

    Returns:
        [K, T] float64 log posteriors (log-softmax over K at every position).
    """
    token_logp_kt = token_logp_kt.double()
    prefix_kt = token_logp_kt.cumsum(-1) - token_logp_kt  # exclusive: y<t only
    return torch.log_softmax(log_weight_k.double().to(prefix_kt.device)[:, None] + prefix_kt, 0)


def token_logprobs(token_logp_kt: torch.Tensor, log_weight_k: torch.Tensor) -> torch.Tensor:
    """The mixture's log-prob of each sampled token: log Σ_k w_k(t) p_k(y_t|y<t).

    Args:
        token_logp_kt: [K, T] each component's log-prob of the token at each position.
        log_weight_k: [K] log prior weights.

    Returns:
        [T] float64; their sum is log Σ_k w_k p_k(y).
    """
    return torch.logsumexp(posterior(token_logp_kt, log_weight_k) + token_logp_kt.double(), 0)


def next_token_logprobs(
    logp_ktv: torch.Tensor, tokens_t: torch.Tensor, log_weight_k: torch.Tensor
) -> torch.Tensor:
    """The mixture's full next-token log-distribution at every position of one sequence.

    Args:
        logp_ktv: [K, T, V] each component's next-token log-probs at the T positions.
        tokens_t: [T] the sequence's token at each position (what each position predicts).
        log_weight_k: [K] log prior weights.

    Returns:
        [T, V] float64 log-probs (each row sums to 1 in probability).
    """
    k = logp_ktv.shape[0]
    index = tokens_t.to(logp_ktv.device).expand(k, -1)[..., None]
    token_logp_kt = logp_ktv.gather(-1, index).squeeze(-1)
    post_kt = posterior(token_logp_kt, log_weight_k)
    return torch.logsumexp(post_kt[..., None] + logp_ktv.double(), 0)
