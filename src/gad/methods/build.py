"""The GAD stages' models: where each comes from, full-parameter or LoRA, one base or three.

Full-parameter (`lora_rank: 0`): the generator, the discriminator (a scalar-head model) and the
frozen reference are three models, the trained two wrapped by accelerate. With LoRA each
trained model is an adapter on its own frozen base (`lora.Adapters`); with `single_base` all
roles are adapters on one base: the policy, the discriminator (adapter + head) and the
reference (the policy's adapter as it entered the GAD stage, or the bare base).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from rich.console import Console

from gad.config import load as cfg
from gad.core import checkpoint
from gad.methods.state import Models, StageInit
from gad.models import discriminator, lora, lora_roles, mixture, precision, store
from gad.train import engine, engines

console = Console(stderr=True)


def tokenizer_of(folder: str, fallback: Any) -> Any:
    """The tokenizer saved with a model folder; `fallback` (the student's) for folders saved
    without one (reward models and discriminators written before gad saved theirs)."""
    path = Path(folder)
    if path.is_dir() and not (path / "tokenizer_config.json").exists():
        console.print(f"[yellow]{folder} has no tokenizer: using the student's[/]")
        return fallback
    return store.load_tokenizer(folder)


def load_teacher(config: cfg.GADConfig, tokenizer: Any, accelerator: Any) -> Any:
    """The frozen local teacher of `method=whitebox` (it must share the student's tokenizer)."""
    if not config.teacher_model:
        raise cfg.ConfigError("method=whitebox needs teacher_model (a local model)")
    teacher_tok = store.load_tokenizer(config.teacher_model)
    if teacher_tok.get_vocab() != tokenizer.get_vocab():
        raise cfg.ConfigError(
            f"teacher_model {config.teacher_model}: method=whitebox needs the student's "
            "tokenizer (its per-token log-probs score the student's sampled ids)"
        )
    teacher, _ = store.load(config.teacher_model)
    return teacher.to(accelerator.device).eval().requires_grad_(False)


# ------------------------------------------------------------------ full-parameter


def _load_discriminator(
    config: cfg.GADConfig, init: StageInit, resume_from: Path | None, tokenizer: Any
) -> tuple[Any, Any]:
    """The discriminator (or frozen scorer) and its tokenizer, or (None, None)."""
    d_folder = init.discriminator_folder
    if resume_from is not None and (resume_from / "discriminator").exists():
        d_folder = str(resume_from / "discriminator")
    if d_folder:
        d, d_tokenizer = discriminator.load(d_folder), tokenizer_of(d_folder, tokenizer)
    elif init.discriminator:
        d_tokenizer = store.load_tokenizer(init.discriminator)
        pad = engine.pad_id_of(d_tokenizer)
        d = discriminator.build(init.discriminator, pad_token_id=pad, seed=config.seed)
    else:
        return None, None
    d.config.pad_token_id = engine.pad_id_of(d_tokenizer)
    return d, d_tokenizer


def _full_models(
    config: cfg.GADConfig, init: StageInit, accelerator: Any, resume_from: Path | None
) -> Models:
    generator, tokenizer = store.load(str(resume_from) if resume_from else init.generator)
    generator.config.use_cache = False
    d, d_tokenizer = _load_discriminator(config, init, resume_from, tokenizer)
    g_opt = engine.make_optimizer(generator, config.lr, config.weight_decay, config.adam_betas)
    d_opt = None
    if d is not None and init.d_trainable:
        d_opt = engine.make_optimizer(d, config.d_lr, config.weight_decay, config.adam_betas)
        generator, d, g_opt, d_opt = accelerator.prepare(generator, d, g_opt, d_opt)
    else:
        generator, g_opt = accelerator.prepare(generator, g_opt)
        if d is not None:
            d = d.to(accelerator.device).eval().requires_grad_(False)
    reference = None
    if init.reference:
        reference, _ = store.load(init.reference)
        reference = reference.to(accelerator.device).eval().requires_grad_(False)
    return Models(generator, d, tokenizer, g_opt, d_opt, reference, d_tokenizer=d_tokenizer)


# ------------------------------------------------------------------ LoRA


def _adapter_models(
    config: cfg.GADConfig, init: StageInit, accelerator: Any, resume_from: Path | None
) -> Models:
    """Adapters on frozen bases: one base for every role (`single_base`), else one each."""
    lora_roles.check_accelerator(accelerator)
    adapters, tokenizer = lora_roles.base_adapters(config.model)
    adapters.autocast = accelerator.autocast
    g_folder = resume_from if resume_from is not None else init.generator_adapter
    generator = lora_roles.policy(adapters, config, g_folder)
    d, d_tokenizer = None, None
    d_source = init.discriminator_adapter
    if resume_from is not None:
        # A frozen scorer is checkpointed as a full model, a trained one as its adapter.
        d_source = lora.adapter_folder(resume_from / "discriminator")
    if init.discriminator_folder and d_source is None:
        # A frozen scorer saved as a full model (a trained reward model): not an adapter.
        d, d_tokenizer = _load_discriminator(config, init, None, tokenizer)
        d = d.to(accelerator.device).eval().requires_grad_(False)
    elif init.discriminator or d_source is not None:
        if config.single_base:
            d_adapters, d_tokenizer = adapters, tokenizer
        else:
            d_adapters, d_tokenizer = lora_roles.base_adapters(config.discriminator or config.model)
            d_adapters.autocast = accelerator.autocast
        d = lora_roles.scorer(
            d_adapters, config, d_source, seed=config.seed, trainable=init.d_trainable
        )
        d.config.pad_token_id = engine.pad_id_of(d_tokenizer)
    g_opt = engine.make_optimizer(generator, config.lr, config.weight_decay, config.adam_betas)
    d_opt = None
    if isinstance(d, lora.ScalarView) and init.d_trainable:
        d_opt = engine.make_optimizer(d, config.d_lr, config.weight_decay, config.adam_betas)
        g_opt, d_opt = accelerator.prepare(g_opt, d_opt)
    else:
        g_opt = accelerator.prepare(g_opt)
    reference = None
    if init.reference and config.single_base:
        reference = lora_roles.frozen_reference(adapters, lora.adapter_folder(init.reference))
    elif init.reference:
        reference, _ = store.load(init.reference)
        reference = reference.to(accelerator.device).eval().requires_grad_(False)
    return Models(generator, d, tokenizer, g_opt, d_opt, reference, d_tokenizer=d_tokenizer)


def write_reference(config: cfg.GADConfig, generator: str, adapter: Path | None, to: Path) -> None:
    """Keep the GAD stage's reference on disk, so a resumed run compares against the same
    policy: the entering generator as a model folder, or with `single_base` its adapter (an
    empty folder when there is none: the bare base)."""
    if config.single_base:
        if adapter is not None:
            shutil.copytree(adapter, to / lora.ADAPTER_DIR, dirs_exist_ok=True)
        to.mkdir(parents=True, exist_ok=True)
        (to / "REFERENCE").write_text("the policy's adapter as it entered the GAD stage\n")
        return
    model, tokenizer = store.load(generator)
    model.save_pretrained(to)
    tokenizer.save_pretrained(to)


def reference_written(config: cfg.GADConfig, to: Path) -> bool:
    return (to / ("REFERENCE" if config.single_base else "config.json")).exists()


# ------------------------------------------------------------------ both


def load_models(
    config: cfg.GADConfig,
    init: StageInit,
    accelerator: Any,
    resume_from: Path | None,
    run_dir: Path,
) -> Models:
    """Generator, discriminator, reference and their optimizers, ready to train; the frozen
    reward model and the white-box teacher when `init` asks for them."""
    if lora.enabled(config):
        m = _adapter_models(config, init, accelerator, resume_from)
    else:
        m = _full_models(config, init, accelerator, resume_from)
    checkpoint.check_space(run_dir, m.generator, *([m.discriminator] if m.discriminator else []))
    source = str(resume_from) if resume_from else init.generator
    if lora.enabled(config):
        source = m.generator.adapters.base_source  # the engine adds the adapter to its base
    m.rollout = engines.for_policy(
        config,
        accelerator,
        accelerator.unwrap_model(m.generator),
        source,
        m.tokenizer,
        optimizer=m.g_opt,
        batch_size=config.generation_batch_size,
        autocast_dtype=precision.autocast_dtype(config.mixed_precision),
        seed=config.seed,
    )
    if init.reward_model:
        m.reward_model, m.rm_tokenizer = load_reward_model(
            init.reward_model, m.tokenizer, accelerator
        )
    if init.teacher:
        m.teacher = load_teacher(config, m.tokenizer, accelerator)
        m.teacher_contexts = mixture.load(config.teacher_context)
    return m


def load_reward_model(folder: str, tokenizer: Any, accelerator: Any) -> tuple[Any, Any]:
    """A trained reward model (`gad reward-model` output), frozen, and its tokenizer."""
    rm_tokenizer = tokenizer_of(folder, tokenizer)
    rm = discriminator.load(folder)
    rm.config.pad_token_id = engine.pad_id_of(rm_tokenizer)
    return rm.to(accelerator.device).eval().requires_grad_(False), rm_tokenizer


def save_models(m: Models, accelerator: Any, folder: Path) -> None:
    """The generator as a plain HF folder (and the discriminator with its tokenizer inside);
    LoRA models merged, with their adapters in `adapter/` beside."""
    if isinstance(m.generator, lora.LMView):
        if accelerator.is_main_process:
            lora_roles.save_merged(m.generator, folder, m.tokenizer)
            if isinstance(m.discriminator, lora.ScalarView):
                lora_roles.save_merged(m.discriminator, folder / "discriminator", m.d_tokenizer)
            elif m.discriminator is not None:
                m.discriminator.save_pretrained(folder / "discriminator")
                m.d_tokenizer.save_pretrained(folder / "discriminator")
        accelerator.wait_for_everyone()
        return
    states = {"g": accelerator.get_state_dict(m.generator)}
    if m.discriminator is not None:
        states["d"] = accelerator.get_state_dict(m.discriminator)
    if accelerator.is_main_process:
        accelerator.unwrap_model(m.generator).save_pretrained(folder, state_dict=states["g"])
        m.tokenizer.save_pretrained(folder)
        if m.discriminator is not None:
            accelerator.unwrap_model(m.discriminator).save_pretrained(
                folder / "discriminator", state_dict=states["d"]
            )
            m.d_tokenizer.save_pretrained(folder / "discriminator")
    accelerator.wait_for_everyone()
