"""Checkpoints: a plain Hugging Face folder for the trained model, plus what exact resume needs.

Layout of `<run>/checkpoints/step-000050/`:
  config.json, model.safetensors, tokenizer files   the main model (loads with from_pretrained)
  <name>/                                           further models (e.g. the discriminator)
  trainer_state.pt                                  optimizers, schedulers, step, counters
  rng_<rank>.pt                                     each process's random generator states
A checkpoint is written to a temporary folder and renamed, so a kill never leaves a half one:
`all_checkpoints` sees only complete `step-N` folders. Rewriting an existing step moves the old
folder aside (a rename) before the new one takes its name, so a kill at any moment leaves one of
the two. A write that fails (a full disk) removes its temporary folder and raises
`CheckpointError`; the checkpoints already written stay as they were.

Why not `Accelerator.save_state`/`load_state`: they write the weights as bare state dicts
(`model.safetensors`, `model_1.safetensors`, without `config.json` or the tokenizer), so a
checkpoint would not be a folder that transformers and vLLM load as it is, and they write in
place (a kill mid-write leaves a folder that looks complete). What is hand-written here is just
that: the HF folder per model, the atomic rename, the rotation. The weights themselves still go
through accelerate (`get_state_dict` gathers FSDP/DeepSpeed shards, `unwrap_model`).
"""

from __future__ import annotations

import os
import random
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gad.config.load import UserError

STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)(\.old)?$")


class CheckpointError(UserError, OSError):
    """The run folder cannot be written, or a checkpoint could not be (disk full)."""


def check_writable(run_dir: str | Path) -> None:
    """Create `run_dir` and prove a file can be written there, before any training starts."""
    run_dir = Path(run_dir)
    probe = run_dir / f".gad-write-probe-{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as err:
        if run_dir.is_dir():
            probe.unlink(missing_ok=True)
        raise CheckpointError(
            f"{run_dir}: the run folder cannot be written ({err.strerror or err}); choose an "
            f"output folder you can write to"
        ) from err


def check_space(run_dir: str | Path, *models: Any) -> None:
    """Fail before training when the disk cannot hold one checkpoint of `models` (weights and
    Adam's two moments, float32)."""
    need = 3 * sum(p.numel() * 4 for m in models for p in m.parameters())
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise CheckpointError(
            f"{run_dir}: a checkpoint needs about {need / 1e6:.0f} MB and only {free / 1e6:.0f} "
            f"MB are free; free space or choose another output folder"
        )


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def streams_kept() -> Iterator[None]:
    """Run the block without moving any random stream (Python, NumPy, torch's CPU and CUDA
    generators): for work in mid-run that draws numbers (a model initialised before its
    weights load, a seeded evaluation) and must leave the training's samples as they were."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def save(
    run_dir: str | Path,
    step: int,
    accelerator: Any,
    *,
    model: Any,
    tokenizer: Any,
    others: dict[str, Any] | None = None,
    other_tokenizers: dict[str, Any] | None = None,
    optimizers: dict[str, Any] | None = None,
    schedulers: dict[str, Any] | None = None,
    state: dict[str, Any] | None = None,
    keep: int = 0,
) -> Path:
    """Write checkpoint `step`; `others` are extra models saved in sub-folders by name, and
    `other_tokenizers` their tokenizers (a discriminator may have its own)."""
    final = Path(run_dir) / "checkpoints" / f"step-{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    # Every process takes part: FSDP/DeepSpeed gather the full state dict collectively.
    models = {"": model, **(others or {})}
    full_states = {name: accelerator.get_state_dict(m) for name, m in models.items()}
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            for name, m in models.items():
                target = tmp / name if name else tmp
                accelerator.unwrap_model(m).save_pretrained(
                    target, state_dict=full_states[name], safe_serialization=True
                )
            tokenizer.save_pretrained(tmp)
            for name, other_tokenizer in (other_tokenizers or {}).items():
                other_tokenizer.save_pretrained(tmp / name)
            torch.save(
                {
                    "step": step,
                    "optimizers": {k: o.state_dict() for k, o in (optimizers or {}).items()},
                    "schedulers": {k: s.state_dict() for k, s in (schedulers or {}).items()},
                    "state": state or {},
                },
                tmp / STATE_FILE,
            )
        accelerator.wait_for_everyone()
        # Each process samples with its own generator state; all of them are needed to resume.
        torch.save(rng_state(), tmp / f"rng_{accelerator.process_index}.pt")
    except (OSError, RuntimeError) as err:
        # torch.save reports a full disk as a RuntimeError from its zip writer.
        if not isinstance(err, OSError) and "write" not in str(err).lower():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        kept = latest(run_dir)
        raise CheckpointError(
            f"{final}: the checkpoint could not be written ({_reason(err)}); "
            + (f"the last complete one, {kept}, is kept" if kept else "no earlier checkpoint")
        ) from err
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        aside = final.with_name(final.name + ".old")
        if final.exists():
            shutil.rmtree(aside, ignore_errors=True)
            final.rename(aside)  # the step is rewritten (a resumed run): keep it until replaced
        tmp.rename(final)
        shutil.rmtree(aside, ignore_errors=True)
        if keep > 0:
            for old in all_checkpoints(run_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return " ".join(str(err).split())[:200]


def all_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found: dict[int, Path] = {}
    for p in sorted(folder.iterdir(), key=lambda p: p.name.endswith(".old")):
        m = _STEP_DIR.match(p.name)
        # `step-N.old` only counts when a kill came between moving it aside and renaming its
        # replacement into place.
        if m and (p / STATE_FILE).exists():
            found.setdefault(int(m.group(1)), p)
    return [found[step] for step in sorted(found)]


def latest(run_dir: str | Path) -> Path | None:
    found = all_checkpoints(run_dir)
    return found[-1] if found else None


def accelerator_rank() -> int:
    """This process's rank (0 without torch.distributed)."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def load_state(
    checkpoint: Path,
    *,
    optimizers: dict[str, Any] | None = None,
    schedulers: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Restore optimizers, schedulers and RNG from a checkpoint; return its step and state.

    Model weights are not touched here: trainers load them with `from_pretrained` from the
    checkpoint folder before wrapping, exactly like a fresh start from that folder.
    """
    saved = torch.load(checkpoint / STATE_FILE, weights_only=False)
    for name, opt in (optimizers or {}).items():
        opt.load_state_dict(saved["optimizers"][name])
    for name, sched in (schedulers or {}).items():
        sched.load_state_dict(saved["schedulers"][name])
    rank = accelerator_rank()
    rng_file = checkpoint / f"rng_{rank}.pt"
    set_rng_state(
        torch.load(rng_file if rng_file.exists() else checkpoint / "rng_0.pt", weights_only=False)
    )
    return {"step": saved["step"], **saved["state"]}
