"""Which autocast precision a run uses, chosen from the hardware it runs on.

bf16 autocast is a large win where the hardware has bf16 arithmetic (GPUs from Ampere on, CPUs
with AVX-512 BF16 or AMX) and a disaster where it does not: on an AVX2-only CPU torch falls back
to a reference GEMM and a bf16 matmul is ~100x slower than float32. Flags in /proc/cpuinfo do
not say which kernel torch will pick, so on a CPU `auto` measures it: one small matmul under
bf16 autocast against the same in float32, cached per machine (CPU model, torch version).
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gad.core.cache import cache_dir

# bf16 is used on a CPU when its autocast matmul takes at most this share of float32's time;
# AMX boxes measure ~0.2-0.4, AVX-512 BF16 without AMX ~0.7-1.0, AVX2-only boxes ~100.
FAST_RATIO = 1.0
# CPU flags that matter for the choice and that every benchmark records.
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16")


@dataclass(frozen=True)
class Choice:
    """The precision a run uses and why."""

    mixed_precision: str
    """What accelerate is given: `no`, `bf16` or `fp16`."""
    reason: str
    """One sentence: what was asked and what decided it."""
    warning: str | None = None
    """Set when an explicit choice is honoured although it is slow on this hardware."""


def _cpuinfo() -> dict[str, Any]:
    info: dict[str, Any] = {"model": platform.processor() or "unknown CPU", "flags": set()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    ids: dict[str, str] = {}
    for line in text.splitlines():  # the first processor's lines are enough
        key, _, value = (part.strip() for part in line.partition(":"))
        if key in ("cpu family", "model", "stepping"):
            ids[key] = value
        elif key == "model name":
            # Virtual machines often report a generic name; family/model/stepping identify it.
            info["model"] = value
        elif key == "flags":
            info["flags"] = set(value.split())
            break
    if ids:
        info["model"] += " (" + ", ".join(f"{k} {v}" for k, v in ids.items()) + ")"
    return info


def machine() -> dict[str, Any]:
    """What a benchmark figure depends on: CPU model and flags, torch's CPU capability,
    threads, the GPU if any. Recorded beside every figure."""
    info = _cpuinfo()
    out: dict[str, Any] = {
        "cpu": info["model"],
        "cpu_flags": [f for f in CPU_FLAGS if f in info["flags"]],
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        out["gpu_capability"] = list(torch.cuda.get_device_capability(0))
    return out


def _time_matmul(dtype: torch.dtype | None, reps: int) -> float:
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(256, 576, generator=generator)
    b = torch.randn(576, 1536, generator=generator)

    def once() -> None:
        if dtype is None:
            a @ b
        else:
            with torch.autocast("cpu", dtype=dtype):
                a @ b

    once()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        once()
        best = min(best, time.perf_counter() - start)
    return best


def measure_cpu_ratio(dtype: str = "bf16", reps: int = 5) -> float:
    """Time of a 256x576 @ 576x1536 matmul under `dtype` autocast over float32's (best of
    `reps`). Takes ~0.1 s where bf16 is native, ~1 s where it is emulated."""
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float16
    fp32 = _time_matmul(None, reps)
    return _time_matmul(torch_dtype, reps) / max(fp32, 1e-9)


def _cache_file() -> Path:
    return cache_dir() / "precision-probe.json"


def cached_cpu_ratio(dtype: str = "bf16") -> float:
    """`measure_cpu_ratio`, measured once per machine and torch version and kept in the cache
    (every process of a multi-process run then makes the same choice)."""
    from filelock import FileLock

    key = f"{_cpuinfo()['model']}|{torch.__version__}|{dtype}"
    path = _cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        try:
            known = json.loads(path.read_text())
        except (OSError, ValueError):
            known = {}
        if not isinstance(known, dict) or not isinstance(known.get(key), int | float):
            known = known if isinstance(known, dict) else {}
            known[key] = measure_cpu_ratio(dtype)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(known, indent=2) + "\n")
            tmp.replace(path)
        return float(known[key])


def _gpu_choice(requested: str, capability: tuple[int, int], name: str) -> Choice:
    bf16_ok, fp16_ok = capability >= (8, 0), capability >= (7, 0)
    where = f"{name} (compute capability {capability[0]}.{capability[1]})"
    if requested == "auto":
        if bf16_ok:
            return Choice("bf16", f"auto: {where} has bf16 tensor cores")
        if fp16_ok:
            return Choice("fp16", f"auto: {where} has fp16 but no bf16 tensor cores")
        return Choice("no", f"auto: {where} has neither bf16 nor fp16 tensor cores")
    warning = None
    if requested == "bf16" and not bf16_ok:
        warning = f"bf16 asked for on {where}, which has no bf16 tensor cores: expect it slow"
    return Choice(requested, f"{requested}: asked for, on {where}", warning)


def resolve(
    requested: str,
    *,
    cpu_ratio: Callable[[str], float] | None = None,
    gpu: tuple[tuple[int, int], str] | None = None,
) -> Choice:
    """The precision for `requested` (`auto`, `no`, `bf16`, `fp16`) on this machine.

    `gpu` is (compute capability, name) of the device a run trains on, None on a CPU (default:
    read from torch). `cpu_ratio(dtype)` is the CPU probe (default `cached_cpu_ratio`).
    """
    cpu_ratio = cpu_ratio or cached_cpu_ratio
    if gpu is None and torch.cuda.is_available():
        gpu = (torch.cuda.get_device_capability(0), torch.cuda.get_device_name(0))
    if gpu is not None:
        return _gpu_choice(requested, tuple(gpu[0]), gpu[1])  # type: ignore[arg-type]
    if requested == "no":
        return Choice("no", "no: asked for (float32)")
    cpu = _cpuinfo()["model"]
    if requested == "auto":
        ratio = cpu_ratio("bf16")
        if ratio <= FAST_RATIO:
            return Choice("bf16", f"auto: a bf16 matmul took {ratio:.2f}x float32's time on {cpu}")
        return Choice(
            "no", f"auto: a bf16 matmul took {ratio:.1f}x float32's time on {cpu}, so float32"
        )
    ratio = cpu_ratio(requested)
    warning = None
    if ratio > FAST_RATIO:
        warning = (
            f"{requested} asked for, but a {requested} matmul measured {ratio:.1f}x slower than "
            f"float32 on this CPU ({cpu}); `mixed_precision: auto` would use float32"
        )
    return Choice(
        requested, f"{requested}: asked for ({ratio:.2f}x float32's matmul time)", warning
    )


def apply(config: Any) -> tuple[Any, Choice]:
    """`config` with its `mixed_precision` resolved, and the choice; prints the choice with its
    reason (and any warning) once, from the first process."""
    import dataclasses

    from rich.console import Console

    choice = resolve(config.mixed_precision)
    if os.environ.get("RANK", "0") == "0":
        console = Console(stderr=True)
        console.print(f"mixed precision: [bold]{choice.mixed_precision}[/] ({choice.reason})")
        if choice.warning:
            console.print(f"[yellow]warning: {choice.warning}[/]")
    return dataclasses.replace(config, mixed_precision=choice.mixed_precision), choice


def autocast_dtype(mixed_precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved `mixed_precision` (None for `no`)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)


def frozen_weights(model: Any, device: torch.device) -> Any:
    """For a no-grad pass over several micro-batches on a CPU under low-precision autocast:
    the model's weights cast once for the whole pass (`cast_weights_once`, bit for
    bit autocast's numbers) instead of once per micro-batch. A CPU only: there a cast of every
    weight costs a tenth of a small model's forward, while on a GPU it is cheap and the
    pass-long copies would add half the weights' memory (a 7B reference: 14 GB)."""
    kind = device.type
    if kind != "cpu" or not torch.is_autocast_enabled(kind):
        return nullcontext()
    return cast_weights_once(model, torch.get_autocast_dtype(kind))


