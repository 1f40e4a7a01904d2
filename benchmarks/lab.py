"""Lab benchmark v2: black-box distillation against a teacher whose probabilities we know.

Two settings (`--settings`, both by default):

- `context` (reachable teacher, exact probabilities): the teacher is SmolLM2-135M-Instruct
  answering under a hidden context (`benchmarks/lab_context.json`: a system prompt and a few
  demonstrations, chat messages prepended to every prompt) that the student never sees; the
  student is the same model without it (context distillation). The teacher's exact next-token
  distribution at any position of any text is model(hidden context + prompt + response), so
  every KL below is exact, and the student can represent the teacher: the gap is behaviour.
- `cross-tokenizer`: teacher Qwen2.5-Coder-0.5B-Instruct, student SmolLM2-135M-Instruct;
  KL at the text level (Monte-Carlo estimates, as in v1).

Prompts: the Self-Instruct seed tasks, one fixed shuffle cut into test (held out: the table),
validation (settings are chosen on it: `--validate`; GAD's periodic evaluation) and train.
The teacher answers the train prompts once at temperature 1; those answers are all any method
sees, shared by every seed and method. Every system then answers the test prompts at
temperature 1 and is scored:

- `reverse_kl`: KL(student || teacher) per student token on the student's own samples; context
  setting: exact, full vocabulary at every sampled position, the teacher conditioned on the
  hidden context; cross-tokenizer: text level.
- `forward_kl`: KL(teacher || student) per teacher token on held-out teacher samples.
- `teacher_logp`: the teacher's mean per-token log-likelihood of the student's samples.
- `length` (tokens), `finished` (share of answers that ended with end-of-turn), `train_s`
  (wall time from the untouched student, SeqKD included for methods started from it).
- `gap_closed` (context setting): (KL_seqkd - KL_method) / (KL_seqkd - KL_whitebox) on exact
  reverse KL, per seed against that seed's SeqKD and white-box runs.

Methods: `before` (the untouched student, scored once), `seqkd` (SFT, `--seqkd-epochs` k),
`gad` (from the SeqKD checkpoint: `warmup_generator=False`, so the warmup is the
discriminator's only, then the GAD stage), `gad_equal_exposure` (the same from SeqKD's epoch k-1
checkpoint: both saw k epochs of teacher data), `whitebox` (context setting: on-policy
distillation with the teacher's exact log-probs under the hidden context, from SeqKD: the
ceiling), the stabilisers `gad_replay`, `gad_lenpen`, `gad_clip`, `gad_tokenmean` (GAD with
one setting on; first seed only unless `--stabiliser-seeds all`), `offpolicy` (optional),
`gad_lora` (optional: `gad` with single-base LoRA, rank `--lora-rank`, alpha 2x rank, both
learning rates x `--lora-lr-scale`, its own discriminator warmup from the same SeqKD model).
The first seed of the context setting also runs the long GAD run (`--long-steps`, held-out
evaluation every `--curve-every` steps; `gad_long` is its end, `gad_selected` the product's
model selection on the validation prompts, and its step-`--gad-steps` checkpoint is that seed's
`gad` row), and `seqkd_equal_time`: SeqKD given as much wall time as `gad` took (whole
epochs), with its curve beside GAD's (`lab-v2-equal-time.png`). The cross-tokenizer setting
runs `--cross-methods` on `--cross-seeds` (the budget's choice; see `run.json`).

    python benchmarks/lab.py --out runs/lab-v2                 # the whole benchmark
    python benchmarks/lab.py --validate --out runs/lab-val     # choose the hidden context
    python benchmarks/lab.py --tiny --out /tmp/lab-tiny        # tiny random models, seconds

Writes `<out>/lab-v2.json` (setting -> method -> per-seed metric dicts), `<out>/table.md`,
`<out>/run.json` (arguments, sizes, timings) and the seed-0 curves. Refuses an `--out` that is
not empty: nothing of an earlier run is ever reused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from gad import config as cfg
from gad import data, engine, evalsets, evaluate, gad_stage, models, precision, report, sft, teacher
from gad.tracking import read_metrics

HERE = Path(__file__).resolve().parent
CONTEXT_FILE = HERE / "lab_context.json"
CANDIDATES_FILE = HERE / "lab_context_candidates.json"

SETTINGS: dict[str, dict[str, Any]] = {
    "context": {"teacher": "smollm2-135m", "student": "smollm2-135m", "exact": True},
    "cross-tokenizer": {"teacher": "qwen2.5-coder-0.5b", "student": "smollm2-135m", "exact": False},
}
# Each stabiliser on its own, the others at their defaults (off). Values are the papers'
# orders of magnitude, fixed before running: 4 GAD steps of samples in the pool, λ such that a
# doubled length costs ~0.07 of a score, scores clipped at ±3 (the discriminator's scores sit
# within ±2 after its warmup).
STABILISERS: dict[str, dict[str, Any]] = {
    "gad_replay": {"d_replay_size": 32},
    "gad_lenpen": {"length_penalty": 0.1},
    "gad_clip": {"score_clip": 3.0},
    "gad_tokenmean": {"loss_agg": "token-mean"},
}
GAD_FAMILY = ("gad", "gad_equal_exposure", *STABILISERS)
ALL_METHODS = ("seqkd", *GAD_FAMILY, "whitebox", "offpolicy", "gad_lora")
DEFAULT_METHODS = ("seqkd", *GAD_FAMILY, "whitebox")
METRICS = ("reverse_kl", "forward_kl", "teacher_logp", "length", "finished", "train_s")
# Fields of GADConfig the methods need beyond the v1 API (issue 12); checked before any work.
NEEDS: dict[str, tuple[str, ...]] = {
    "gad": ("warmup_generator",),
    "whitebox": ("teacher_model", "teacher_context"),
    "gad_replay": ("d_replay_size",),
    "gad_lenpen": ("length_penalty",),
    "gad_clip": ("score_clip",),
    "gad_tokenmean": ("loss_agg",),
}


class Refused(SystemExit):
    """The lab will not run as asked; the message says why, on one line."""


# ------------------------------------------------------------------ setup


def load_context(path: str | Path) -> list[dict[str, str]]:
    messages = json.loads(Path(path).read_text())
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and set(m) == {"role", "content"} for m in messages
    ):
        raise Refused(f"{path}: a hidden context is a JSON list of {{role, content}} messages")
    return messages


def check_out(out: Path) -> None:
    """Refuse an earlier run's folder: v1 silently reused stale answers and a stale reference."""
    if out.exists() and any(out.iterdir()):
        raise Refused(
            f"lab: --out {out} is not empty; give a new folder (an earlier run is never reused)"
        )
    out.mkdir(parents=True, exist_ok=True)


