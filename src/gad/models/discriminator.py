"""The discriminator (and any learned reward model): a causal LM backbone with a scalar head.

It is a stock `AutoModelForSequenceClassification` with `num_labels=1`, so a saved one loads
with `AutoModelForSequenceClassification.from_pretrained(folder)` and vLLM/TRL read it as a
reward model. Score of a sequence = the head at the last position of its attention mask: the
end-of-turn token when the response finished, its last token when it was cut at the length
limit. Both sides reach it through `data.discriminator_input` (text re-encoded with the
discriminator's tokenizer, end-of-turn iff finished), so the end of a sequence carries no
shortcut. The pooled position comes from the mask, not from transformers' "rightmost token
that is not the pad id": the pad is a real vocabulary token that a student can sample.
"""

from __future__ import annotations

from typing import Any

import torch

from gad.models import padding, precision


def build(init: str, *, pad_token_id: int, seed: int = 0) -> Any:
    """A discriminator whose backbone is the causal LM at `init` (built-in name or folder) and
    whose head (hidden -> 1) is freshly initialised from `seed`."""
    from transformers import AutoModelForSequenceClassification

    from gad.models import store

    folder = store.resolve(init)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        folder, num_labels=1, pad_token_id=pad_token_id, local_files_only=True
    )
    precision.use_training_attention(model)
    return model


def load(folder: str) -> Any:
    """A saved discriminator or reward model."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(folder, local_files_only=True)
    precision.use_training_attention(model)
    return model


def last_positions(attention_mask_bt: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token (the mask's last 1), left or right padding. [B]."""
    width = attention_mask_bt.size(1)
    index_bt = torch.arange(width, device=attention_mask_bt.device).expand_as(attention_mask_bt)
    return (index_bt * (attention_mask_bt != 0)).argmax(dim=1)


def _head(model: Any) -> torch.nn.Module:
    inner = getattr(model, "module", model)  # DDP / accelerate wrappers
    head = getattr(inner, "score", None)
    if not isinstance(head, torch.nn.Module):
        raise TypeError(f"{type(inner).__name__} has no `score` head: not a scalar-head model")
    return head


def scores(model: Any, input_ids_bt: torch.Tensor, attention_mask_bt: torch.Tensor) -> torch.Tensor:
    """Scalar score of each sequence: the head at the last position of the mask. [B] float32.

    Positions come from the mask too, so padding on either side shifts nothing. The model's own
    pooled logits are not used (they pool by pad id); the head runs on the final hidden state.
    """
    out = model(
        input_ids=input_ids_bt,
        attention_mask=attention_mask_bt,
        position_ids=padding.position_ids(attention_mask_bt),
        output_hidden_states=True,
    )
    hidden_bth = out.hidden_states[-1]
    rows = torch.arange(hidden_bth.size(0), device=hidden_bth.device)
    pooled_bh = hidden_bth[rows, last_positions(attention_mask_bt).to(hidden_bth.device)]
    head = _head(model)
    return head(pooled_bh.to(head.weight.dtype)).squeeze(-1).float()
