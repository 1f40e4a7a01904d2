"""The GAD training stages' runner: setup, resume, health checks, checkpoints (SPEC §3).

`train` runs the warmup and the GAD stage (`stage`), each the method's step (`gad.warmup_step`,
`gad.gad_step`) under the one run loop (`train.loop`) over a fixed batch plan; `method=soda`
runs one stage of its own instead (`soda_stage`: the snapshot, then `soda.soda_step`). What a
stage loads is a typed `StageInit` (`build.load_models` loads it); its live state a `Stage`,
whose reward the GAD stage chooses once (`rewards.choice.choose`). Every checkpoint holds the
models, both optimizers and what the health checks, the replay pool and the model selection
need, so a resumed stage matches an uninterrupted one bit for bit. After the warmup,
`final_optimizers.pt` keeps both AdamW states, which the GAD stage continues
(`reset_optimizers` starts it fresh)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from gad.config import load as cfg
from gad.config import rules
from gad.core import checkpoint
from gad.core.tracking import MetricsLog, PhaseTimer, tracker_config
from gad.data import dataset, labels
from gad.methods import build, gad, health, soda
from gad.methods.rewards.choice import choose, frozen_reward
from gad.methods.selection import HeldOut
from gad.methods.state import Selection, Stage, StageInit, training_examples
from gad.models import lora, mixture, store
from gad.train import engine, loop, vllm_rollout

console = Console(stderr=True)
OPTIMIZERS_FILE = "final_optimizers.pt"


class TrainingStopped(cfg.UserError, RuntimeError):
    """Too many consecutive non-finite steps; a checkpoint was written before stopping."""


def setup(
    config: cfg.GADConfig, name: str, accelerator: Any, *, epochs: float, init: StageInit
) -> Stage:
    """Load models (from the latest checkpoint on resume), data, optimizers, and the plan."""
    run_dir = Path(config.output_dir) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    resume_from = loop.resume_point(run_dir, config.resume)
    g_source = str(resume_from) if resume_from else init.generator
    # Data first: a bad record should fail in a second, not after loading two models.
    prepared = dataset.prepare(config.data, store.load_tokenizer(g_source), config)
    world = accelerator.num_processes
    if config.batch_prompts % world:
        raise cfg.ConfigError(
            f"batch_prompts={config.batch_prompts} must be divisible by the {world} processes"
        )
    m = build.load_models(config, init, accelerator, resume_from, run_dir)
    optimizers = {"generator": m.g_opt} | ({"discriminator": m.d_opt} if m.d_opt else {})
    state = loop.restore(resume_from, name, optimizers=optimizers)
    if resume_from is None and init.optimizers and not config.reset_optimizers:
        _continue_optimizers(init.optimizers, config, m.g_opt, m.d_opt)
    plan = engine.batch_plan(len(prepared.examples), epochs, config.batch_prompts, config.seed)
    stage = Stage(
        name,
        config,
        run_dir,
        accelerator,
        training_examples(prepared, m, config),
        plan,
        m,
        state["step"],
        MetricsLog(run_dir, accelerator, resume_step=state["step"] if resume_from else None),
        health.Health(**state.get("health", {})),
        replay=state.get("replay", []),
        selection=Selection(**state.get("selection", {})),
    )
    if config.report_to != "none":
        accelerator.init_trackers(f"gad-{name}", config=tracker_config(cfg.to_dict(config)))
    if accelerator.is_main_process:
        dataset.print_summary(prepared, len(plan), config.batch_prompts)
    return stage


def _continue_optimizers(path: Path, config: cfg.GADConfig, g_opt: Any, d_opt: Any) -> None:
    """Continue the warmup's AdamW states (as the reference does, restoring the warmup
    checkpoint with its optimizer): a fresh Adam moves every weight by about ±lr in its first
    bias-corrected steps, and a short GAD stage would live inside that transient. The
    learning rates are this stage's."""
    saved = torch.load(path, weights_only=False)
    pairs = [("generator", g_opt, config.lr), ("discriminator", d_opt, config.d_lr)]
    for key, opt, lr in pairs:
        if opt is None or key not in saved:
            continue
        opt.load_state_dict(saved[key])
        for group in opt.param_groups:
            group["lr"] = lr
    console.print(f"gad: continuing the warmup's optimizer states ({', '.join(saved)})")


