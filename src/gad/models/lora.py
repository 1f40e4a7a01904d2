"""LoRA adapters (peft) over frozen base models, and one base shared by every GAD role.

With `lora_rank > 0` a stage trains adapters, never a base weight. `Adapters` holds one frozen
causal LM with named peft LoRA adapters on it; each role is a view of it:

- `LMView(adapters, "policy")`: the causal LM with that adapter active (SFT, the generator);
  `LMView(adapters, None)`: the bare base (the reference when the policy had no warmup).
- `ScalarView(adapters, "discriminator", head)`: the same backbone with its own adapter and a
  scalar head (hidden -> 1) at the last position of the mask: the discriminator, or the reward
  model. It runs the backbone only, never the LM head.

A view's parameters are its own adapter's (and head's) only, so an optimizer, gradient clipping
and the gradient sync see one role, and a role's loss reaches only its own weights: the other
adapters are not in the graph. Single-base GAD (`single_base`) puts policy, discriminator and
reference on one `Adapters`; otherwise each model has its own. accelerate does not wrap views
(they share modules), so each view runs under the accelerator's autocast itself and
`engine.optimizer_step` averages their gradients over processes.

On disk an adapter is a peft folder (`adapter_config.json`, `adapter_model.safetensors`, plus
`score.safetensors` for a head) that `PeftModel.from_pretrained` loads. Checkpoints hold the
adapters; `final/` is the merged model, a plain Hugging Face folder, with the adapter in
`final/adapter/`. The roles built on these views, and that merged save, are `lora_roles`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from gad.config.load import ConfigError
from gad.core import checkpoint
from gad.models import precision

ADAPTER_DIR = "adapter"
HEAD_FILE = "score.safetensors"
_CONFIG_FILE = "adapter_config.json"
_WEIGHTS_FILE = "adapter_model.safetensors"


def enabled(config: Any) -> bool:
    """The stage trains LoRA adapters (`lora_rank > 0`) instead of every parameter."""
    return int(getattr(config, "lora_rank", 0) or 0) > 0


def peft_config(config: Any) -> Any:
    """The peft `LoraConfig` of a stage's `lora_*` fields."""
    from peft import LoraConfig

    names = config.lora_target_modules.strip()
    targets: str | list[str] = (
        "all-linear"
        if names == "all-linear"
        else [n.strip() for n in names.split(",") if n.strip()]
    )
    return LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
    )


def adapter_folder(path: str | Path) -> Path | None:
    """`path` itself or its `adapter/` when it holds a saved adapter, else None."""
    p = Path(path)
    for candidate in (p, p / ADAPTER_DIR):
        if (candidate / _CONFIG_FILE).is_file():
            return candidate
    return None