@contextmanager
def cast_weights_once(
    model: Any, dtype: torch.dtype | None, skip: Collection[torch.nn.Module] = ()
) -> Iterator[None]:
    """Inside, every float32 `nn.Linear` of `model` that runs under `dtype` autocast multiplies
    by a `dtype` copy of its weight made once on entry, instead of autocast casting the weight
    again at every call.

    That is exactly what autocast computes (the same rounding of the same weights, autocast's
    output dtype), so results are bit for bit the same; only the casts are saved. It matters in
    generation: each decoded token is one forward call, and for a small model re-casting every
    weight costs about as much as the matmuls. The weights must not change inside (a rollout);
    a tied LM head gets its own copy (its embedding keeps float32). A call outside autocast
    runs the layer as usual; `dtype=None` does nothing. Layers in `skip` are left alone (their
    caller does not run them inside).
    """
    if dtype is None:
        yield
        return
    patched = []
    with torch.no_grad():
        for module in model.modules():
            linear = isinstance(module, torch.nn.Linear) and module not in skip
            if linear and module.weight.dtype == torch.float32:
                module.forward = _cast_once(module, dtype)  # type: ignore[method-assign]
                patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward  # back to the class's forward


def _cast_once(module: torch.nn.Linear, dtype: torch.dtype) -> Callable[..., Any]:
    weight = module.weight.detach().to(dtype)
    bias = None if module.bias is None else module.bias.detach().to(dtype)
    plain = type(module).forward.__get__(module)

    def forward(x: torch.Tensor) -> torch.Tensor:
        kind = x.device.type
        if torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == dtype:
            return torch.nn.functional.linear(x, weight, bias)
        return plain(x)

    return forward


