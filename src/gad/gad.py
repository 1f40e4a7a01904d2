"""GAD: Generative Adversarial Distillation (SPEC §3, Algorithm 1).

Two stages, each a loop that reads top to bottom as named, timed steps:

warmup   rollout (fresh student samples) -> update_d (Bradley–Terry, teacher vs. student)
         -> update_g (SFT on the teacher answers; skipped for the first `warmup_d_only_steps`)
gad      rollout -> ref_logp -> update_d (its forward gives the rewards: the discriminator's
         scores *before* its update) -> advantages -> update_g (GRPO, Eq. 7)

Two facts make the GAD step cheaper than the reference implementation without changing it:
with one policy update per step (PPO mini-batch = batch, as in the paper), the old log-probs
are the policy's own log-probs at that update, so they come from the update's forward pass;
and the discriminator's pre-update scores are the scores its update's forward computes.
Baselines and ablations are settings of the same loops (`method`, `warmup_*`, `d_loss`,
`discriminator`, `reward_model`), not copies.
"""

from __future__ import annotations

import dataclasses
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from gad import checkpoint, data, discriminator, losses, models, precision, reward, sft
from gad import config as cfg
from gad.rollout import Completion, Sampling, TransformersRollout
from gad.tracking import MetricsLog, PhaseTimer, tracker_config

console = Console(stderr=True)


class TrainingStopped(cfg.UserError, RuntimeError):
    """Too many consecutive non-finite steps; a checkpoint was written before stopping."""


# ----------------------------------------------------------------------------- batches