class Adapters:
    """One frozen base causal LM and its named LoRA adapters; one adapter is active at a time."""

    def __init__(self, base: Any, base_source: str) -> None:
        self.base_source = base_source
        """Where the base came from (built-in name or folder): merged saves reload it."""
        base.requires_grad_(False)
        self.peft: Any = None
        self._base = base
        self.trainable: set[str] = set()
        self.autocast: Callable[[], AbstractContextManager[Any]] = nullcontext
        """The accelerator's autocast; every view's forward runs under it."""
        self._active: str | None = None

    # -------------------------------------------------------------- building
    def add(self, name: str, config: Any, *, folder: Path | None, trainable: bool) -> None:
        """Adapter `name`: loaded from `folder` when given, else fresh from `config` (B = 0,
        so a fresh adapter starts as the base; A drawn from `config.seed` and the name, the same
        on every process, and the global random stream is left as it was)."""
        with checkpoint.streams_kept():
            torch.manual_seed(getattr(config, "seed", 0) * 7919 + sum(map(ord, name)))
            self._add(name, config, folder=folder, trainable=trainable)
        if trainable and not self.named_parameters(name):
            raise ConfigError(f"LoRA adapter '{name}' has no parameters: check lora_target_modules")

    def _add(self, name: str, config: Any, *, folder: Path | None, trainable: bool) -> None:
        from peft import PeftModel, get_peft_model

        try:
            if folder is not None and self.peft is None:
                self.peft = PeftModel.from_pretrained(
                    self._base, folder, adapter_name=name, is_trainable=trainable
                )
            elif folder is not None:
                self.peft.load_adapter(folder, adapter_name=name, is_trainable=trainable)
            elif self.peft is None:
                _check_targets(self._base, config)
                self.peft = get_peft_model(self._base, peft_config(config), adapter_name=name)
            else:
                self.peft.add_adapter(name, peft_config(config))
        except ValueError as err:  # peft: a target module the base does not have, ...
            source = folder or f"lora_target_modules={config.lora_target_modules!r}"
            raise ConfigError(f"LoRA adapter '{name}' ({source}): {err}") from err
        if trainable:
            self.trainable.add(name)
        self._active = None
        self._fix_grads()

    def named_parameters(self, name: str) -> list[tuple[str, torch.nn.Parameter]]:
        """The parameters of adapter `name` (peft names them `...lora_A.<name>.weight`, or
        `...lora_embedding_A.<name>` on an embedding)."""
        return [(n, p) for n, p in self.peft.named_parameters() if _belongs(n, name)]

    # -------------------------------------------------------------- running
    def activate(self, name: str | None) -> AbstractContextManager[Any]:
        """Make adapter `name` the active one (None: the bare base, inside the context)."""
        if name is None:
            return self._bare()
        if name != self._active:
            self.peft.set_adapter(name)
            self._active = name
            # peft's set_adapter freezes the inactive adapters; the optimizers hold them all.
            self._fix_grads()
        return nullcontext()

    @contextmanager
    def _bare(self) -> Iterator[None]:
        with self.peft.disable_adapter():
            yield
        # Leaving it, peft re-activates its active adapter and re-toggles requires_grad.
        self._fix_grads()

    def _fix_grads(self) -> None:
        for n, p in self.peft.named_parameters():
            p.requires_grad_(any(_belongs(n, a) for a in self.trainable))

    def backbone(self) -> Any:
        """The base's transformer without its LM head (Llama/Qwen2: `model.model`)."""
        lm = self.peft.get_base_model()
        return getattr(lm, lm.base_model_prefix)

    # -------------------------------------------------------------- saving
    def save_adapter(self, name: str, folder: Path) -> None:
        """Adapter `name` as a peft folder (`PeftModel.from_pretrained` loads it)."""
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        state = get_peft_model_state_dict(self.peft, adapter_name=name)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in state.items()}, folder / _WEIGHTS_FILE
        )
        self.peft.peft_config[name].save_pretrained(str(folder))


def _check_targets(model: Any, config: Any) -> None:
    """Every name in `lora_target_modules` must name modules of the model (peft only refuses
    a list none of whose names match, so a misspelt one would be dropped silently)."""
    names = peft_config(config).target_modules
    if isinstance(names, str):
        return
    leaves = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = sorted(set(names) - leaves)
    if missing:
        raise ConfigError(
            f"lora_target_modules: {', '.join(missing)} name no module of the model (it has "
            f"e.g. {', '.join(sorted(x for x in leaves if x.endswith('proj'))[:8])})"
        )


def _belongs(param_name: str, adapter: str) -> bool:
    return (
        "lora_" in param_name
        and re.search(rf"\.{re.escape(adapter)}(\.|$)", param_name) is not None
    )


@contextmanager
def _frozen_call(adapters: Adapters, adapter: str | None) -> Iterator[None]:
    """A frozen role (the reference, a frozen scorer) runs without dropout, whatever mode the
    shared base is in for the trained roles."""
    peft = adapters.peft
    if adapter in adapters.trainable or not peft.training:
        yield
        return
    peft.eval()
    try:
        yield
    finally:
        peft.train()


class View(torch.nn.Module):
    """One role on an `Adapters`: its adapter, the shared base's config and train mode."""

    def __init__(self, adapters: Adapters, adapter: str | None) -> None:
        super().__init__()
        # Not a submodule: the view's parameters are its adapter's alone.
        object.__setattr__(self, "adapters", adapters)
        self.adapter = adapter

    @property
    def config(self) -> Any:
        return self.adapters.peft.get_base_model().config

    def train(self, mode: bool = True) -> View:
        super().train(mode)
        self.adapters.peft.train(mode)
        return self