def save(stage: Stage, step: int, final: bool = False) -> Path:
    """A resumable checkpoint: models, optimizers, RNG, and the stage's counters."""
    m, acc = stage.models, stage.accelerator
    optimizers = {"generator": m.g_opt} | ({"discriminator": m.d_opt} if m.d_opt else {})
    others = {"discriminator": m.discriminator} if m.discriminator is not None else {}
    return checkpoint.save(
        stage.run_dir,
        step,
        acc,
        model=m.generator,
        tokenizer=m.tokenizer,
        others=others,
        other_tokenizers={"discriminator": m.d_tokenizer} if others else {},
        optimizers=optimizers,
        state={
            "health": stage.health.__dict__,
            "replay": stage.replay,
            "selection": stage.selection.__dict__,
        },
        keep=0 if final else stage.config.keep_checkpoints,
    )


def save_generator(stage: Stage, folder: Path) -> None:
    """The generator as a plain HF folder (and the discriminator with its tokenizer inside)."""
    build.save_models(stage.models, stage.accelerator, folder)


def finish(stage: Stage) -> Path:
    """Write `<stage>/final`: the generator (HF folder) with `discriminator/` inside; after the
    warmup also both optimizers' states, which the GAD stage continues."""
    m, acc = stage.models, stage.accelerator
    final = stage.run_dir / "final"
    if stage.config.save_final:
        save_generator(stage, final)
    if stage.name == "warmup" and acc.is_main_process:
        states = {"generator": m.g_opt.state_dict()}
        if m.d_opt is not None:
            states["discriminator"] = m.d_opt.state_dict()
        tmp = stage.run_dir / (OPTIMIZERS_FILE + ".tmp")
        torch.save(states, tmp)
        tmp.replace(stage.run_dir / OPTIMIZERS_FILE)
    acc.wait_for_everyone()
    m.rollout.close()  # type: ignore[union-attr]  # a vLLM engine's memory back, now
    return final


def run_loop(stage: Stage, total: int, step_fn: Any, show: tuple[str, ...]) -> None:
    """The stage's steps from `start_step` to `total` under the run loop: timed, health-checked,
    logged, saved."""

    def check(done: int, row: dict[str, Any]) -> None:
        d_learns = stage.models.d_opt is not None
        row["warnings"] = health.check(stage.health, stage.config, stage.name, d_learns, done, row)
        if stage.health.bad_steps >= stage.config.max_bad_steps:
            path = save(stage, done)
            raise TrainingStopped(
                f"{stage.health.bad_steps} consecutive non-finite steps (last at step "
                f"{done}); stopped. Checkpoint: {path}. Lower the learning rate or check "
                "the data."
            )

    config = stage.config
    spec = loop.Loop(
        stage.name,
        total,
        stage.start_step,
        stage.metrics,
        show,
        stage.accelerator.is_main_process,
        lambda step, final: save(stage, step, final),
        config.save_every,
        save_final=total > stage.start_step and config.save_state,
        step_time="time/step",
        check=check,
    )
    loop.run(spec, lambda step, timer: step_fn(stage, step, timer))


def warmup(config: cfg.GADConfig, accelerator: Any) -> Path:
    """Stage 1: generator SFT on teacher answers + discriminator BT on fresh student samples.

    `method="offpolicy"` runs it sequentially instead (paper Fig. 6): SFT for `warmup_epochs`,
    then the discriminator alone for `offpolicy_d_epochs` on the frozen student's samples.
    `method="whitebox"` has no discriminator: its warmup is the generator's SFT alone.
    """
    offpolicy = config.method == "offpolicy"
    epochs = config.warmup_epochs + (config.offpolicy_d_epochs if offpolicy else 0.0)
    init = StageInit(config.model)
    if frozen_reward(config):
        # Nothing to warm up on the reward side: load it frozen rather than build a spare D.
        init = StageInit(config.model, discriminator_folder=config.reward_model, d_trainable=False)
    elif config.method != "whitebox":
        init = StageInit(config.model, discriminator=config.discriminator or config.model)
    stage = setup(config, "warmup", accelerator, epochs=epochs, init=init)
    total = planned_steps(stage, config.warmup_max_steps, "warmup_epochs", "warmup_max_steps")
    d_learns = stage.models.d_opt is not None
    if offpolicy:
        # Sequential (paper Fig. 6): the generator's SFT first, then the discriminator alone.
        sft_steps = len(
            engine.batch_plan(len(stage.examples), config.warmup_epochs, config.batch_prompts,
                              config.seed)
        )  # fmt: skip
        stage.g_steps, stage.d_steps = range(sft_steps), range(sft_steps, total)
    else:
        d_only = config.warmup_d_only_steps if d_learns else 0
        stage.g_steps, stage.d_steps = range(d_only, total), range(total if d_learns else 0)
    run_loop(stage, total, gad.warmup_step, ("d/loss", "d/accuracy", "g/sft_loss"))
    return finish(stage)