def check_product(methods: list[str]) -> None:
    """Fail before any work when a method needs a GADConfig field this gad lacks."""
    have = {f.name for f in dataclasses.fields(cfg.GADConfig)}
    missing = {m: [f for f in NEEDS.get(m, ()) if f not in have] for m in methods}
    missing = {m: f for m, f in missing.items() if f}
    if missing:
        said = "; ".join(f"{m} needs {', '.join(f)}" for m, f in missing.items())
        raise Refused(f"lab: this gad's GADConfig lacks fields ({said}); merge main or drop them")


def prompt_splits(n_test: int, n_val: int, n_train: int) -> dict[str, list[data.Record]]:
    """Fixed test / validation / train prompts from one shuffle of the Self-Instruct seeds."""
    records = [data.Record(r.id, r.prompt) for r in evalsets.load_set("self-instruct")]
    random.Random(0).shuffle(records)
    if len(records) < n_test + n_val + n_train:
        raise Refused(f"lab: only {len(records)} prompts; asked for {n_test}+{n_val}+{n_train}")
    return {
        "test": records[:n_test],
        "val": records[n_test : n_test + n_val],
        "train": records[n_test + n_val :][:n_train],
    }


def sample(
    model: str,
    prompts: list[data.Record],
    output: Path,
    args: argparse.Namespace,
    seed: int,
    n: int,
    context: list[dict[str, str]] | None = None,
) -> list[data.Record]:
    """`n` answers per prompt of a local model at temperature 1. With `context`, the model
    answers context + prompt and the context is stripped from the records written: they hold
    only what the student may see (prompt, answer and the finish reason)."""
    context = context or []
    asked = output.with_name(output.stem + ".prompts.jsonl")
    data.write_records(asked, [data.Record(r.id, context + r.prompt) for r in prompts])
    raw = output.with_name(output.stem + ".raw.jsonl") if context else output
    _collect(model, asked, raw, args, seed, n)
    records = [r for r in data.read_records(raw).records if r.response is not None]
    if context:
        records = [data.Record(r.id, r.messages[len(context) :], r.meta) for r in records]
        data.write_records(output, records)
    return records


def _collect(model: str, asked: Path, raw: Path, args: argparse.Namespace, seed: int, n: int):
    teacher.collect(
        cfg.CollectConfig(
            prompts=str(asked),
            output=str(raw),
            backend="local",
            model=model,
            n=n,
            temperature=1.0,
            max_response_tokens=args.max_tokens,
            generation_batch_size=args.gen_batch,
            seed=seed,
        ),
        progress=False,
    )


# ------------------------------------------------------------------ metrics


def response_ids(tokenizer: Any, prompt: list[dict[str, str]], record: data.Record) -> list[int]:
    """The response as the template renders it, with the end-of-turn token iff it finished: a
    cut answer's last position predicts a content token, not the end of the turn."""
    return data.encode_response(
        tokenizer, prompt, record.response or "", finished=data.record_finished(record)
    )