class LMView(View):
    """The causal LM with one adapter active (`adapter=None`: the bare base)."""

    @property
    def generation_config(self) -> Any:
        return self.adapters.peft.get_base_model().generation_config

    def named_parameters(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, Any]]:  # type: ignore[override]
        if self.adapter is None:
            return iter([])
        return iter(self.adapters.named_parameters(self.adapter))

    def parameters(self, recurse: bool = True) -> Iterator[Any]:  # type: ignore[override]
        base = self.adapters.peft.get_base_model()
        own = [p for _, p in self.named_parameters()]
        # The device probe (`next(model.parameters())`) must work for the bare base too.
        return iter(own or [next(base.parameters())])

    def modules(self) -> Iterator[torch.nn.Module]:  # type: ignore[override]
        """The modules this view runs: the shared base's (its rollout casts their weights)."""
        return self.adapters.peft.modules()

    def forward(self, **kwargs: Any) -> Any:
        a = self.adapters
        with a.activate(self.adapter), _frozen_call(a, self.adapter), a.autocast():
            return a.peft(**kwargs)

    def generate(self, **kwargs: Any) -> Any:
        a = self.adapters
        with a.activate(self.adapter), _frozen_call(a, self.adapter), a.autocast():
            return a.peft.generate(**kwargs)

    @contextmanager
    def rollout_weights(self, dtype: torch.dtype | None) -> Iterator[None]:
        """For a rollout (weights fixed inside): every adapted layer runs one matmul with its
        merged weight, base + this adapter's delta, made once (in `dtype` when the rollout runs
        under that autocast), instead of the base matmul plus the adapter's two; the other
        layers' weights are cast once (`precision.cast_weights_once`). The same function up to
        float rounding, at the speed of the plain model."""
        patched = []
        with torch.no_grad():
            for _, module in self._adapted_layers():
                if self.adapter not in module.lora_A:
                    continue  # an adapted embedding keeps peft's forward (a lookup, not a matmul)
                weight = self._merged(module)
                module.forward = _merged_forward(weight, module.get_base_layer().bias, dtype)
                patched.append(module)
        # The merged layers no longer call their base and adapter Linears: no copies of those.
        inner = {sub for module in patched for sub in module.modules() if sub is not module}
        try:
            with precision.cast_weights_once(self, dtype, skip=inner):
                yield
        finally:
            for module in patched:
                del module.forward

    def merged_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The weights this adapter changes, merged (base + delta), under the base model's own
        names (`model.layers.0.self_attn.q_proj.weight`): what a vLLM engine started on the
        base needs to generate from the policy. Every other weight is the frozen base's."""
        with torch.no_grad():
            for name, module in self._adapted_layers():
                yield f"{name}.weight", self._merged(module)

    def _merged(self, module: Any) -> torch.Tensor:
        return module.get_base_layer().weight + module.get_delta_weight(self.adapter)

    def _adapted_layers(self) -> Iterator[tuple[str, Any]]:
        """(name in the base model, LoRA layer) of every layer this adapter adapts (a linear
        layer's `lora_A`, an embedding's `lora_embedding_A`)."""
        from peft.tuners.lora import LoraLayer

        for name, module in self.adapters.peft.get_base_model().named_modules():
            if isinstance(module, LoraLayer) and (
                self.adapter in module.lora_A or self.adapter in module.lora_embedding_A
            ):
                yield name, module

    def save_pretrained(self, folder: str | Path, **_: Any) -> None:
        """The adapter (checkpoints); `save_merged` writes the merged model."""
        if self.adapter is not None:
            self.adapters.save_adapter(self.adapter, Path(folder))


def _merged_forward(
    weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype | None
) -> Callable[..., Any]:
    weight = weight.to(dtype) if dtype is not None else weight
    bias = None if bias is None else bias.detach().to(weight.dtype)

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            return torch.nn.functional.linear(x, weight, bias)
        return torch.nn.functional.linear(x.to(weight.dtype), weight, bias).to(x.dtype)

    return forward


class ScalarView(View):
    """The backbone with one adapter active and a scalar head: a discriminator or reward model.
    `discriminator.scores` reads its final hidden state and its `score` head."""

    def __init__(self, adapters: Adapters, adapter: str, head: torch.nn.Linear) -> None:
        super().__init__(adapters, adapter)
        self.score = head

    def named_parameters(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, Any]]:  # type: ignore[override]
        head = [(f"score.{n}", p) for n, p in self.score.named_parameters()]
        return iter(self.adapters.named_parameters(self.adapter) + head)

    def parameters(self, recurse: bool = True) -> Iterator[Any]:  # type: ignore[override]
        return (p for _, p in self.named_parameters())

    def modules(self) -> Iterator[torch.nn.Module]:  # type: ignore[override]
        """The modules this view runs: the shared backbone's and its head (a frozen pass casts
        their weights once, `precision.frozen_weights`)."""
        yield from self.adapters.backbone().modules()
        yield from self.score.modules()

    def forward(self, **kwargs: Any) -> Any:
        kwargs.pop("output_hidden_states", None)
        a = self.adapters
        with a.activate(self.adapter), _frozen_call(a, self.adapter), a.autocast():
            return a.backbone()(**kwargs, output_hidden_states=True)

    def save_pretrained(self, folder: str | Path, **_: Any) -> None:
        """The adapter and the head (`score.safetensors`)."""
        from safetensors.torch import save_file

        self.adapters.save_adapter(self.adapter, Path(folder))
        state = {k: v.detach().cpu().contiguous() for k, v in self.score.state_dict().items()}
        save_file(state, Path(folder) / HEAD_FILE)