def config_path(config: cfg.GADConfig) -> Path:
    """Where a run's resolved config goes: stages run one by one may differ in settings (the
    demo's learning rates), so each keeps its own."""
    name = "config.yaml" if config.stage == "all" else f"config.{config.stage}.yaml"
    return Path(config.output_dir) / name


def planned_steps(stage: Stage, limit: int | None, length: str, limit_name: str) -> int:
    """The stage's steps (its plan, cut at `limit`), printed at its start and noted at the end
    of the run's config YAML, so that which setting bounded which stage is never a guess."""
    total = min(len(stage.plan), limit) if limit else len(stage.plan)
    why = f"{len(stage.plan)} from {length}" + (f", cut by {limit_name}={limit}" if limit else "")
    line = f"{stage.name} stage: {total} steps planned ({why})"
    if stage.accelerator.is_main_process:
        console.print(line)
        config_file = config_path(stage.config)
        if config_file.exists():
            with open(config_file, "a", encoding="utf-8") as f:
                f.write(f"# planned: {line}\n")
    return total


def _gad_init(config: cfg.GADConfig, accelerator: Any) -> StageInit:
    """The GAD stage's models: the warmup's generator and discriminator (and optimizers)."""
    out = Path(config.output_dir)
    warm = out / "warmup" / "final"
    generator = str(warm) if warm.exists() else config.model
    d_kwargs: dict[str, Any] = {}
    if config.method == "whitebox":
        pass
    elif frozen_reward(config):
        d_kwargs["discriminator_folder"] = config.reward_model
    elif (warm / "discriminator").exists():
        d_kwargs["discriminator_folder"] = str(warm / "discriminator")
    else:
        d_kwargs["discriminator"] = config.discriminator or config.model
    optimizers = out / "warmup" / OPTIMIZERS_FILE
    g_adapter = lora.adapter_folder(warm) if lora.enabled(config) and warm.exists() else None
    if lora.enabled(config) and warm.exists() and g_adapter is None:
        raise cfg.ConfigError(
            f"{warm} was trained without LoRA: run the warmup with the same lora_rank, or this "
            "stage with lora_rank 0"
        )
    d_adapter = None
    if lora.enabled(config) and "discriminator_folder" in d_kwargs and not frozen_reward(config):
        d_adapter = lora.adapter_folder(warm / "discriminator")
    reference = None
    if config.kl_coef > 0:
        # The reference is the student as it enters this stage, frozen; kept on disk so a
        # resumed run compares against the same policy.
        reference = out / "gad" / "reference"
        if accelerator.is_main_process and not build.reference_written(config, reference):
            build.write_reference(config, generator, g_adapter, reference)
        accelerator.wait_for_everyone()
    return StageInit(
        generator,
        d_trainable=config.method == "gad" and not frozen_reward(config),
        reference=str(reference) if reference else None,
        reward_model=config.reward_model if config.reward_mix_alpha is not None else None,
        teacher=config.method == "whitebox",
        optimizers=optimizers if warm.exists() and optimizers.exists() else None,
        generator_adapter=g_adapter,
        discriminator_adapter=d_adapter,
        **d_kwargs,
    )