def exact_token_kl(
    q_model: Any,
    p_model: Any,
    tokenizer: Any,
    records: list[data.Record],
    *,
    q_context: list[dict[str, str]] | None = None,
    p_context: list[dict[str, str]] | None = None,
    batch_size: int = 8,
) -> dict[str, float]:
    """KL(q || p) per response token over `records`, exact: both models' full next-token
    distributions at every response position (one shared tokenizer). Each side reads its own
    context + the record's prompt + the same response ids, so p can be a teacher under a
    hidden context. Also returns p's mean log-likelihood per token of the responses
    (`p_logp`) and the mean response tokens (`tokens`)."""
    q_context, p_context = q_context or [], p_context or []
    q_examples, p_examples = [], []
    for i, r in enumerate(records):
        response = response_ids(tokenizer, r.prompt, r)
        for context, out in ((q_context, q_examples), (p_context, p_examples)):
            prompt = data.encode_prompt(tokenizer, context + r.prompt)
            out.append(data.Example(str(i), prompt + response, len(prompt), False))
    kl_sum, logp_sum, tokens = 0.0, 0.0, 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with torch.no_grad():
        # Chunked by the q side's lengths; both sides hold the same rows in the same order.
        for idx in engine.length_sorted_chunks(q_examples, batch_size):
            q_batch = engine.collate([q_examples[i] for i in idx], pad)
            p_batch = engine.collate([p_examples[i] for i in idx], pad)
            logits_q, _, mask_q = engine.response_logits(q_model, q_batch)
            logits_p, targets_p, mask_p = engine.response_logits(p_model, p_batch)
            for row in range(len(idx)):
                keep_q, keep_p = mask_q[row].bool(), mask_p[row].bool()
                lq = torch.log_softmax(logits_q[row][keep_q].float(), -1)
                lp = torch.log_softmax(logits_p[row][keep_p].float(), -1)
                kl_sum += float((lq.exp() * (lq - lp)).sum())
                target = targets_p[row][keep_p]
                logp_sum += float(lp.gather(-1, target[:, None]).sum())
                tokens += int(keep_q.sum())
    return {
        "kl": kl_sum / tokens,
        "p_logp": logp_sum / tokens,
        "tokens": tokens / len(records),
    }


def text_kl(
    q: tuple[Any, Any], p: tuple[Any, Any], records: list[data.Record]
) -> tuple[float, float]:
    """(Σ[log q(y) - log p(y)] / Σ q-tokens, mean q-tokens) over `records`' responses, each
    model scoring the text with its own tokenizer and chat template (a Monte-Carlo estimate)."""
    prompts = [r.prompt for r in records]
    responses = [r.response or "" for r in records]
    done = [data.record_finished(r) for r in records]
    est = evaluate.reverse_kl_estimate(q[0], q[1], p[0], p[1], prompts, responses, finished=done)
    tokens = sum(len(response_ids(q[1], r.prompt, r)) for r in records)
    return est["per_token"], tokens / len(records)


def finished(records: list[data.Record]) -> float:
    return sum(r.meta.get("finish_reason") == "stop" for r in records) / len(records)


def score(
    student: tuple[Any, Any],
    answers: list[data.Record],
    teacher_test: list[data.Record],
    teacher_pair: tuple[Any, Any],
    context: list[dict[str, str]] | None,
    exact: bool,
) -> dict[str, float]:
    """The lab's metrics of one system's test answers."""
    if exact:
        rev = exact_token_kl(student[0], teacher_pair[0], student[1], answers, p_context=context)
        fwd = exact_token_kl(
            teacher_pair[0], student[0], student[1], teacher_test, q_context=context
        )
        out = {"reverse_kl": rev["kl"], "forward_kl": fwd["kl"], "teacher_logp": rev["p_logp"]}
        out["length"] = rev["tokens"]
    else:
        reverse, length = text_kl(student, teacher_pair, answers)
        forward, _ = text_kl(teacher_pair, student, teacher_test)
        logp = evaluate.teacher_logprob(
            teacher_pair[0],
            teacher_pair[1],
            [r.prompt for r in answers],
            [r.response or "" for r in answers],
            finished=[data.record_finished(r) for r in answers],
        )
        out = {"reverse_kl": reverse, "forward_kl": forward, "teacher_logp": statistics.mean(logp)}
        out["length"] = length
    out["finished"] = finished(answers)
    return out


# ------------------------------------------------------------------ validation