def response_logprobs(
    model: Any, batch: dict[str, torch.Tensor], temperature: float, *, entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Log-probs of the response tokens under `model` at the sampling temperature (as verl).

    Returns `(logp_bt, mask_bt, entropy_bt)` over the positions `sft.response_logits` keeps
    (from the batch's earliest response token on); the mask is 1 on response tokens. The
    entropy (detached) costs a full-vocabulary softmax, so it is computed only when asked for
    (the policy update logs it), else None.
    """
    logits_btv, targets_bt, mask_bt = sft.response_logits(model, batch)
    logp_bt = losses.gather_logprobs(logits_btv, targets_bt, temperature)
    if not entropy:
        return logp_bt, mask_bt, None
    with torch.no_grad():
        entropy_bt = losses.token_entropy_from_logits(logits_btv.detach(), temperature)
    return logp_bt, mask_bt, entropy_bt


def student_examples(
    prompts: list[data.Example], groups: list[list[Completion]]
) -> list[data.Example]:
    """Prompt + sampled ids as examples (prompt-major: prompt p's N samples are adjacent)."""
    out = []
    for prompt, group in zip(prompts, groups, strict=True):
        prompt_ids = prompt.input_ids[: prompt.prompt_len]
        for k, completion in enumerate(group):
            out.append(
                data.Example(
                    f"{prompt.id}#{k}",
                    prompt_ids + completion.token_ids,
                    prompt.prompt_len,
                    completion.finish_reason == "length",
                )
            )
    return out


# ----------------------------------------------------------------------------- run state


@dataclass
class Models:
    """Everything a stage trains or reads, already wrapped by accelerate."""

    generator: Any
    discriminator: Any
    tokenizer: Any
    g_opt: Any
    d_opt: Any | None
    reference: Any | None = None
    rollout: TransformersRollout | None = None
    reward_model: Any | None = None
    """The frozen reward model R of the combined reward (`reward_mix_alpha`), else None."""


def frozen_reward(config: cfg.GADConfig) -> bool:
    """The discriminator slot holds the frozen `reward_model` (reward distillation) rather than
    a discriminator that learns; with `reward_mix_alpha` the reward model is mixed in instead."""
    return bool(config.reward_model) and config.reward_mix_alpha is None


@dataclass
class Health:
    """Counters behind the warnings; saved in checkpoints so a resume keeps them."""

    bad_steps: int = 0
    skipped_steps: int = 0
    acc_streak: int = 0
    base_length: float | None = None
    warned: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- steps


def rollout_step(
    config: cfg.GADConfig, m: Models, prompts: list[data.Example], step: int, rank_offset: int
) -> list[list[Completion]]:
    """N fresh samples per prompt from the current student."""
    sampling = Sampling(config.temperature, config.top_p, config.max_response_tokens)
    seeds = None
    if config.per_prompt_seeds:
        seeds = [hash((config.seed, step, rank_offset + i)) % (2**31) for i in range(len(prompts))]
    return m.rollout.generate(  # type: ignore[union-attr]
        [p.input_ids[: p.prompt_len] for p in prompts], config.n_samples, sampling, seeds
    )


def update_d(
    config: cfg.GADConfig,
    accelerator: Any,
    m: Models,
    teacher: list[data.Example],
    students: list[data.Example],
    global_prompts: int,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One discriminator update on (teacher answer, N student samples) per prompt (Eq. 8).

    Returns the student scores of the forward pass *before* the optimizer step (the GAD
    rewards), shape [P*N] prompt-major, and the stats. (A frozen scorer goes through
    `reward.score` instead: it needs no teacher answers.)
    """
    n = config.n_samples
    d = m.discriminator
    pad = m.tokenizer.pad_token_id
    loss_fn = (
        losses.bt_discriminator_loss if config.d_loss == "bt" else losses.ce_discriminator_loss
    )
    world = accelerator.num_processes
    prompts_per_micro = max(1, config.micro_batch_size // (n + 1))
    student_scores, teacher_scores = [], []
    loss_sum = 0.0
    micro = list(range(0, len(teacher), prompts_per_micro))
    d.train()
    for j, start in enumerate(micro):
        t_ex = teacher[start : start + prompts_per_micro]
        s_ex = students[start * n : (start + len(t_ex)) * n]
        batch = sft.collate(t_ex + s_ex, pad)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.autocast():
            sync = j == len(micro) - 1
            with accelerator.no_sync(d) if not sync else nullcontext():
                score_b = discriminator.scores(d, batch["input_ids"], batch["attention_mask"])
                teacher_p, student_pn = score_b[: len(t_ex)], score_b[len(t_ex) :].view(-1, n)
                loss = loss_fn(teacher_p, student_pn)
                # Mean over all pairs of the global batch, however it is split.
                accelerator.backward(loss * len(t_ex) * world / global_prompts)
        loss_sum += loss.item() * len(t_ex)
        teacher_scores.append(teacher_p.detach())
        student_scores.append(student_pn.detach().reshape(-1))
    teacher_p = torch.cat(teacher_scores)
    student_b = torch.cat(student_scores)
    stats = {
        "d/loss": loss_sum / len(teacher),
        "d/accuracy": losses.discriminator_accuracy(teacher_p, student_b.view(-1, n)).item(),
        "d/teacher_score": teacher_p.mean().item(),
        "d/student_score": student_b.mean().item(),
    }
    grad_norm = accelerator.clip_grad_norm_(d.parameters(), config.max_grad_norm or math.inf)
    stats["d/grad_norm"] = float(grad_norm)
    if math.isfinite(stats["d/grad_norm"]):
        m.d_opt.step()  # type: ignore[union-attr]
    m.d_opt.zero_grad(set_to_none=True)  # type: ignore[union-attr]
    return student_b, stats


def ref_logprobs(config: cfg.GADConfig, accelerator: Any, m: Models, students: list) -> list:
    """Log-probs of the sampled tokens under the frozen reference policy, one entry per
    micro-batch of `length_sorted_chunks` (the order `update_g` uses)."""
    parts = sft.length_sorted_chunks(students, config.micro_batch_size)
    if m.reference is None:
        return [None] * len(parts)
    out = []
    with torch.no_grad(), accelerator.autocast():
        for idx in parts:
            batch = sft.collate([students[i] for i in idx], m.tokenizer.pad_token_id)
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            logp_bt, _, _ = response_logprobs(m.reference, batch, config.temperature)
            out.append(logp_bt)
    return out


def update_g(
    config: cfg.GADConfig,
    accelerator: Any,
    m: Models,
    students: list[data.Example],
    advantage_b: torch.Tensor,
    ref_logp: list,
    global_sequences: int,
) -> dict[str, float]:
    """One GRPO policy update (Eq. 7) over this process's sequences."""
    g = m.generator
    g.train()
    world = accelerator.num_processes
    parts = sft.length_sorted_chunks(students, config.micro_batch_size)
    totals = {"pg_loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "entropy": 0.0, "loss": 0.0}
    for j, idx in enumerate(parts):
        batch = sft.collate([students[i] for i in idx], m.tokenizer.pad_token_id)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.no_sync(g) if j < len(parts) - 1 else nullcontext():
            logp_bt, mask_bt, entropy_bt = response_logprobs(
                g, batch, config.temperature, entropy=True
            )
            # One update per step: the sampling policy is this very policy, so the old
            # log-probs are these log-probs, detached (ratio = 1, the clip stays inactive).
            loss, stats = losses.policy_loss(
                logp_bt,
                logp_bt.detach(),
                advantage_b[idx].to(logp_bt.device),
                mask_bt,
                clip_eps=config.clip_eps,
                kl_coef=config.kl_coef,
                ref_logp_bt=ref_logp[j],
            )
            # policy_loss averages over this micro-batch's sequences; reweigh to the global mean.
            accelerator.backward(loss * len(idx) * world / global_sequences)
        weight = len(idx) / len(students)
        totals["loss"] += loss.item() * weight
        for key in ("pg_loss", "kl", "clip_frac"):
            totals[key] += stats[key].item() * weight
        totals["entropy"] += losses.masked_mean(entropy_bt, mask_bt).item() * weight
    grad_norm = accelerator.clip_grad_norm_(g.parameters(), config.max_grad_norm or math.inf)
    totals["grad_norm"] = float(grad_norm)
    if math.isfinite(totals["grad_norm"]):
        m.g_opt.step()
    m.g_opt.zero_grad(set_to_none=True)
    return {f"g/{k}": v for k, v in totals.items()}


def sft_g_step(
    config: cfg.GADConfig,
    accelerator: Any,
    m: Models,
    examples: list[data.Example],
    global_tokens: int,
) -> dict[str, float]:
    """Warmup generator step: response-only cross-entropy on the teacher answers (SeqKD)."""
    g = m.generator
    g.train()
    parts = sft.length_sorted_chunks(examples, config.micro_batch_size)
    nll = 0.0
    for j, idx in enumerate(parts):
        batch = sft.collate([examples[i] for i in idx], m.tokenizer.pad_token_id)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.no_sync(g) if j < len(parts) - 1 else nullcontext():
            loss_sum = sft.response_nll_sum(g, batch)
            accelerator.backward(loss_sum * accelerator.num_processes / global_tokens)
        nll += loss_sum.item()
    grad_norm = float(accelerator.clip_grad_norm_(g.parameters(), config.max_grad_norm or math.inf))
    if math.isfinite(grad_norm):
        m.g_opt.step()
    m.g_opt.zero_grad(set_to_none=True)
    return {"g/sft_loss_local": nll, "g/grad_norm": grad_norm}


# ----------------------------------------------------------------------------- stages


@dataclass
class Stage:
    """What both stage loops share: data, plan, run folder, accelerator, models."""

    name: str
    config: cfg.GADConfig
    run_dir: Path
    accelerator: Any
    examples: list[data.Example]
    plan: list[list[int]]
    models: Models
    start_step: int
    metrics: MetricsLog
    health: Health


def _stage_plan(n_examples: int, epochs: float, global_batch: int, seed: int) -> list[list[int]]:
    """`sft.batch_plan` for a possibly fractional number of epochs."""
    whole = sft.batch_plan(n_examples, max(1, math.ceil(epochs)), global_batch, seed)
    per_epoch = math.ceil(n_examples / global_batch)
    return whole[: max(1, round(epochs * per_epoch))]


def _local_prompts(stage: Stage, step: int) -> tuple[list[data.Example], int]:
    """This process's prompts of a step (a contiguous slice) and the slice's global offset."""
    indices = stage.plan[step]
    world, rank = stage.accelerator.num_processes, stage.accelerator.process_index
    per_rank = len(indices) // world
    mine = indices[rank * per_rank : (rank + 1) * per_rank]
    return [stage.examples[i] for i in mine], rank * per_rank


def _reduce_mean(accelerator: Any, stats: dict[str, float]) -> dict[str, float]:
    """Mean of each stat over processes (every process holds an equal share of the batch)."""
    if accelerator.num_processes == 1 or not stats:
        return stats
    keys = sorted(stats)
    t = torch.tensor([float(stats[k]) for k in keys], device=accelerator.device)
    t = accelerator.reduce(t, "mean")
    return dict(zip(keys, t.tolist(), strict=True))


def _length_stats(students: list[data.Example]) -> dict[str, float]:
    lengths = [len(e.input_ids) - e.prompt_len for e in students]
    return {
        "response/length_mean": sum(lengths) / len(lengths),
        "response/length_max": float(max(lengths)),
        "response/truncated_share": sum(e.truncated for e in students) / len(students),
    }


def _setup(
    config: cfg.GADConfig, name: str, accelerator: Any, *, epochs: float, init: dict[str, Any]
) -> Stage:
    """Load models (from the latest checkpoint on resume), data, optimizers, and the plan."""
    run_dir = Path(config.output_dir) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    resume_from = checkpoint.latest(run_dir) if config.resume else None
    g_source = str(resume_from) if resume_from else init["generator"]
    # Data first: a bad record should fail in a second, not after loading two models.
    prepared = sft.prepare_data(
        config.data,
        models.load_tokenizer(g_source),
        max_prompt_tokens=config.max_prompt_tokens,
        max_response_tokens=config.max_response_tokens,
        skip_invalid=config.skip_invalid,
        exclude=config.exclude,
    )
    generator, tokenizer = models.load(g_source)
    generator.config.use_cache = False
    if resume_from is not None:
        d = discriminator.load(str(resume_from / "discriminator"))
    elif init.get("discriminator_folder"):
        d = discriminator.load(init["discriminator_folder"])
    else:
        d = discriminator.build(
            init["discriminator"], pad_token_id=tokenizer.pad_token_id, seed=config.seed
        )
    d.config.pad_token_id = tokenizer.pad_token_id
    world = accelerator.num_processes
    if config.batch_prompts % world:
        raise cfg.ConfigError(
            f"batch_prompts={config.batch_prompts} must be divisible by the {world} processes"
        )
    plan = _stage_plan(len(prepared.examples), epochs, config.batch_prompts, config.seed)
    g_opt = sft.make_optimizer(generator, config.lr, config.weight_decay, (0.9, 0.999))
    d_trainable = init.get("d_trainable", True)
    d_opt = (
        sft.make_optimizer(d, config.d_lr, config.weight_decay, (0.9, 0.999))
        if d_trainable
        else None
    )
    if d_trainable:
        generator, d, g_opt, d_opt = accelerator.prepare(generator, d, g_opt, d_opt)
    else:
        generator, g_opt = accelerator.prepare(generator, g_opt)
        d = d.to(accelerator.device).eval().requires_grad_(False)
    reference = None
    if init.get("reference"):
        reference, _ = models.load(init["reference"])
        reference = reference.to(accelerator.device).eval().requires_grad_(False)
    m = Models(generator, d, tokenizer, g_opt, d_opt, reference)
    m.rollout = TransformersRollout(
        accelerator.unwrap_model(generator),
        tokenizer,
        batch_size=config.rollout_batch_size,
    )
    health, start_step = Health(), 0
    if resume_from is not None:
        optimizers = {"generator": g_opt} | ({"discriminator": d_opt} if d_opt else {})
        state = checkpoint.load_state(resume_from, optimizers=optimizers)
        start_step = state["step"]
        health = Health(**state.get("health", {}))
        console.print(f"{name}: resuming from {resume_from} at step {start_step}")
    if config.report_to != "none":
        accelerator.init_trackers(f"gad-{name}", config=tracker_config(cfg.to_dict(config)))
    metrics = MetricsLog(run_dir, accelerator, resume_step=start_step if resume_from else None)
    if accelerator.is_main_process:
        sft.print_data_summary(prepared, len(plan), config.batch_prompts)
    return Stage(
        name, config, run_dir, accelerator, prepared.examples, plan, m, start_step, metrics, health
    )


def _save(stage: Stage, step: int, final: bool = False) -> Path:
    m, acc = stage.models, stage.accelerator
    optimizers = {"generator": m.g_opt} | ({"discriminator": m.d_opt} if m.d_opt else {})
    path = checkpoint.save(
        stage.run_dir,
        step,
        acc,
        model=m.generator,
        tokenizer=m.tokenizer,
        others={"discriminator": m.discriminator},
        optimizers=optimizers,
        state={"health": stage.health.__dict__},
        keep=0 if final else stage.config.keep_checkpoints,
    )
    return path


def _finish(stage: Stage) -> Path:
    """Write `<stage>/final`: the generator (HF folder) with `discriminator/` inside."""
    m, acc = stage.models, stage.accelerator
    final = stage.run_dir / "final"
    states = {"g": acc.get_state_dict(m.generator), "d": acc.get_state_dict(m.discriminator)}
    if acc.is_main_process:
        acc.unwrap_model(m.generator).save_pretrained(final, state_dict=states["g"])
        m.tokenizer.save_pretrained(final)
        acc.unwrap_model(m.discriminator).save_pretrained(
            final / "discriminator", state_dict=states["d"]
        )
    acc.wait_for_everyone()
    return final


def _check_health(stage: Stage, step: int, row: dict[str, Any], finite: bool) -> list[str]:
    """The warnings a user needs to trust a run (never crashes, except on repeated NaN)."""
    c, h = stage.config, stage.health
    warnings = []
    if not finite:
        h.bad_steps += 1
        h.skipped_steps += 1
        warnings.append(f"non-finite loss or gradient at step {step}: update skipped")
        if h.bad_steps >= c.max_bad_steps:
            path = _save(stage, step)
            raise TrainingStopped(
                f"{h.bad_steps} consecutive non-finite steps (last at step {step}); stopped. "
                f"Checkpoint: {path}. Lower the learning rate or check the data."
            )
    else:
        h.bad_steps = 0
    acc = row.get("d/accuracy")
    if acc is not None and stage.models.d_opt is not None:
        h.acc_streak = h.acc_streak + 1 if acc > c.d_acc_warn else 0
        if h.acc_streak == c.d_acc_warn_steps:
            warnings.append(
                f"discriminator accuracy above {c.d_acc_warn} for {c.d_acc_warn_steps} steps: "
                "likely a shortcut (teacher and student sequences built differently?)"
            )
    length = row.get("response/length_mean")
    if length is not None and stage.name == "gad":
        if h.base_length is None:
            h.base_length = length
        elif length > c.length_warn_ratio * h.base_length and "length" not in h.warned:
            h.warned.append("length")
            warnings.append(
                f"mean response length {length:.0f} exceeds {c.length_warn_ratio}x its "
                f"post-warmup value {h.base_length:.0f}: possible reward hacking"
            )
    for w in warnings:
        console.print(f"[yellow]warning (step {step}): {w}[/]")
    return warnings


def _progress(stage: Stage, total: int) -> Progress:
    progress = Progress(
        TextColumn(f"[bold]{stage.name}[/]"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[stats]}"),
        console=console,
        disable=not stage.accelerator.is_main_process,
    )
    return progress


def _run_loop(stage: Stage, total: int, step_fn: Any, show: tuple[str, ...]) -> None:
    with _progress(stage, total) as progress:
        task = progress.add_task(stage.name, total=total, completed=stage.start_step, stats="")
        for step in range(stage.start_step, total):
            t0 = time.perf_counter()
            timer = PhaseTimer()
            row = step_fn(step, timer)
            finite = all(
                math.isfinite(v) for k, v in row.items() if isinstance(v, float) and "loss" in k
            ) and all(math.isfinite(v) for k, v in row.items() if k.endswith("grad_norm"))
            row.update(timer.as_metrics())
            row["time/step"] = time.perf_counter() - t0
            done = step + 1
            row["warnings"] = _check_health(stage, done, row, finite)
            stage.metrics.log(done, row)
            progress.update(
                task,
                completed=done,
                stats="  ".join(f"{k.split('/')[-1]} {row[k]:.3g}" for k in show if k in row),
            )
            if stage.config.save_every and done % stage.config.save_every == 0 and done < total:
                _save(stage, done)
    if total > stage.start_step and stage.config.save_state:
        _save(stage, total, final=True)


# ----------------------------------------------------------------------------- warmup


def warmup(config: cfg.GADConfig, accelerator: Any) -> Path:
    """Stage 1: generator SFT on teacher answers + discriminator BT on fresh student samples.

    `method="offpolicy"` runs it sequentially instead (paper Fig. 6): SFT for `warmup_epochs`,
    then the discriminator alone for `offpolicy_d_epochs` on the frozen student's samples.
    """
    offpolicy = config.method == "offpolicy"
    epochs = config.warmup_epochs + (config.offpolicy_d_epochs if offpolicy else 0.0)
    init = {"generator": config.model, "discriminator": config.discriminator or config.model}
    frozen = frozen_reward(config)
    if frozen:
        # Nothing to warm up on the reward side: load it frozen rather than build a spare D.
        init |= {"discriminator_folder": config.reward_model, "d_trainable": False}
    stage = _setup(config, "warmup", accelerator, epochs=epochs, init=init)
    m = stage.models
    sft_steps = len(
        _stage_plan(len(stage.examples), config.warmup_epochs, config.batch_prompts, config.seed)
    )

    def step_fn(step: int, timer: PhaseTimer) -> dict[str, Any]:
        prompts, offset = _local_prompts(stage, step)
        train_g = config.warmup_generator and (
            step < sft_steps if offpolicy else step >= (0 if frozen else config.warmup_d_only_steps)
        )
        train_d = (
            config.warmup_discriminator
            and not frozen
            and (step >= sft_steps if offpolicy else True)
        )
        row: dict[str, Any] = {"phase/train_g": int(train_g), "phase/train_d": int(train_d)}
        if train_d:
            with timer("rollout"):
                groups = rollout_step(config, m, prompts, step, offset)
                students = student_examples(prompts, groups)
            row.update(_length_stats(students))
            with timer("update_d"):
                _, d_stats = update_d(
                    config, accelerator, m, prompts, students, config.batch_prompts
                )
            row.update(d_stats)
        if train_g:
            with timer("update_g"):
                tokens = sum(
                    len(stage.examples[i].input_ids) - stage.examples[i].prompt_len
                    for i in stage.plan[step]
                )
                g_stats = sft_g_step(config, accelerator, m, prompts, tokens)
            g_stats["g/sft_loss"] = g_stats.pop("g/sft_loss_local") / tokens
            row.update(g_stats)
        row = _reduce_mean(accelerator, {k: v for k, v in row.items()})
        if train_g:
            row["g/sft_loss"] *= accelerator.num_processes  # local sums over global tokens
        return row

    _run_loop(stage, len(stage.plan), step_fn, ("d/loss", "d/accuracy", "g/sft_loss"))
    return _finish(stage)


# ----------------------------------------------------------------------------- GAD stage


def adversarial(config: cfg.GADConfig, accelerator: Any) -> Path:
    """Stage 2: on-policy GRPO against the discriminator, which keeps learning (Algorithm 1).

    With `method="offpolicy"` or a `reward_model`, the discriminator is frozen: only scores.
    With `reward_mix_alpha`, the discriminator learns and the frozen reward model is mixed into
    its reward (`losses.mixed_reward`).
    """
    out = Path(config.output_dir)
    warm = out / "warmup" / "final"
    init: dict[str, Any] = {"generator": str(warm) if warm.exists() else config.model}
    if frozen_reward(config):
        init["discriminator_folder"] = config.reward_model
    elif (warm / "discriminator").exists():
        init["discriminator_folder"] = str(warm / "discriminator")
    else:
        init["discriminator"] = config.discriminator or config.model
    init["d_trainable"] = config.method == "gad" and not frozen_reward(config)
    if config.kl_coef > 0:
        # The reference is the student as it enters this stage, frozen; kept on disk so a
        # resumed run compares against the same policy.
        reference = out / "gad" / "reference"
        if accelerator.is_main_process and not (reference / "config.json").exists():
            model, tokenizer = models.load(init["generator"])
            model.save_pretrained(reference)
            tokenizer.save_pretrained(reference)
        accelerator.wait_for_everyone()
        init["reference"] = str(reference)
    stage = _setup(config, "gad", accelerator, epochs=config.epochs, init=init)
    total = len(stage.plan)
    if config.max_steps:
        total = min(total, config.max_steps)
    m, n = stage.models, config.n_samples
    train_d = m.d_opt is not None
    if config.reward_mix_alpha is not None:
        rm = discriminator.load(config.reward_model)  # type: ignore[arg-type]
        rm.config.pad_token_id = m.tokenizer.pad_token_id
        m.reward_model = rm.to(accelerator.device).eval().requires_grad_(False)

    def step_fn(step: int, timer: PhaseTimer) -> dict[str, Any]:
        prompts, offset = _local_prompts(stage, step)
        with timer("rollout"):
            groups = rollout_step(config, m, prompts, step, offset)
            students = student_examples(prompts, groups)
        generated = sum(len(c.token_ids) for group in groups for c in group)
        with timer("ref_logp"):
            ref_logp = ref_logprobs(config, accelerator, m, students)
        d_rows: list[dict[str, float]] = []
        if train_d:
            with timer("update_d"):
                # The first pass's scores are the discriminator's scores before its update.
                reward_b, d_stats = update_d(
                    config, accelerator, m, prompts, students, config.batch_prompts
                )
                d_rows.append(d_stats)
                for _ in range(config.d_steps - 1):
                    d_rows.append(
                        update_d(config, accelerator, m, prompts, students, config.batch_prompts)[1]
                    )
        else:
            with timer("score"), accelerator.autocast():
                # A frozen scorer (reward model, off-policy D) needs only the samples' scores.
                reward_b = reward.score(
                    m.discriminator, students, m.tokenizer.pad_token_id, config.micro_batch_size
                )
                d_rows.append({"d/student_score": reward_b.mean().item()})
        if m.reward_model is not None:
            with timer("score_rm"), accelerator.autocast():
                rm_b = reward.score(
                    m.reward_model, students, m.tokenizer.pad_token_id, config.micro_batch_size
                )
            d_rows[0]["reward/d_mean"] = reward_b.mean().item()
            d_rows[0]["reward/rm_mean"] = rm_b.mean().item()
            alpha: float = config.reward_mix_alpha  # type: ignore[assignment]
            reward_b = losses.mixed_reward(reward_b.view(-1, n), rm_b.view(-1, n), alpha)
            reward_b = reward_b.reshape(-1)
        with timer("advantages"):
            advantage_b = losses.group_advantages(reward_b.view(-1, n)).reshape(-1)
        with timer("update_g"):
            g_stats = update_g(
                config, accelerator, m, students, advantage_b, ref_logp, config.batch_prompts * n
            )
        row: dict[str, Any] = {
            **d_rows[0],
            **g_stats,
            "reward/mean": reward_b.mean().item(),
            "reward/std": reward_b.std().item() if reward_b.numel() > 1 else 0.0,
            "advantage/mean": advantage_b.mean().item(),
            **_length_stats(students),
            "tokens/generated": float(generated),
        }
        if len(d_rows) > 1:
            row["d/loss_last"] = d_rows[-1]["d/loss"]
        row = _reduce_mean(accelerator, row)
        row["tokens/generated"] *= accelerator.num_processes
        row["tokens/rollout_per_s"] = row["tokens/generated"] / max(timer.seconds["rollout"], 1e-9)
        return row

    stage_total = total
    _run_loop(
        stage,
        stage_total,
        step_fn,
        ("reward/mean", "d/loss", "d/accuracy", "g/kl", "response/length_mean"),
    )
    return _finish(stage)


def train(config: cfg.GADConfig) -> Path:
    """Run the configured stage(s); returns the final generator folder of the last stage."""
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    config, choice = precision.apply(config)
    accelerator = sft.make_accelerator(config.mixed_precision, config.report_to, out)
    # Rollouts sample from torch's generator: seed it so a run is reproducible (a resumed run
    # restores the generator state from its checkpoint instead).
    torch.manual_seed(config.seed * 1_000_003 + accelerator.process_index)
    if accelerator.is_main_process:
        # Stages run one by one may differ in settings (the demo's learning rates): keep each.
        name = "config.yaml" if config.stage == "all" else f"config.{config.stage}.yaml"
        cfg.save(config, out / name, {"mixed_precision": choice.reason})
    if config.reward_model and config.method == "offpolicy":
        raise cfg.ConfigError("reward_model and method=offpolicy exclude each other")
    if config.reward_mix_alpha is not None and (
        config.method != "gad" or not config.reward_model or not 0 <= config.reward_mix_alpha <= 1
    ):
        raise cfg.ConfigError(
            "reward_mix_alpha needs method=gad, a reward_model, and a value in [0, 1]"
        )
    stage_configs = {"warmup": config, "gad": config}
    if config.method == "reward-distill":
        if not config.reward_model:
            raise cfg.ConfigError(
                "method=reward-distill needs reward_model: train one with `gad reward-model "
                "LABELS --output-dir runs/rm` and pass --reward-model runs/rm/final"
            )
        # `data` is `gad label` output: the warmup learns the teacher responses labelled good,
        # the RL stage visits every labelled prompt once per epoch.
        files = out / "data"
        if accelerator.is_main_process:
            reward.distill_data(config.data, files)
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
    accelerator.end_training()
    return final  # type: ignore[return-value]
