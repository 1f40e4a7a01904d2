"""The discriminator (and any learned reward model): a causal LM backbone with a scalar head.

It is a stock `AutoModelForSequenceClassification` with `num_labels=1`, so a saved one loads
with `AutoModelForSequenceClassification.from_pretrained(folder)` and vLLM/TRL read it as a
reward model. Score of a sequence = the head at the last real token of the response: the
end-of-turn token when the response finished, its last token when it was cut at the length
limit. Teacher and student sequences are built the same way (`data.encode_response` and the
rollout both end with the end-of-turn token), so the end of a sequence carries no shortcut.
"""

from __future__ import annotations

from typing import Any

import torch


def build(init: str, *, pad_token_id: int, seed: int = 0) -> Any:
    """A discriminator whose backbone is the causal LM at `init` (built-in name or folder) and
    whose head (hidden -> 1) is freshly initialised from `seed`."""
    from transformers import AutoModelForSequenceClassification

    from gad import models

    folder = models.resolve(init)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        folder, num_labels=1, pad_token_id=pad_token_id, local_files_only=True
    )
    return model


def load(folder: str) -> Any:
    """A saved discriminator or reward model."""
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(folder, local_files_only=True)


def position_ids_from_mask(attention_mask_bt: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift them."""
    return (attention_mask_bt.long().cumsum(-1) - 1).clamp(min=0)


def scores(model: Any, input_ids_bt: torch.Tensor, attention_mask_bt: torch.Tensor) -> torch.Tensor:
    """Scalar score of each sequence. Shape: [B] float32.

    The model pools at the rightmost non-pad token, which with our padding is the last real
    token whichever side the padding is on; positions come from the mask for the same reason.
    """
    logits_b1 = model(
        input_ids=input_ids_bt,
        attention_mask=attention_mask_bt,
        position_ids=position_ids_from_mask(attention_mask_bt),
    ).logits
    return logits_b1.squeeze(-1).float()