def adversarial(config: cfg.GADConfig, accelerator: Any) -> Path:
    """Stage 2: on-policy GRPO against the discriminator, which keeps learning (Algorithm 1).

    With `method="offpolicy"` or a `reward_model`, the discriminator is frozen: only scores.
    With `reward_mix_alpha`, the discriminator learns and the frozen reward model is mixed into
    its reward (`losses.mixed_reward`). With `method="whitebox"` there is no discriminator: the
    teacher's exact log-probs give per-token advantages (the white-box ceiling).
    """
    stage = setup(
        config, "gad", accelerator, epochs=config.epochs, init=_gad_init(config, accelerator)
    )
    total = planned_steps(stage, config.max_steps, "epochs", "max_steps")
    m = stage.models
    stage.reward = choose(config, m)
    held_out = None
    if config.eval_every:
        teacher, contexts = None, m.teacher_contexts or mixture.load(config.teacher_context)
        if config.teacher_model:
            teacher = m.teacher or build.load_teacher(config, m.tokenizer, accelerator)
        held_out = HeldOut.load(stage, teacher, contexts, lambda f: save_generator(stage, f))

    def step_fn(stage: Stage, step: int, timer: PhaseTimer) -> dict[str, Any]:
        row = gad.gad_step(stage, step, timer)
        if held_out is not None and (step + 1) % config.eval_every == 0:
            with timer("eval"):
                row.update(held_out.evaluate(step + 1))
        return row

    if held_out is not None and stage.start_step == 0:
        # Step 0: the post-warmup student, the reference for the length range.
        stage.metrics.log(0, held_out.evaluate(0))
    run_loop(stage, total, step_fn, stage.reward.show)
    if held_out is not None:
        held_out.write_summary()
    return finish(stage)


def soda_stage(config: cfg.GADConfig, accelerator: Any) -> Path:
    """`method=soda` (SPEC §5), one stage in `soda/`: the starting student's snapshot, then
    DPO steps (`soda.soda_step`) from `model` itself: SODA has no warmup."""
    stage = setup(config, "soda", accelerator, epochs=config.epochs, init=StageInit(config.model))
    total = planned_steps(stage, config.max_steps, "epochs", "max_steps")
    pairs = soda.snapshot(stage)
    run_loop(stage, total, lambda s, step, timer: soda.soda_step(s, step, timer, pairs), soda.SHOW)
    return finish(stage)


def _check(config: cfg.GADConfig) -> None:
    soda.check(config)
    rules.check(config)  # also run by the CLI's preflight: here for callers that skip it


def train(config: cfg.GADConfig) -> Path:
    """Run the configured stage(s); returns the final generator folder of the last stage."""
    out = Path(config.output_dir)
    config, accelerator = loop.start(config, out, config_path(config))
    # Rollouts sample from torch's generator: seed it so a run is reproducible (a resumed run
    # restores the generator state from its checkpoint instead).
    torch.manual_seed(config.seed * 1_000_003 + accelerator.process_index)
    _check(config)
    if config.method == "soda":
        started, final = time.time(), soda_stage(config, accelerator)
        console.print(f"SODA done in {time.time() - started:.0f}s: {final}")
        vllm_rollout.release()
        accelerator.end_training()
        return final
    stage_configs = {"warmup": config, "gad": config}
    if config.method == "reward-distill":
        # `data` is `gad label` output: the warmup learns the teacher responses labelled good,
        # the RL stage visits every labelled prompt once per epoch.
        files = out / "data"
        if accelerator.is_main_process:
            labels.distill_data(config.data, files)
        accelerator.wait_for_everyone()
        stage_configs = {
            "warmup": dataclasses.replace(config, data=str(files / "sft.jsonl")),
            "gad": dataclasses.replace(config, data=str(files / "prompts.jsonl")),
        }
    started = time.time()
    final = None
    if config.stage in ("warmup", "all"):
        final = warmup(stage_configs["warmup"], accelerator)
        console.print(f"warmup done in {time.time() - started:.0f}s: {final}")
    if config.stage in ("gad", "all"):
        final = adversarial(stage_configs["gad"], accelerator)
        console.print(f"GAD stage done in {time.time() - started:.0f}s: {final}")
    vllm_rollout.release()  # an engine kept between stages, before the process group ends
    accelerator.end_training()
    return final  # type: ignore[return-value]