def validate(args: argparse.Namespace, out: Path) -> None:
    """Measure candidate hidden contexts on the validation prompts: how far the untouched
    student is from the teacher (exact reverse and forward KL) and how many teacher answers
    finish within the budget. The held-out test prompts are never touched."""
    candidates = json.loads(CANDIDATES_FILE.read_text())
    names = args.contexts or list(candidates)
    val = prompt_splits(args.n_test, args.n_val, args.n_train)["val"]
    name = "tiny" if args.tiny else SETTINGS["context"]["teacher"]
    model = str(models.build_tiny(out / "tiny", seed=1)) if args.tiny else name
    student_answers = sample(model, val, out / "student_val.jsonl", args, 7, args.eval_samples)
    pair = models.load(model)
    rows = []
    for cand in names:
        context = candidates[cand]
        answers = sample(
            model, val, out / f"teacher_val-{cand}.jsonl", args, 8, args.eval_samples, context
        )
        rev = exact_token_kl(pair[0], pair[0], pair[1], student_answers, p_context=context)
        fwd = exact_token_kl(pair[0], pair[0], pair[1], answers, q_context=context)
        rows.append(
            {
                "context": cand,
                "max_tokens": args.max_tokens,
                "reverse_kl": rev["kl"],
                "forward_kl": fwd["kl"],
                "teacher_finished": finished(answers),
                "teacher_length": fwd["tokens"],
                "student_finished": finished(student_answers),
                "student_length": rev["tokens"],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    (out / "validate.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        "| context | max tokens | reverse KL | forward KL | teacher finished | teacher length |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['context']} | {r['max_tokens']} | {r['reverse_kl']:.3f} | "
            f"{r['forward_kl']:.3f} | {r['teacher_finished']:.0%} | {r['teacher_length']:.1f} |"
        )
    print("\n".join(lines))


# ------------------------------------------------------------------ training


@dataclasses.dataclass
class Trained:
    """A system to score: its model folder and its wall time from the untouched student."""

    folder: str
    train_s: float
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def sft_config(
    args: argparse.Namespace, data_file: Path, run: Path, seed: int, epochs: int, every: int = 1
) -> cfg.SFTConfig:
    """SeqKD, with a checkpoint every `every` epochs (GAD at equal exposure starts from one)."""
    return cfg.SFTConfig(
        data=str(data_file),
        model=args.student,
        output_dir=str(run),
        epochs=epochs,
        lr=args.lr,
        micro_batch_size=args.sft_batch,
        max_response_tokens=args.max_tokens,
        seed=seed,
        save_every=args.steps_per_epoch * every,
        keep_checkpoints=0,
        save_state=False,
    )


def gad_config(
    args: argparse.Namespace, data_file: Path, init: str, run: Path, seed: int, **extra: Any
) -> cfg.GADConfig:
    """The GAD stage from a SeqKD checkpoint: the warmup is the discriminator's only."""
    return cfg.GADConfig(
        data=str(data_file),
        model=init,
        output_dir=str(run),
        warmup_epochs=args.d_warmup_epochs,
        warmup_d_only_steps=0,
        # Epochs only bound the plan; max_steps sets the length.
        epochs=float(max(1, math.ceil(args.long_steps * args.batch_prompts / args.n_train_ok))),
        max_steps=args.gad_steps,
        batch_prompts=args.batch_prompts,
        n_samples=args.n_samples,
        micro_batch_size=8,
        generation_batch_size=64,
        # Temperature 1: the policy GRPO improves is the one the exact KL scores.
        temperature=1.0,
        max_response_tokens=args.max_tokens,
        lr=args.gad_lr,
        d_lr=args.d_lr,
        seed=seed,
        # No checkpoints but the ones the lab reads (GBs each); the warmup's optimizer states,
        # which the GAD stage continues, are written whatever this says.
        save_every=0,
        save_state=False,
        keep_checkpoints=0,
        **({"warmup_generator": False} | extra),
    )


def timed(fn: Any, *a: Any, **kw: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    result = fn(*a, **kw)
    return result, time.perf_counter() - started


def checkpoint_at(run: Path, step: int) -> Path:
    folder = run / "checkpoints" / f"step-{step:06d}"
    if not (folder / "config.json").exists():
        raise RuntimeError(f"lab: expected a checkpoint at {folder}")
    return folder


def stage_stats(stage_dir: Path, upto: int | None = None) -> dict[str, float]:
    """What explains a GAD-stage result: the discriminator's accuracy over the second half of
    the stage (0.5 is the equilibrium; near 1, a shortcut or a student far from the teacher)
    and the mean step time."""
    rows = [r for r in read_metrics(stage_dir) if "time/step" in r]
    rows = [r for r in rows if upto is None or r["step"] <= upto]
    out: dict[str, float] = {}
    if rows:
        out["step_s"] = statistics.mean(r["time/step"] for r in rows)
        late = [r["d/accuracy"] for r in rows[len(rows) // 2 :] if "d/accuracy" in r]
        if late:
            out["d_accuracy"] = statistics.mean(late)
    return out


def train_seed(
    setting: str,
    methods: list[str],
    data_file: Path,
    out: Path,
    args: argparse.Namespace,
    seed: int,
    context_file: Path | None,
    first: bool,
) -> dict[str, Trained]:
    """Train every method of one seed; returns {system: Trained}. The first seed also runs
    the long GAD run and SeqKD at equal wall time (context setting)."""
    # The untouched student is one model: scored once, with the first seed's samples.
    systems = {"before": Trained(args.student, 0.0)} if first else {}
    run = out / f"s{seed}"
    k = args.seqkd_epochs
    seqkd_final, seqkd_s = timed(sft.train, sft_config(args, data_file, run / "seqkd", seed, k))
    systems["seqkd"] = Trained(str(seqkd_final), seqkd_s)
    long = first and setting == "context" and args.long_steps > args.gad_steps

    # One discriminator warmup from SeqKD, shared by GAD and each stabiliser (they differ in
    # the GAD stage only); each variant's run folder links to it.
    gad_like = [
        m
        for m in methods
        if m == "gad" or (m in STABILISERS and (first or args.stabiliser_seeds == "all"))
    ]
    warm_s = 0.0
    if gad_like:
        base = gad_config(args, data_file, str(seqkd_final), run / "gad", seed)
        _, warm_s = timed(gad_stage.train, dataclasses.replace(base, stage="warmup"))
    for method in gad_like:
        folder = run / method
        if method != "gad":
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "warmup").symlink_to(run / "gad" / "warmup", target_is_directory=True)
        config = gad_config(
            args, data_file, str(seqkd_final), folder, seed, **STABILISERS.get(method, {})
        )
        if method == "gad" and long:
            # The long run: its step-`gad_steps` checkpoint is the first seed's row of the main
            # table. The product's held-out evaluation (exact reverse KL on the validation
            # prompts, on its own random stream, so training is unchanged) gives the curve and
            # the model selection (`gad_selected`).
            # It stops at `gad_steps` with a full checkpoint, then resumes to `long_steps`
            # (bit for bit the uninterrupted run): one checkpoint on disk, not one per period.
            config = dataclasses.replace(
                config,
                stage="gad",
                eval_every=args.curve_every,
                eval_data=str(args.val_data),
                teacher_model=args.teacher,
                teacher_context=str(context_file),
            )
            _, first_s = timed(gad_stage.train, dataclasses.replace(config, save_state=True))
            config = dataclasses.replace(config, max_steps=args.long_steps, resume=True)
            final, gad_s = timed(gad_stage.train, config)
            gad_s += first_s
        else:
            final, gad_s = timed(gad_stage.train, dataclasses.replace(config, stage="gad"))
        if method == "gad" and long:
            # Step times from the run's own timers: the held-out evaluations are not training.
            steps = [r for r in read_metrics(folder / "gad") if "time/step" in r]
            per_step = statistics.mean(r["time/step"] for r in steps)
            main_s = sum(r["time/step"] for r in steps if r["step"] <= args.gad_steps)
            main_at = checkpoint_at(folder / "gad", args.gad_steps)
            offsets = {"offset_s": seqkd_s + warm_s, "per_step_s": per_step}
            stats = stage_stats(folder / "gad")
            systems["gad_long"] = Trained(str(final), seqkd_s + warm_s + gad_s, offsets | stats)
            stats = stage_stats(folder / "gad", args.gad_steps)
            systems["gad"] = Trained(str(main_at), seqkd_s + warm_s + main_s, stats)
            selection = json.loads((folder / "gad" / "selection.json").read_text())
            if selection.get("model"):
                step = selection["chosen_step"]
                systems["gad_selected"] = Trained(
                    selection["model"],
                    seqkd_s + warm_s + gad_s,
                    {"chosen_step": step, "val_reverse_kl": selection["value"]},
                )
        else:
            stats = stage_stats(folder / "gad")
            systems[method] = Trained(str(final), seqkd_s + warm_s + gad_s, stats)

    if "gad_equal_exposure" in methods:
        # SeqKD after k-1 epochs, then GAD: k epochs of teacher data in all, as SeqKD.
        spe = args.steps_per_epoch
        init = checkpoint_at(run / "seqkd", (k - 1) * spe) if k > 1 else Path(args.student)
        config = gad_config(args, data_file, str(init), run / "gad_equal_exposure", seed)
        final, s = timed(gad_stage.train, dataclasses.replace(config, stage="all"))
        stats = stage_stats(run / "gad_equal_exposure" / "gad")
        systems["gad_equal_exposure"] = Trained(str(final), seqkd_s * (k - 1) / k + s, stats)

    if "gad_lora" in methods:
        # Single-base LoRA: the SeqKD model is the frozen base of every role; the discriminator
        # is an adapter and head on it, so it needs its own warmup (the same length as gad's).
        scale, rank = args.lora_lr_scale, args.lora_rank
        config = gad_config(
            args,
            data_file,
            str(seqkd_final),
            run / "gad_lora",
            seed,
            lora_rank=rank,
            lora_alpha=2.0 * rank,
            single_base=True,
        )
        config = dataclasses.replace(config, lr=args.gad_lr * scale, d_lr=args.d_lr * scale)
        final, s = timed(gad_stage.train, dataclasses.replace(config, stage="all"))
        stats = stage_stats(run / "gad_lora" / "gad")
        systems["gad_lora"] = Trained(str(final), seqkd_s + s, stats)

    if "whitebox" in methods and setting == "context":
        config = gad_config(
            args,
            data_file,
            str(seqkd_final),
            run / "whitebox",
            seed,
            method="whitebox",
            teacher_model=args.teacher,
            teacher_context=str(context_file),
        )
        final, s = timed(gad_stage.train, dataclasses.replace(config, stage="gad"))
        stats = stage_stats(run / "whitebox" / "gad")
        systems["whitebox"] = Trained(str(final), seqkd_s + s, stats)

    if "offpolicy" in methods:
        config = gad_config(
            args, data_file, str(seqkd_final), run / "offpolicy", seed, method="offpolicy"
        )
        config = dataclasses.replace(config, offpolicy_d_epochs=args.d_warmup_epochs)
        final, s = timed(gad_stage.train, dataclasses.replace(config, stage="all"))
        systems["offpolicy"] = Trained(str(final), seqkd_s + s)

    if long and "gad_long" in systems:
        # Equal wall time: SeqKD given as long as GAD's main run took, in whole epochs.
        target = systems["gad"].train_s
        epochs = max(k + 1, round(target / (seqkd_s / k)))
        # About 4 checkpoints: each is a point of the equal-time curve.
        config = sft_config(args, data_file, run / "seqkd_long", seed, epochs, max(1, epochs // 4))
        final, s = timed(sft.train, config)
        systems["seqkd_equal_time"] = Trained(str(final), s, {"epochs": epochs})
    return systems


# ------------------------------------------------------------------ one setting


def curve(
    run: Path,
    offset_s: float,
    seconds_per_step: float,
    val: list[data.Record],
    val_context: tuple[Any, Any, list[dict[str, str]]],
    args: argparse.Namespace,
    out: Path,
    name: str,
) -> list[dict[str, float]]:
    """Exact reverse KL, length and finish rate of every checkpoint of `run` on the validation
    prompts (one answer each), against wall time: the seed-0 curves."""
    teacher_model, _, context = val_context
    points = []
    for folder in sorted((run / "checkpoints").glob("step-*")):
        step = int(folder.name.split("-")[1])
        answers = sample(str(folder), val, out / f"curve-{name}-{step}.jsonl", args, 99, 1)
        student = models.load(str(folder))
        rev = exact_token_kl(student[0], teacher_model, student[1], answers, p_context=context)
        points.append(
            {
                "step": step,
                "wall_s": offset_s + seconds_per_step * step,
                "reverse_kl": rev["kl"],
                "length": rev["tokens"],
                "finished": finished(answers),
            }
        )
        print(json.dumps({"curve": name, **points[-1]}), flush=True)
    return points


def plot_equal_time(curves: dict[str, list[dict[str, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    for name, points in curves.items():
        if points:
            ax[0].plot([p["wall_s"] for p in points], [p["reverse_kl"] for p in points], "o-")
            ax[1].plot([p["wall_s"] for p in points], [p["length"] for p in points], "o-")
            ax[0].lines[-1].set_label(name)
    ax[0].set(xlabel="wall time from the untouched student (s)", ylabel="exact reverse KL")
    ax[1].set(xlabel="wall time (s)", ylabel="mean answer tokens")
    ax[0].legend()
    fig.suptitle("lab v2, context setting, seed 0, validation prompts")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_setting(
    setting: str, args: argparse.Namespace, out: Path, results: dict[str, Any], meta: dict
) -> None:
    spec = SETTINGS[setting]
    out = out / setting
    out.mkdir(parents=True)
    exact = spec["exact"]
    if args.tiny:
        args.teacher = str(models.build_tiny(out / "tiny-teacher", seed=1, num_layers=4))
        args.student = (
            args.teacher if exact else str(models.build_tiny(out / "tiny-student", seed=2))
        )
    else:
        args.teacher, args.student = spec["teacher"], spec["student"]
    context_file = Path(args.context) if exact else None
    context = load_context(context_file) if context_file else None
    # Context setting: the student is the teacher's model without the context.
    methods = args.methods if exact else [m for m in args.methods if m in args.cross_methods]
    seeds = args.seeds if exact else args.cross_seeds
    splits = prompt_splits(args.n_test, args.n_val, args.n_train)
    started = time.perf_counter()
    teacher_train = sample(
        args.teacher, splits["train"], out / "teacher_train.jsonl", args, 1234, 1, context
    )
    teacher_test = sample(
        args.teacher,
        splits["test"],
        out / "teacher_test.jsonl",
        args,
        1235,
        args.eval_samples,
        context,
    )
    # The long run's held-out evaluation (context setting only) reads teacher answers.
    teacher_val = (
        sample(args.teacher, splits["val"], out / "teacher_val.jsonl", args, 1236, 1, context)
        if exact
        else []
    )
    args.val_data = str(out / "teacher_val.jsonl")
    meta[setting] = {
        "teacher_s": time.perf_counter() - started,
        "teacher_train_finished": finished(teacher_train),
        "teacher_test_finished": finished(teacher_test),
        "teacher_val_finished": finished(teacher_val) if teacher_val else None,
        "seeds": seeds,
        "methods": methods,
    }
    data_file = out / "teacher_train.jsonl"
    args.n_train_ok = len(teacher_train)
    args.steps_per_epoch = math.ceil(len(teacher_train) / args.sft_batch)  # SeqKD's
    teacher_pair = models.load(args.teacher)
    results[setting] = {}
    for seed in seeds:
        first = seed == seeds[0]
        systems = train_seed(setting, methods, data_file, out, args, seed, context_file, first)
        for system, trained in systems.items():
            answers = sample(
                trained.folder,
                splits["test"],
                out / f"s{seed}" / f"answers-{system}.jsonl",
                args,
                seed,
                args.eval_samples,
            )
            student = models.load(trained.folder)
            row = {"seed": seed, "train_s": trained.train_s, **trained.extra}
            row |= score(student, answers, teacher_test, teacher_pair, context, exact)
            results[setting].setdefault(system, []).append(row)
            print(json.dumps({"setting": setting, "system": system, **row}), flush=True)
        add_gap_closed(results[setting], seed)
        write_results(Path(args.out), results, meta, args)
        if "gad_long" in systems and context is not None:
            first_dir = out / f"s{seed}"
            long, eq = systems["gad_long"], systems["seqkd_equal_time"]
            val_ctx = (teacher_pair[0], teacher_pair[1], context)
            eq_per_step = eq.train_s / (eq.extra["epochs"] * args.steps_per_epoch)
            evals = [r for r in read_metrics(first_dir / "gad" / "gad") if "eval/reverse_kl" in r]
            curves = {
                "gad (from SeqKD)": [
                    {
                        "step": r["step"],
                        "wall_s": long.extra["offset_s"] + long.extra["per_step_s"] * r["step"],
                        "reverse_kl": r["eval/reverse_kl"],
                        "length": r["eval/length_mean"],
                        "finished": r["eval/finished_share"],
                    }
                    for r in evals
                ],
                "seqkd": curve(
                    first_dir / "seqkd_long",
                    0.0,
                    eq_per_step,
                    splits["val"],
                    val_ctx,
                    args,
                    out,
                    "seqkd",
                ),
            }
            meta[setting]["curves_seed0"] = curves
            plot_equal_time(curves, Path(args.out) / "lab-v2-equal-time.png")
            report.plot_curves("lab-v2-context-gad", read_metrics(first_dir / "gad" / "gad"), out)
            for png in out.glob("*.png"):
                shutil.copy(png, Path(args.out) / png.name)
            write_results(Path(args.out), results, meta, args)
        if not args.keep_models:
            prune(out / f"s{seed}")


def prune(run: Path) -> None:
    """Delete a finished seed's weights and optimizer states (GBs per run); metrics, configs
    and answers stay."""
    for pattern in ("*.safetensors", "trainer_state.pt", "*.bin"):
        for path in run.rglob(pattern):
            if not path.is_symlink() and path.is_file():
                path.unlink()


def add_gap_closed(by_method: dict[str, list[dict[str, Any]]], seed: int) -> None:
    """(KL_seqkd - KL_m) / (KL_seqkd - KL_whitebox) on exact reverse KL, within one seed."""

    def at(method: str) -> dict[str, Any] | None:
        return next((r for r in by_method.get(method, []) if r["seed"] == seed), None)

    seqkd, ceiling = at("seqkd"), at("whitebox")
    if seqkd is None or ceiling is None:
        return
    gap = seqkd["reverse_kl"] - ceiling["reverse_kl"]
    for method in by_method:
        row = at(method)
        if row is not None and gap != 0:
            row["gap_closed"] = (seqkd["reverse_kl"] - row["reverse_kl"]) / gap


# ------------------------------------------------------------------ output


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out = {}
    for key in (*METRICS, "gap_closed"):
        values = [r[key] for r in rows if key in r]
        if values:
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            out[key] = {"mean": statistics.mean(values), "std": std, "n": len(values)}
    return out


def table(results: dict[str, dict[str, list[dict[str, Any]]]]) -> str:
    keys = (*METRICS, "gap_closed")
    parts = []
    for setting, by_method in results.items():
        lines = [f"### {setting}", "", "| system | " + " | ".join(keys) + " |"]
        lines.append("|---|" + "---:|" * len(keys))
        for method, rows in by_method.items():
            s = summarise(rows)
            cells = [
                f"{s[k]['mean']:.3f} ± {s[k]['std']:.3f} (n={s[k]['n']})" if k in s else "—"
                for k in keys
            ]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def code_version() -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(HERE), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"


def write_results(out: Path, results: dict, meta: dict, args: argparse.Namespace) -> None:
    (out / "lab-v2.json").write_text(json.dumps(results, indent=2) + "\n")
    skip = {"teacher", "student", "n_train_ok", "steps_per_epoch", "val_data"}
    run = {
        "args": {k: v for k, v in vars(args).items() if k not in skip},
        "code": code_version(),
        "threads": torch.get_num_threads(),
        # Speed figures (train_s, equal wall time) hold for this CPU and precision only.
        "machine": precision.machine(),
        "precision": precision.resolve("auto").reason,
        "context": load_context(args.context),
        "settings": meta,
    }
    (out / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    (out / "table.md").write_text(table(results))


# ------------------------------------------------------------------ main


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    add = parser.add_argument
    add("--settings", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS))
    add("--methods", nargs="+", choices=ALL_METHODS, default=list(DEFAULT_METHODS))
    add("--seeds", type=int, nargs="+", default=[0, 1, 2])
    add("--out", required=True, help="a new or empty folder")
    add("--context", default=str(CONTEXT_FILE), help="the hidden context (JSON messages)")
    add("--validate", action="store_true", help="measure candidate contexts on validation")
    add("--contexts", nargs="+", help="--validate: candidate names (default: all)")
    add("--n-test", type=int, default=12, help="held-out prompts (the table)")
    add("--n-val", type=int, default=16, help="validation prompts (choices, curves)")
    add("--n-train", type=int, default=32, help="prompts the teacher answers for training")
    add("--eval-samples", type=int, default=2, help="answers per test prompt")
    add("--max-tokens", type=int, default=64, help="every answer's budget")
    add("--gen-batch", type=int, default=48, help="answers generated together")
    add("--batch-prompts", type=int, default=2, help="prompts per GAD step")
    add("--sft-batch", type=int, default=4, help="answers per SeqKD step")
    add("--n-samples", type=int, default=4, help="GAD: samples per prompt (the group)")
    add("--seqkd-epochs", type=int, default=2, help="k")
    add("--d-warmup-epochs", type=float, default=0.25, help="discriminator-only warmup")
    add("--gad-steps", type=int, default=10, help="GAD-stage steps of the main table")
    add("--long-steps", type=int, default=100, help="seed 0's long GAD run (context)")
    add("--curve-every", type=int, default=25, help="long run: held-out evaluation period")
    add("--lr", type=float, default=5e-5, help="SeqKD")
    add("--gad-lr", type=float, default=1e-5, help="GAD stage and white-box generator")
    add("--d-lr", type=float, default=5e-5, help="discriminator")
    add("--keep-models", action="store_true", help="keep every run's weights (GBs per run)")
    add("--lora-rank", type=int, default=16, help="gad_lora: adapter rank")
    add("--lora-lr-scale", type=float, default=10.0, help="gad_lora: x both learning rates")
    add("--stabiliser-seeds", choices=("first", "all"), default="first")
    add("--cross-seeds", type=int, nargs="+", default=[0], help="cross-tokenizer seeds")
    add("--cross-methods", nargs="+", choices=ALL_METHODS, default=["seqkd", "gad"])
    add("--tiny", action="store_true", help="tiny random models and sizes: a smoke test")
    args = parser.parse_args(argv)
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    return args


# Sizes of --tiny: every path of the benchmark in seconds.
TINY = {
    "n_test": 3,
    "n_val": 2,
    "n_train": 4,
    "eval_samples": 1,
    "max_tokens": 6,
    "batch_prompts": 2,
    "sft_batch": 2,
    "n_samples": 2,
    "seqkd_epochs": 2,
    "d_warmup_epochs": 0.5,
    "gad_steps": 2,
    "long_steps": 4,
    "curve_every": 2,
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the lab; returns what `lab-v2.json` holds."""
    args = parse(argv)
    out = Path(args.out)
    check_out(out)
    if args.validate:
        validate(args, out)
        return {}
    check_product(args.methods)
    results: dict[str, Any] = {}
    meta: dict[str, Any] = {}
    started = time.perf_counter()
    for setting in args.settings:
        run_setting(setting, args, out, results, meta)
        meta[setting]["wall_s"] = time.perf_counter() - started
        write_results(out, results, meta, args)
    print(table(results))
    return results


if __name__ == "__main__":
    main()
