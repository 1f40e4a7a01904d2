"""The roles of a LoRA run, each a view on shared `lora.Adapters`: the trained policy, a scalar
head (discriminator or reward model), the frozen reference; and the merged save that makes a
plain Hugging Face folder of a role (`final/`, the adapter in `final/adapter/`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gad.config.load import ConfigError
from gad.core import checkpoint
from gad.models import store
from gad.models.lora import ADAPTER_DIR, HEAD_FILE, Adapters, LMView, ScalarView


def check_accelerator(accelerator: Any) -> None:
    """LoRA views are not wrapped by accelerate, so they run data-parallel only."""
    kind = str(getattr(accelerator, "distributed_type", "")).upper()
    if "FSDP" in kind or "DEEPSPEED" in kind:
        raise ConfigError(
            "lora_rank > 0 runs data-parallel only: FSDP and DeepSpeed sharding of LoRA runs is "
            "not supported yet; launch without an FSDP/DeepSpeed config (or set lora_rank 0)"
        )


def new_head(base_config: Any, seed: int) -> torch.nn.Linear:
    """A scalar head (hidden -> 1, no bias) initialised as transformers initialises
    `*ForSequenceClassification.score`, from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(base_config.hidden_size, 1, bias=False)
    std = getattr(base_config, "initializer_range", 0.02)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * std)
    return head


def load_head(folder: Path, base_config: Any) -> torch.nn.Linear:
    """The head saved beside an adapter (`score.safetensors`)."""
    from safetensors.torch import load_file

    head = torch.nn.Linear(base_config.hidden_size, 1, bias=False)
    path = folder / HEAD_FILE
    if not path.is_file():
        raise ConfigError(f"{folder}: a LoRA discriminator needs its head, {HEAD_FILE}")
    head.load_state_dict(load_file(str(path)))
    return head


def base_adapters(source: str) -> tuple[Adapters, Any]:
    """A frozen base from `source` (built-in name or folder) and its tokenizer."""
    base, tokenizer = store.load(source)
    base.config.use_cache = False
    return Adapters(base, source), tokenizer


def policy(adapters: Adapters, config: Any, folder: Path | None, name: str = "policy") -> LMView:
    """The trainable LM role: the adapter in `folder` (resume, the next stage) or a fresh one."""
    adapters.add(name, config, folder=folder, trainable=True)
    return LMView(adapters, name)


def scorer(
    adapters: Adapters,
    config: Any,
    folder: Path | None,
    *,
    seed: int,
    trainable: bool = True,
    name: str = "discriminator",
) -> ScalarView:
    """The scalar-head role: adapter and head from `folder`, or fresh (head from `seed`)."""
    adapters.add(name, config, folder=folder, trainable=trainable)
    base_config = adapters.peft.get_base_model().config
    head = load_head(folder, base_config) if folder else new_head(base_config, seed)
    head.to(next(adapters.peft.get_base_model().parameters()).device)
    head.requires_grad_(trainable)
    return ScalarView(adapters, name, head)


def frozen_reference(adapters: Adapters, folder: Path | None) -> LMView:
    """The policy as it entered the stage, frozen: the adapter in `folder`, or the bare base
    (a fresh adapter is the base: its B is zero)."""
    if folder is None:
        return LMView(adapters, None)
    adapters.add("reference", None, folder=folder, trainable=False)
    return LMView(adapters, "reference")


def save_merged(view: LMView | ScalarView, folder: Path, tokenizer: Any) -> None:
    """`folder`: the merged model, a plain HF folder (a causal LM, or for a scalar view a
    `*ForSequenceClassification` with num_labels=1), with the adapter in `folder/adapter/`.

    The merge runs on a fresh copy of the base on the CPU, so the training copy is untouched
    (peft's in-place merge and unmerge would round the base weights)."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    adapter_dir = folder / ADAPTER_DIR
    view.save_pretrained(adapter_dir)
    source = view.adapters.base_source
    # A fresh head and fresh LoRA matrices are drawn when the folder and the adapter load (then
    # overwritten): not from the run's stream, which a save in mid-run must leave as it was.
    with checkpoint.streams_kept():
        if isinstance(view, ScalarView):
            fresh = AutoModelForSequenceClassification.from_pretrained(
                store.resolve(source),
                num_labels=1,
                pad_token_id=view.config.pad_token_id,
                dtype=torch.float32,
                local_files_only=True,
            )
        else:
            fresh, _ = store.load(source, device="cpu")
        merged = PeftModel.from_pretrained(fresh, adapter_dir).merge_and_unload()
    if isinstance(view, ScalarView):
        merged.score.load_state_dict(view.score.state_dict())
    merged.config.pad_token_id = tokenizer.pad_token_id
    merged.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