# ----------------------------------------------------------------------------- attention

TRAINING_ATTENTION = "gad_sdpa"
"""The attention implementation `use_training_attention` gives a model (transformers' name)."""
FLOAT32_ATTENTION_MAX_KEYS = 256
"""Up to this many keys, a CPU training forward computes attention in float32 (see below)."""


def use_training_attention(model: Any) -> None:
    """Give a model that uses transformers' `sdpa` attention our `sdpa`: the same function,
    except in a gradient-recording forward under bf16/fp16 autocast on a CPU over at most
    `FLOAT32_ATTENTION_MAX_KEYS` keys, where it computes attention in float32.

    Why: torch's CPU flash-attention backward is slow in bf16 on short sequences. On SmolLM2's
    shapes (8 sequences, 9 heads of 64) its forward + backward took 2-3x as long in bf16 as in
    float32 at 64-128 keys, about as long from 192 to 384 and longer at 512
    (`benchmarks/attention_backward.py`); in a whole policy update it was a fifth of the time.
    Float32 attention is also closer to a float32 run (the bf16 rounding of scores and
    probabilities is skipped). Everything else is plain `sdpa`: no-grad forwards (rollouts,
    scoring, the reference) are bit for bit the same, and on a GPU nothing changes. Models with
    another implementation (eager, flash) keep it; the name is not saved with the model
    (transformers does not serialise it).
    """
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return
    if not hasattr(model, "set_attn_implementation"):  # an older transformers: plain sdpa
        return
    try:
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # an older transformers: plain sdpa
        return
    if TRAINING_ATTENTION not in AttentionInterface().valid_keys():
        AttentionInterface.register(TRAINING_ATTENTION, _training_sdpa(sdpa_attention_forward))
        AttentionMaskInterface.register(TRAINING_ATTENTION, sdpa_mask)
    model.set_attn_implementation(TRAINING_ATTENTION)


def _training_sdpa(sdpa: Callable[..., Any]) -> Callable[..., Any]:
    def attention(
        module: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, Any]:
        kind = query.device.type
        low = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
        short = key.size(-2) <= FLOAT32_ATTENTION_MAX_KEYS
        training = torch.is_grad_enabled()
        if kind != "cpu" or low not in (torch.bfloat16, torch.float16) or not short or not training:
            return sdpa(module, query, key, value, attention_mask, **kwargs)
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.float()
        # Autocast would cast the inputs back to `low`: run outside it, then give autocast's
        # output dtype back, so the layers after see what they would have seen.
        with torch.autocast(kind, enabled=False):
            out, weights = sdpa(
                module, query.float(), key.float(), value.float(), attention_mask, **kwargs
            )
        return out.to(low), weights

    return attention
