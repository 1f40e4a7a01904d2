"""Left-padded batches: the positions a model sees, so that padding does not shift them.

Rollouts, the engine's scorers and the scalar-head model all pad on the left and pass these
positions explicitly: the same token at the same place in its own sequence gets the same
position whatever the padding, which keeps teacher and student text scored alike (SPEC §3).
"""

from __future__ import annotations

import torch


def position_ids(attention_mask_bt: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only (padding gets 0). [B, T] long."""
    return (attention_mask_bt.long().cumsum(-1) - 1).clamp(min=0)
