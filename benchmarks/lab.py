"""Lab v3: can black-box distillation methods be told apart? A two-mode teacher with exact
probabilities, a capacity-limited student, paired statistics.

The teacher (`--teacher`, a local model) answers under one of K hidden contexts drawn per answer
with prior weights (`--teacher-contexts`, a `gad.mixture` file; two behaviours by default).
Its exact next-token distribution is the posterior-weighted mixture of its contexts'
(`gad.mixture`), so every KL below is exact over the full vocabulary. The student
(`--student`, same tokenizer) never sees a context, and every method trains the same small
parametrisation: a LoRA adapter of rank `--lora-rank` on the untouched student.

Prompts (`--prompts`: built-in set names or chat-record files) are deduplicated, shuffled once
(seed 0) and cut into test, validation and train prompts. The teacher answers each train prompt
`--answers-per-prompt` times: those answers are all any method sees. Every system answers the
evaluation prompts (`--split test`, or `val` while tuning: test is then never touched)
`--eval-samples` times at temperature 1, with the same per-answer seeds for every system.

Per answer: `reverse_kl` = Σ over its tokens of exact KL(student || teacher) (the primary
metric), `reverse_kl_token` (per token, pooled), `length`, `finished`, the answer's
`mode` (the context with the highest posterior at its end), `best_mode_logp` (its per-token
log-likelihood under its best-fitting context: a blend of modes is unlikely under both) and
`teacher_logp` (per token, under the mixture). Per prompt: `mode_purity` (share of its answers
in its majority mode). `forward_kl`: Σ over a held-out teacher answer's tokens of KL(teacher ||
student), on `--teacher-eval-answers` answers per evaluation prompt.

Methods (`--methods`): `before` (untouched student), `seqkd` (SFT of the adapter,
`--seqkd-epochs`, `--seqkd-lr`; `--score-every-epoch` also scores each epoch), `gad` (from the
SeqKD adapter, its discriminator initialised from the untouched student and warmed up alone on
SeqKD's samples; variants `--gad-variant NAME='{"setting": value}'` run as `gad-NAME`), `soda`
(DPO against a snapshot of the untouched student's answers, from the untouched student),
`whitebox` (the product's `--method whitebox` with the mixture as `teacher_context`: the
ceiling, at `--whitebox-lr`). The defaults of the learning rates, epochs and LoRA alpha are the
choices of the validation pilot (docs/benchmarks.md, "Lab benchmark v3").
`--long-steps`: the first seed's GAD run continues to that many steps with held-out curves every
`--curve-every` (`gad_long`).

Each (seed, method) writes `rows/<split>/s<seed>/<method>.json` when it finishes; a rerun with
the same `--out` skips what is there (resumable per seed and method), and `--merge A B` folds
other runs' rows in (mergeable across sessions). `lab-v3.json`: split -> method -> per-seed
rows (means and per-prompt values), plus `paired` (each method minus SeqKD, and each GAD
variant and the long run minus GAD: mean and 95% bootstrap CI, resampling seeds then prompts)
and `gap_closed` ((SeqKD - method) / (SeqKD - white box), a ratio of means, with its CI).
`lab-v3.png`: per-answer reverse KL with its paired CIs, each seed's main GAD run (sampled
answer length and the discriminator's batch accuracy per step) and the long run's held-out
curves, found in whichever folder (`--out` or `--merge`) ran them.

    python benchmarks/lab.py --out runs/lab-v3                       # the main run
    python benchmarks/lab.py --split val --out runs/lab-v3-val ...   # tuning, on validation
    python benchmarks/lab.py --tiny --out /tmp/lab-tiny              # tiny models, a minute
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

from gad.config import load as cfg
from gad.core.tracking import read_metrics
from gad.data import chats, evalsets
from gad.methods import stage as gad_stage
from gad.models import lora, mixture, precision, store
from gad.models.packages import BUILTIN_MODELS
from gad.train import engine, sft
from gad.train.rollout import Sampling, TransformersRollout

HERE = Path(__file__).resolve().parent
TEACHER_FILE = HERE / "lab_v3_teacher.json"
ALL_METHODS = ("before", "seqkd", "gad", "soda", "whitebox")
# Per-answer metrics averaged per prompt, then over prompts.
ANSWER_METRICS = ("reverse_kl", "length", "finished", "best_mode_logp", "teacher_logp")
PAIRED_METRICS = ("reverse_kl", "reverse_kl_token", "forward_kl", "length", "mode_purity")
NEEDS = {"soda": ("soda_beta",), "whitebox": ("teacher_model", "teacher_context")}


class Refused(SystemExit):
    """The lab will not run as asked; the message says why, on one line."""


# ------------------------------------------------------------------ inputs


def bundled_prompts() -> str:
    import importlib.resources

    return str(importlib.resources.files("gad") / "assets" / "prompts.jsonl")


def load_prompts(sources: list[str]) -> list[list[dict[str, str]]]:
    """Distinct prompts of the given sets, in order: `bundled`, a built-in set name or a file."""
    seen, prompts = set(), []
    for source in sources:
        try:
            records = evalsets.load_set(bundled_prompts() if source == "bundled" else source)
        except (cfg.UserError, OSError) as err:
            raise Refused(f"lab: --prompts {source}: {err}") from err
        for r in records:
            key = json.dumps(r.prompt, sort_keys=True)
            if key not in seen:
                seen.add(key)
                prompts.append(r.prompt)
    return prompts


def split_prompts(args: argparse.Namespace) -> dict[str, list[list[dict[str, str]]]]:
    """Test, validation and train prompts from one shuffle (seed 0). Prompts over
    `--max-prompt-tokens` under the student's template are left out first (a few Self-Instruct
    tasks carry inputs of ~1,500 tokens: each would slow a whole generation batch)."""
    tokenizer = store.load_tokenizer(args.student)
    prompts = [
        p
        for p in load_prompts(args.prompts)
        if len(chats.encode_prompt(tokenizer, p)) <= args.max_prompt_tokens
    ]
    random.Random(0).shuffle(prompts)
    need = args.n_test + args.n_val + args.n_train
    if len(prompts) < need:
        raise Refused(
            f"lab: {len(prompts)} distinct prompts in --prompts; asked for "
            f"{args.n_test} test + {args.n_val} val + {args.n_train} train"
        )
    return {
        "test": prompts[: args.n_test],
        "val": prompts[args.n_test : args.n_test + args.n_val],
        "train": prompts[args.n_test + args.n_val : need],
    }


def check_inputs(args: argparse.Namespace) -> list[mixture.Component]:
    """Everything the lab reads, checked before any model loads."""
    try:
        contexts = mixture.load(args.teacher_contexts)
    except cfg.ConfigError as err:
        raise Refused(f"lab: --teacher-contexts: {err}") from err
    have = {f.name for f in dataclasses.fields(cfg.GADConfig)}
    for method in args.methods:
        missing = [f for f in NEEDS.get(method, ()) if f not in have]
        if missing:
            raise Refused(f"lab: {method} needs GADConfig fields {missing}: merge main")
    for name in (args.teacher, args.student):
        if name not in BUILTIN_MODELS and not Path(name).is_dir():
            raise Refused(f"lab: model {name}: neither a built-in name nor a folder")
    return contexts


def check_tokenizers(teacher: str, student: str) -> None:
    """Exact KL compares distributions over one vocabulary: refuse another tokenizer."""
    if store.load_tokenizer(teacher).get_vocab() != store.load_tokenizer(student).get_vocab():
        raise Refused(
            f"lab: teacher {teacher} and student {student} have different tokenizers; the "
            "exact KL needs one vocabulary (lab v2's cross-tokenizer setting is in git history)"
        )


# ------------------------------------------------------------------ sampling


@dataclasses.dataclass
class Answer:
    """One sampled answer: prompt `pid` of its split, sample `j`, its exact ids."""

    pid: int
    j: int
    ids: list[int]
    text: str
    finished: bool
    mode: int | None = None


def answer_seed(seed: int, pid: int, j: int) -> int:
    return (seed * 1_000_003 + pid * 1009 + j) % 2**31


def load_system(folder: str, student: str) -> tuple[Any, Any]:
    """A system's model in float32: a plain folder, or a LoRA checkpoint merged onto the
    untouched student (checkpoints of a LoRA run hold the adapter only)."""
    if Path(folder).is_dir() and not (Path(folder) / "config.json").exists():
        adapter = lora.adapter_folder(folder)
        if adapter is not None:
            from peft import PeftModel

            base, tokenizer = store.load(student)
            return PeftModel.from_pretrained(base, adapter).merge_and_unload().eval(), tokenizer
    return store.load(folder)


def sample(
    pair: tuple[Any, Any],
    prompts: list[list[dict[str, str]]],
    n: int,
    seed: int,
    args: argparse.Namespace,
    contexts: list[mixture.Component] | None = None,
) -> list[Answer]:
    """`n` answers per prompt at temperature 1. With `contexts`, each answer first draws its
    context from the prior (the mixture teacher). Every system draws from one seeded stream
    over the same batches: the same random numbers at the same places (paired samples)."""
    model, tokenizer = pair
    items = []
    for pid, prompt in enumerate(prompts):
        for j in range(n):
            mode, context = None, []
            if contexts:
                rng = random.Random(answer_seed(seed, pid, j))
                mode = rng.choices(range(len(contexts)), [c.weight for c in contexts])[0]
                context = contexts[mode].messages
            items.append((pid, j, mode, chats.encode_prompt(tokenizer, context + prompt)))
    # Sampled under the training's autocast (bf16 where the CPU computes it natively): the
    # exact KLs are then computed in float32 along these samples.
    rollout = TransformersRollout(
        model,
        tokenizer,
        batch_size=args.gen_batch,
        autocast_dtype=precision.autocast_dtype(precision.resolve("auto").mixed_precision),
    )
    torch.manual_seed(seed)
    groups = rollout.generate([ids for *_, ids in items], 1, Sampling(1.0, 1.0, args.max_tokens))
    return [
        Answer(pid, j, c.token_ids, c.text, c.finish_reason == "stop", mode)
        for (pid, j, mode, _), [c] in zip(items, groups, strict=True)
    ]


def save_answers(path: Path, answers: list[Answer]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(dataclasses.asdict(a)) + "\n" for a in answers))
    tmp.replace(path)


def cached_answers(path: Path, make: Any) -> list[Answer]:
    if path.exists():
        return [Answer(**json.loads(line)) for line in path.read_text().splitlines()]
    answers = make()
    save_answers(path, answers)
    return answers


def training_records(split: str, prompts: list, answers: list[Answer]) -> list[chats.Record]:
    """Teacher answers as the chat records every method trains on (text only, the finish
    reason and the mode in `meta`; the context stays hidden)."""
    return [
        chats.Record(
            f"{split}-{a.pid}-{a.j}",
            prompts[a.pid] + [{"role": "assistant", "content": a.text}],
            {"finish_reason": "stop" if a.finished else "length", "mode": a.mode},
        )
        for a in answers
    ]


# ------------------------------------------------------------------ exact scoring


class Side:
    """One model reading every answer after one context: the ids every prompt shares at its
    start (the context, the template's system turn) run once, and their KV cache is reused by
    every batch. The contexts are ~10x longer than an answer, so this is most of the cost."""

    def __init__(self, model: Any, tokenizer: Any, context: list, prompts: list) -> None:
        self.model, self.tokenizer, self.context, self.prompts = model, tokenizer, context, prompts
        encoded = [chats.encode_prompt(tokenizer, context + p) for p in prompts]
        self.prompt_ids = encoded
        self.prefix = engine.SharedPrefix(model, encoded, min_shared=1)
        self.shared, self.cache = self.prefix.length, self.prefix.cache

    def log_dists(self, chunk: list[Answer]) -> list[torch.Tensor]:
        """[T_i, V] float64 next-token log-probs at each answer's positions."""
        if self.cache is None:
            return self._uncached(chunk)
        p = self.shared
        suffixes = [self.prompt_ids[a.pid][p:] + a.ids for a in chunk]
        width = max(map(len, suffixes))
        ids = torch.full((len(chunk), width), engine.pad_id_of(self.tokenizer))
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, suffix in enumerate(suffixes):
            ids[row, : len(suffix)] = torch.tensor(suffix)
            mask[row, : len(suffix)] = 1
        logits = self.model(input_ids=ids, **self.prefix.inputs(mask)).logits
        out = []
        for row, a in enumerate(chunk):
            start = len(self.prompt_ids[a.pid]) - p - 1
            out.append(torch.log_softmax(logits[row, start : start + len(a.ids)].double(), -1))
        return out

    def _uncached(self, chunk: list[Answer]) -> list[torch.Tensor]:
        examples = []
        for a in chunk:
            prompt = self.prompt_ids[a.pid]
            examples.append(chats.Example("", prompt + a.ids, len(prompt), False))
        batch = engine.collate(examples, engine.pad_id_of(self.tokenizer))
        logits_btv, _, mask_bt = engine.response_logits(self.model, batch)
        return [
            torch.log_softmax(logits_btv[row][mask_bt[row] != 0].double(), -1)
            for row in range(len(chunk))
        ]


@torch.no_grad()
def answer_stats(
    student: Any,
    teacher: Any,
    tokenizer: Any,
    contexts: list[mixture.Component],
    prompts: list,
    answers: list[Answer],
    *,
    forward: bool = False,
    batch_size: int = 8,
) -> list[dict[str, float]]:
    """Exact per-answer statistics; `forward` = KL(teacher || student) on teacher answers."""
    log_w = mixture.log_weights(contexts)
    s_side = Side(student, tokenizer, [], prompts)
    t_sides = [Side(teacher, tokenizer, c.messages, prompts) for c in contexts]
    out = []
    for start in range(0, len(answers), batch_size):
        chunk = answers[start : start + batch_size]
        s_rows = s_side.log_dists(chunk)
        t_rows = [side.log_dists(chunk) for side in t_sides]
        for i, a in enumerate(chunk):
            ids = torch.tensor(a.ids)
            logp_ktv = torch.stack([rows[i] for rows in t_rows])
            mix_tv = mixture.next_token_logprobs(logp_ktv, ids, log_w)
            s_tv = s_rows[i]
            q, p = (mix_tv, s_tv) if forward else (s_tv, mix_tv)
            kl = float((q.exp() * (q - p)).sum())
            token_kt = logp_ktv.gather(-1, ids.expand(len(contexts), -1)[..., None])[..., 0]
            seq_k = token_kt.sum(-1)
            n = len(a.ids)
            out.append(
                {
                    "kl": kl,
                    "length": float(n),
                    "finished": float(a.finished),
                    "mode": int(torch.argmax(log_w + seq_k)),
                    "best_mode_logp": float(seq_k.max()) / n,
                    "teacher_logp": float(mixture.token_logprobs(token_kt, log_w).sum()) / n,
                }
            )
    return out


def system_row(
    stats: list[dict[str, float]],
    fwd: list[dict[str, float]],
    answers: list[Answer],
    teacher_answers: list[Answer],
    n_prompts: int,
) -> dict[str, Any]:
    """Per-prompt values and their means (every prompt weighs the same)."""
    by_prompt: list[list[dict[str, float]]] = [[] for _ in range(n_prompts)]
    for a, s in zip(answers, stats, strict=True):
        by_prompt[a.pid].append(s)
    per_prompt: dict[str, list[float]] = {m: [] for m in ANSWER_METRICS}
    per_prompt |= {"reverse_kl_token": [], "mode_purity": [], "forward_kl": []}
    fwd_by_prompt: list[list[float]] = [[] for _ in range(n_prompts)]
    for a, s in zip(teacher_answers, fwd, strict=True):
        fwd_by_prompt[a.pid].append(s["kl"])
    for rows, f in zip(by_prompt, fwd_by_prompt, strict=True):
        per_prompt["reverse_kl"].append(statistics.mean(r["kl"] for r in rows))
        for m in ANSWER_METRICS[1:]:
            per_prompt[m].append(statistics.mean(r[m] for r in rows))
        per_prompt["reverse_kl_token"].append(
            sum(r["kl"] for r in rows) / max(1.0, sum(r["length"] for r in rows))
        )
        modes = [r["mode"] for r in rows]
        per_prompt["mode_purity"].append(max(modes.count(k) for k in set(modes)) / len(modes))
        per_prompt["forward_kl"].append(statistics.mean(f) if f else math.nan)
    means = {m: statistics.mean(v) for m, v in per_prompt.items()}
    means["reverse_kl_token_pooled"] = sum(s["kl"] for s in stats) / sum(s["length"] for s in stats)
    modes = [s["mode"] for s in stats]
    means["mode_shares"] = [modes.count(k) / len(modes) for k in range(max(modes) + 1)]
    return means | {"per_prompt": per_prompt}


# ------------------------------------------------------------------ paired statistics


def _bootstrap_draws(seeds: list[int], n_prompts: int, reps: int) -> list[list[tuple[int, list]]]:
    """Resample seeds, then prompts within each drawn seed (one shared plan per call)."""
    rng = random.Random(12345)
    draws = []
    for _ in range(reps):
        picked = [rng.choice(seeds) for _ in seeds]
        draws.append([(s, [rng.randrange(n_prompts) for _ in range(n_prompts)]) for s in picked])
    return draws


def _per_seed(rows: list[dict], metric: str) -> dict[int, list[float]]:
    return {r["seed"]: r["per_prompt"][metric] for r in rows if metric in r.get("per_prompt", {})}


def paired_difference(
    rows: list[dict], base: list[dict], metric: str, reps: int = 2000
) -> dict[str, Any] | None:
    """Mean of (method - base) over seeds and prompts, with a 95% bootstrap CI (seeds, then
    prompts); only seeds both have."""
    a, b = _per_seed(rows, metric), _per_seed(base, metric)
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    diff = {s: [x - y for x, y in zip(a[s], b[s], strict=True)] for s in seeds}
    n = len(diff[seeds[0]])
    mean = statistics.mean(v for s in seeds for v in diff[s])
    stats = sorted(
        statistics.mean(diff[s][p] for s, ps in draw for p in ps)
        for draw in _bootstrap_draws(seeds, n, reps)
    )
    return {
        "mean": mean,
        "ci95": [stats[int(0.025 * reps)], stats[int(0.975 * reps) - 1]],
        "seeds": seeds,
        "prompts": n,
    }


def gap_closed(
    rows: list[dict], seqkd: list[dict], ceiling: list[dict], reps: int = 2000
) -> dict[str, Any] | None:
    """(SeqKD - method) / (SeqKD - white box) on per-answer reverse KL: a ratio of means over
    seeds and prompts (never a mean of per-seed ratios), with a bootstrap CI."""
    m, s, c = (_per_seed(r, "reverse_kl") for r in (rows, seqkd, ceiling))
    seeds = sorted(set(m) & set(s) & set(c))
    if not seeds:
        return None
    n = len(m[seeds[0]])

    def ratio(draw: list[tuple[int, list]]) -> float:
        sm = [(s[k][p], m[k][p], c[k][p]) for k, ps in draw for p in ps]
        base, meth, ceil = (statistics.mean(x[i] for x in sm) for i in range(3))
        return (base - meth) / (base - ceil) if base != ceil else math.nan

    point = ratio([(k, list(range(n))) for k in seeds])
    stats = sorted(ratio(d) for d in _bootstrap_draws(seeds, n, reps))
    stats = [x for x in stats if not math.isnan(x)]
    ci = [stats[int(0.025 * len(stats))], stats[int(0.975 * len(stats)) - 1]] if stats else None
    return {"mean": point, "ci95": ci, "seeds": seeds}


# ------------------------------------------------------------------ training


@dataclasses.dataclass
class Trained:
    """A system to score: its model folder, wall time from the untouched student, and the
    training's peak resident memory."""

    folder: str
    train_s: float
    peak_mib: float | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def measured(fn: Any, *a: Any, **kw: Any) -> tuple[Any, float, float | None]:
    """(result, wall seconds, peak RSS in MiB during the call). Linux resets the peak with
    /proc/self/clear_refs; elsewhere the peak is not reported."""
    reset = True
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        reset = False
    started = time.perf_counter()
    result = fn(*a, **kw)
    seconds = time.perf_counter() - started
    peak = None
    if reset:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
    return result, seconds, peak


def lora_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha}


def seqkd_config(args: argparse.Namespace, run: Path, seed: int) -> cfg.SFTConfig:
    return cfg.SFTConfig(
        data=str(args.train_file),
        model=args.student,
        output_dir=str(run),
        epochs=args.seqkd_epochs,
        lr=args.seqkd_lr,
        micro_batch_size=args.sft_batch,
        max_response_tokens=args.max_tokens,
        seed=seed,
        # A checkpoint every epoch: the epochs are chosen on validation.
        save_every=args.steps_per_epoch if args.score_every_epoch else 0,
        keep_checkpoints=0,
        save_state=False,
        **lora_settings(args),
    )


def stage_settings(args: argparse.Namespace, run: Path, seed: int) -> dict[str, Any]:
    """What every GAD-family stage of the lab shares, SODA's included: data, the student's
    adapter, sampling at temperature 1 (the policy the exact KL scores is the one trained)."""
    return dict(
        data=str(args.train_file),
        model=args.student,
        output_dir=str(run),
        stage="gad",
        micro_batch_size=8,
        generation_batch_size=64,
        temperature=1.0,
        max_response_tokens=args.max_tokens,
        seed=seed,
        save_every=0,
        save_state=False,
        keep_checkpoints=0,
        **lora_settings(args),
    )


def gad_config(args: argparse.Namespace, run: Path, seed: int, **extra: Any) -> cfg.GADConfig:
    """A GAD-family stage on the untouched student's base with the lab's adapter."""
    settings = stage_settings(args, run, seed) | dict(
        warmup_epochs=args.d_warmup_epochs,
        warmup_d_only_steps=0,
        epochs=float(max(1, math.ceil(args.long_steps * args.batch_prompts / args.n_answers))),
        max_steps=args.gad_steps,
        batch_prompts=args.batch_prompts,
        n_samples=args.n_samples,
        lr=args.gad_lr,
        d_lr=args.d_lr,
        kl_coef=args.kl_coef,
    )
    return cfg.GADConfig(**(settings | extra))


def start_from(seqkd: Path, run: Path, discriminator: Path | None = None) -> None:
    """Lay SeqKD's final folder (merged model + adapter) as `run`'s warmup result, so the GAD
    stage continues SeqKD's adapter: the same parametrisation, not a second adapter on top."""
    warm = run / "warmup" / "final"
    if warm.exists():
        shutil.rmtree(warm)
    warm.mkdir(parents=True)
    for item in seqkd.iterdir():
        (warm / item.name).symlink_to(item.resolve())
    if discriminator is not None:
        (warm / "discriminator").symlink_to(discriminator.resolve())


def stage_stats(stage_dir: Path) -> dict[str, float]:
    """Mean step time and the discriminator's batch accuracy over the second half."""
    rows = [r for r in read_metrics(stage_dir) if "time/step" in r]
    out: dict[str, float] = {}
    if rows:
        out["step_s"] = statistics.mean(r["time/step"] for r in rows)
        late = [r["d/accuracy"] for r in rows[len(rows) // 2 :] if "d/accuracy" in r]
        if late:
            out["d_accuracy"] = statistics.mean(late)
    held = [r["eval/d_accuracy"] for r in read_metrics(stage_dir) if "eval/d_accuracy" in r]
    if held:
        out["d_heldout_accuracy"] = held[-1]
    return out


class Seed:
    """One seed's training: each method on demand, SeqKD and the discriminator warmup once."""

    def __init__(self, args: argparse.Namespace, seed: int) -> None:
        self.args, self.seed = args, seed
        self.run = Path(args.out) / "runs" / f"s{seed}"
        self._seqkd: Trained | None = None
        self._dwarm: tuple[Path, float, float | None] | None = None
        # The main GAD run's config, which `gad_long` resumes.
        self.last_gad: cfg.GADConfig | None = None

    def seqkd(self) -> Trained:
        if self._seqkd is None:
            config = seqkd_config(self.args, self.run / "seqkd", self.seed)
            final = self.run / "seqkd" / "final"
            # A finished seed's weights are pruned (only metrics and configs stay): then
            # SeqKD is trained again (same seed, same numbers), as another method needs it.
            if (final / "config.json").exists() and any(final.rglob("*.safetensors")):
                # Trained by an earlier, interrupted invocation: its time is in its note.
                note = json.loads((self.run / "seqkd" / "lab_time.json").read_text())
                self._seqkd = Trained(str(final), note["train_s"], note["peak_mib"])
            else:
                _, s, peak = measured(sft.train, config)
                note = {"train_s": s, "peak_mib": peak}
                (self.run / "seqkd" / "lab_time.json").write_text(json.dumps(note))
                self._seqkd = Trained(str(final), s, peak)
        return self._seqkd

    def seqkd_epochs(self) -> dict[str, Trained]:
        """Every epoch's checkpoint but the last (that is `seqkd`), for the choice of epochs."""
        base = self.seqkd()
        out = {}
        for e in range(1, self.args.seqkd_epochs):
            step = e * self.args.steps_per_epoch
            folder = self.run / "seqkd" / "checkpoints" / f"step-{step:06d}"
            frac = e / self.args.seqkd_epochs
            out[f"seqkd@e{e}"] = Trained(str(folder), base.train_s * frac, base.peak_mib)
        return out

    def d_warmup(self) -> tuple[Path, float, float | None]:
        """The discriminator, initialised from the untouched student, warmed up alone on
        (teacher answer, SeqKD sample) pairs; shared by every GAD variant of this seed."""
        if self._dwarm is None:
            seqkd = self.seqkd()
            run = self.run / "d_warmup"
            config = gad_config(
                self.args,
                run,
                self.seed,
                model=seqkd.folder,
                discriminator=self.args.student,
                stage="warmup",
                warmup_generator=False,
            )
            # The warmup's generator is a fresh (zero) adapter on SeqKD's merged model: it
            # samples exactly as SeqKD does.
            _, s, peak = measured(gad_stage.train, config)
            self._dwarm = (run / "warmup" / "final" / "discriminator", s, peak)
        return self._dwarm

    def gad(self, name: str, settings: dict[str, Any], long: bool) -> Trained:
        seqkd = self.seqkd()
        d_folder, d_s, d_peak = self.d_warmup()
        run = self.run / name
        start_from(Path(seqkd.folder), run, d_folder)
        extra: dict[str, Any] = dict(discriminator=self.args.student, **settings)
        if long:
            # Held-out curves (exact reverse KL on validation prompts, on their own random
            # stream, so training is unchanged) and a full checkpoint at the main length, from
            # which `gad_long` continues.
            extra |= dict(
                eval_every=self.args.curve_every,
                eval_data=str(self.args.val_file),
                teacher_model=self.args.teacher,
                teacher_context=self.args.teacher_contexts,
                save_state=True,
            )
        config = gad_config(self.args, run, self.seed, **extra)
        final, s, peak = measured(gad_stage.train, config)
        total = seqkd.train_s + d_s + s
        peaks = [p for p in (seqkd.peak_mib, d_peak, peak) if p is not None]
        self.last_gad = config
        return Trained(str(final), total, max(peaks, default=None), stage_stats(run / "gad"))

    def gad_long(self, main: Trained) -> Trained:
        assert self.last_gad is not None, "gad_long continues the main GAD run"
        config = dataclasses.replace(self.last_gad, max_steps=self.args.long_steps, resume=True)
        final, s, peak = measured(gad_stage.train, config)
        stats = stage_stats(Path(config.output_dir) / "gad")
        return Trained(str(final), main.train_s + s, main.peak_mib, stats)

    def whitebox(self) -> Trained:
        seqkd = self.seqkd()
        run = self.run / "whitebox"
        start_from(Path(seqkd.folder), run)
        config = gad_config(
            self.args,
            run,
            self.seed,
            method="whitebox",
            lr=self.args.whitebox_lr,
            teacher_model=self.args.teacher,
            teacher_context=self.args.teacher_contexts,
        )
        final, s, peak = measured(gad_stage.train, config)
        return Trained(str(final), seqkd.train_s + s, peak, stage_stats(run / "gad"))

    def soda(self) -> Trained:
        """SODA from the untouched student (the paper's start): its snapshot is the
        untouched student's answers."""
        run = self.run / "soda"
        # Only what SODA reads: the product refuses GAD-only settings under method=soda.
        config = cfg.GADConfig(
            **stage_settings(self.args, run, self.seed),
            method="soda",
            soda_beta=self.args.soda_beta,
            lr=self.args.soda_lr,
            epochs=float(self.args.soda_epochs),
            batch_prompts=self.args.soda_batch,
        )
        final, s, peak = measured(gad_stage.train, config)
        return Trained(str(final), s, peak, stage_stats(run / "soda"))


# ------------------------------------------------------------------ the run


def teacher_data(args: argparse.Namespace, contexts: list[mixture.Component]) -> dict[str, Any]:
    """The teacher's answers (train, validation, evaluation), sampled once and cached."""
    folder = Path(args.out) / "teacher"
    folder.mkdir(parents=True, exist_ok=True)
    splits = split_prompts(args)
    pair: list[Any] = []

    def teacher() -> tuple[Any, Any]:
        if not pair:
            pair.extend(store.load(args.teacher))
        return pair[0], pair[1]

    def answers(name: str, n: int, seed: int) -> list[Answer]:
        return cached_answers(
            folder / f"{name}.jsonl",
            lambda: sample(teacher(), splits[name], n, seed, args, contexts),
        )

    train = answers("train", args.answers_per_prompt, 1234)
    val = answers("val", 1, 1236)
    evaluation = cached_answers(
        folder / f"{args.split}-eval.jsonl",
        lambda: sample(
            teacher(), splits[args.split], args.teacher_eval_answers, 1235, args, contexts
        ),
    )
    args.train_file = folder / "train.records.jsonl"
    args.val_file = folder / "val.records.jsonl"
    chats.write_records(args.train_file, training_records("train", splits["train"], train))
    chats.write_records(args.val_file, training_records("val", splits["val"], val))
    args.n_answers = len(train)
    args.steps_per_epoch = math.ceil(len(train) / args.sft_batch)
    stats = {
        name: {
            "answers": len(a),
            "finished": statistics.mean(x.finished for x in a),
            "length": statistics.mean(len(x.ids) for x in a),
            "mode_shares": [sum(x.mode == k for x in a) / len(a) for k in range(len(contexts))],
            "finished_by_mode": [
                statistics.mean(x.finished for x in a if x.mode == k)
                if any(x.mode == k for x in a)
                else None
                for k in range(len(contexts))
            ],
        }
        for name, a in (("train", train), ("val", val), ("eval", evaluation))
    }
    return {"splits": splits, "eval_answers": evaluation, "stats": stats, "pair": teacher}


def row_path(args: argparse.Namespace, seed: int, method: str) -> Path:
    return Path(args.out) / "rows" / args.split / f"s{seed}" / f"{method}.json"


def score_system(
    args: argparse.Namespace,
    trained: Trained,
    seed: int,
    method: str,
    contexts: list[mixture.Component],
    teach: dict[str, Any],
) -> dict[str, Any]:
    prompts = teach["splits"][args.split]
    student = load_system(trained.folder, args.student)
    answers = sample(student, prompts, args.eval_samples, 10_000 + seed, args)
    teacher_model = teach["pair"]()[0]
    tok = student[1]
    stats = answer_stats(student[0], teacher_model, tok, contexts, prompts, answers)
    fwd = answer_stats(
        student[0], teacher_model, tok, contexts, prompts, teach["eval_answers"], forward=True
    )
    row = {"seed": seed, "method": method, "train_s": trained.train_s}
    row |= {"peak_mib": trained.peak_mib} | trained.extra
    row |= system_row(stats, fwd, answers, teach["eval_answers"], len(prompts))
    path = row_path(args, seed, method)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row) + "\n")
    shown = {k: v for k, v in row.items() if k != "per_prompt"}
    print(json.dumps(shown), flush=True)
    return row


def variants(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    out = {}
    have = {f.name for f in dataclasses.fields(cfg.GADConfig)}
    for spec in args.gad_variant or []:
        name, _, text = spec.partition("=")
        try:
            settings = json.loads(text)
        except ValueError as err:
            raise Refused(f"lab: --gad-variant {spec}: not NAME=JSON ({err})") from err
        unknown = set(settings) - have
        if not name or not isinstance(settings, dict) or unknown:
            raise Refused(f"lab: --gad-variant {spec}: unknown GAD settings {sorted(unknown)}")
        out[f"gad-{name}"] = settings
    return out


def run_seed(args, seed, contexts, teach, first) -> None:
    s = Seed(args, seed)
    todo = list(args.methods)

    def done(method: str) -> bool:
        return row_path(args, seed, method).exists()

    for method in todo:
        if method == "before" and not done("before"):
            score_system(args, Trained(args.student, 0.0), seed, "before", contexts, teach)
        elif method == "seqkd":
            if not done("seqkd"):
                score_system(args, s.seqkd(), seed, "seqkd", contexts, teach)
            if args.score_every_epoch:
                for name, trained in s.seqkd_epochs().items():
                    if not done(name):
                        score_system(args, trained, seed, name, contexts, teach)
        elif method == "gad":
            long = first and args.long_steps > args.gad_steps
            if not done("gad") or (long and not done("gad_long")):
                main = s.gad("gad", {}, long)
                if not done("gad"):
                    score_system(args, main, seed, "gad", contexts, teach)
                if long:
                    score_system(args, s.gad_long(main), seed, "gad_long", contexts, teach)
            for name, settings in variants(args).items():
                if not done(name):
                    score_system(args, s.gad(name, settings, False), seed, name, contexts, teach)
        elif method in ("soda", "whitebox") and not done(method):
            trained = s.soda() if method == "soda" else s.whitebox()
            score_system(args, trained, seed, method, contexts, teach)
    if not args.keep_models:
        prune(s.run)


def prune(run: Path) -> None:
    """A finished seed's weights and optimizer states go (GBs); metrics and configs stay."""
    for pattern in ("*.safetensors", "*.pt", "*.bin"):
        for path in run.rglob(pattern):
            if not path.is_symlink() and path.is_file():
                path.unlink()


# ------------------------------------------------------------------ output


def collect_rows(outs: list[Path], split: str) -> dict[str, list[dict]]:
    """Every (method, seed) row of the folders; the first folder's row wins (`--out` over
    `--merge`), so a merged run that retrained a method for another row overrides nothing."""
    by_method: dict[str, dict[int, dict]] = {}
    for out in outs:
        for path in sorted((out / "rows" / split).glob("s*/*.json")):
            row = json.loads(path.read_text())
            by_method.setdefault(row["method"], {}).setdefault(row["seed"], row)
    return {m: [rows[s] for s in sorted(rows)] for m, rows in by_method.items()}


def analyse(rows: dict[str, list[dict]]) -> dict[str, Any]:
    paired: dict[str, Any] = {}
    for method, mine in rows.items():
        variant = method.startswith("gad-") or method == "gad_long"
        for base in ("seqkd",) + (("gad",) if variant else ()):
            if method != base and base in rows:
                paired[f"{method} - {base}"] = {
                    m: paired_difference(mine, rows[base], m) for m in PAIRED_METRICS
                }
    gaps = {}
    if "seqkd" in rows and "whitebox" in rows:
        gaps = {m: gap_closed(r, rows["seqkd"], rows["whitebox"]) for m, r in rows.items()}
    return {"paired": paired, "gap_closed": gaps}


SUMMARY = (
    "reverse_kl", "reverse_kl_token_pooled", "forward_kl", "length", "finished",
    "mode_purity", "best_mode_logp", "train_s", "peak_mib",
)  # fmt: skip


def table(rows: dict[str, list[dict]], analysis: dict[str, Any]) -> str:
    lines = ["| system | seeds | " + " | ".join(SUMMARY) + " |", "|---|---:|" + "---:|" * 9]
    for method, mine in rows.items():
        cells = []
        for key in SUMMARY:
            values = [r[key] for r in mine if r.get(key) is not None]
            if not values:
                cells.append("—")
                continue
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.3f} ± {sd:.3f}")
        lines.append(f"| {method} | {len(mine)} | " + " | ".join(cells) + " |")
    lines += ["", "| comparison | Δ reverse KL / answer [95% CI] | Δ per token | Δ length |"]
    lines.append("|---|---:|---:|---:|")
    for name, by_metric in analysis["paired"].items():
        cells = []
        for m in ("reverse_kl", "reverse_kl_token", "length"):
            d = by_metric.get(m)
            cells.append(
                f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" if d else "—"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if analysis["gap_closed"]:
        lines += [
            "",
            "| system | share of the SeqKD → white-box gap closed [95% CI] |",
            "|---|---:|",
        ]
        for m, g in analysis["gap_closed"].items():
            if g and g["ci95"]:
                lines.append(f"| {m} | {g['mean']:.2f} [{g['ci95'][0]:.2f}, {g['ci95'][1]:.2f}] |")
    return "\n".join(lines) + "\n"


def plot(
    rows: dict[str, list[dict]],
    analysis: dict[str, Any],
    out: Path,
    gad_runs: dict[int, Path],
    long_dir: Path | None,
) -> None:
    """Per-answer reverse KL with CIs; each seed's GAD run (its sampled answer length and the
    discriminator's batch accuracy per step); the long run's held-out curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 1 + bool(gad_runs) + bool(long_dir)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 3.9), squeeze=False)
    ax = list(axes[0])
    names = list(rows)
    means = [statistics.mean(r["reverse_kl"] for r in rows[m]) for m in names]
    errs = [[0.0, 0.0] for _ in names]
    for i, m in enumerate(names):
        d = analysis["paired"].get(f"{m} - seqkd", {}).get("reverse_kl")
        if d:
            errs[i] = [d["mean"] - d["ci95"][0], d["ci95"][1] - d["mean"]]
    ax[0].bar(names, means, yerr=list(zip(*errs, strict=True)), capsize=4, color="tab:blue")
    ax[0].set(
        ylabel="exact reverse KL per answer (nats)", title="error bars: paired 95% CI vs SeqKD"
    )
    ax[0].tick_params(axis="x", rotation=45)
    if gad_runs:
        plot_gad_runs(ax[1], gad_runs, rows)
    if long_dir:
        plot_long_run(ax[-1], long_dir)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_gad_runs(ax: Any, gad_runs: dict[int, Path], rows: dict[str, list[dict]]) -> None:
    """Each seed's main GAD run: sampled answer length per step against SeqKD's test length
    (the per-answer sum falls with length), and the discriminator's batch accuracy."""
    twin = ax.twinx()
    for i, (seed, stage) in enumerate(sorted(gad_runs.items())):
        train = [r for r in read_metrics(stage) if "response/length_mean" in r]
        colour = f"C{i}"
        steps = [r["step"] for r in train]
        ax.plot(
            steps, [r["response/length_mean"] for r in train], color=colour, label=f"seed {seed}"
        )
        twin.plot(steps, [r.get("d/accuracy") for r in train], ":", color=colour, alpha=0.6)
    if "seqkd" in rows:
        length = statistics.mean(r["length"] for r in rows["seqkd"])
        ax.axhline(length, color="grey", ls="--", label="SeqKD (test)")
    twin.set(ylabel="D batch accuracy (dotted)", ylim=(0, 1))
    ax.set(xlabel="GAD step", ylabel="sampled answer length (tokens)", title="GAD runs")
    ax.legend(loc="lower left", fontsize=8)


def plot_long_run(ax: Any, long_dir: Path) -> None:
    """Held-out reverse KL per answer every `--curve-every` steps, and the discriminator's
    held-out and batch accuracy: memorising shows as the two parting."""
    metrics = read_metrics(long_dir)
    evals = [r for r in metrics if "eval/reverse_kl" in r]
    per_answer = [r["eval/reverse_kl"] * r["eval/length_mean"] for r in evals]
    ax.plot([r["step"] for r in evals], per_answer, "o-", label="reverse KL per answer")
    twin = ax.twinx()
    held = [(r["step"], r["eval/d_accuracy"]) for r in evals if "eval/d_accuracy" in r]
    if held:
        twin.plot(*zip(*held, strict=True), "s--", color="tab:red", label="D held-out acc.")
    train = [r for r in metrics if "d/accuracy" in r]
    twin.plot(
        [r["step"] for r in train],
        [r["d/accuracy"] for r in train],
        color="tab:red",
        alpha=0.3,
        label="D batch acc.",
    )
    twin.set(ylabel="discriminator accuracy", ylim=(0, 1))
    seed = long_dir.parts[-3][1:]
    ax.set(
        xlabel="GAD step", ylabel="nats per answer (validation)", title=f"long GAD run, seed {seed}"
    )
    ax.legend(loc="upper left")
    twin.legend(loc="upper right")


def code_version() -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(HERE), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"


def gad_runs(outs: list[Path]) -> tuple[dict[int, Path], Path | None]:
    """Each seed's main GAD run, the first folder's winning as rows do, and the long run (the
    one with held-out curves), in whichever folder (`--out` or `--merge`) ran them."""
    main: dict[int, Path] = {}
    long: Path | None = None
    for out in outs:
        for stage in sorted(out.glob("runs/s*/gad/gad")):
            if not (stage / "metrics.jsonl").exists():
                continue  # never got to its first step
            if not any("eval/reverse_kl" in r for r in read_metrics(stage)):
                main.setdefault(int(stage.parts[-3][1:]), stage)
            elif long is None:
                long = stage
    return main, long


def write_results(args: argparse.Namespace, meta: dict[str, Any]) -> dict[str, Any]:
    out = Path(args.out)
    folders = [out, *map(Path, args.merge or [])]
    rows = collect_rows(folders, args.split)
    analysis = analyse(rows)
    results = {"split": args.split, "systems": rows, **analysis, "run": meta}
    (out / "lab-v3.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "table.md").write_text(table(rows, analysis))
    plot(rows, analysis, out / "lab-v3.png", *gad_runs(folders))
    return results


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    add = parser.add_argument
    add("--out", required=True, help="the run's folder; a rerun resumes it")
    add("--split", choices=("test", "val"), default="test", help="what systems are scored on")
    add("--methods", nargs="+", choices=ALL_METHODS, default=list(ALL_METHODS))
    add("--seeds", type=int, nargs="+", default=[0, 1, 2])
    add("--teacher", default="smollm2-135m")
    add("--student", default="smollm2-135m")
    add("--teacher-contexts", default=str(TEACHER_FILE), help="a gad.mixture JSON file")
    add("--prompts", nargs="+", default=["self-instruct", "bundled"], help="sets or files")
    add("--n-test", type=int, default=48)
    add("--n-val", type=int, default=24)
    add("--n-train", type=int, default=135)
    add("--answers-per-prompt", type=int, default=2, help="teacher answers per train prompt")
    add("--eval-samples", type=int, default=4, help="answers per evaluation prompt")
    add("--teacher-eval-answers", type=int, default=2, help="forward KL: per evaluation prompt")
    add("--max-tokens", type=int, default=64, help="every answer's budget")
    add("--max-prompt-tokens", type=int, default=256, help="longer prompts are left out")
    add("--gen-batch", type=int, default=64, help="answers generated together")
    add("--lora-rank", type=int, default=2, help="the student's parametrisation")
    add("--lora-alpha", type=float, default=4.0)
    add("--seqkd-epochs", type=int, default=2)
    add("--seqkd-lr", type=float, default=1e-3)
    add("--score-every-epoch", action="store_true", help="score each SeqKD epoch (tuning)")
    add("--sft-batch", type=int, default=8)
    add("--batch-prompts", type=int, default=4, help="prompts per GAD step")
    add("--n-samples", type=int, default=8, help="GAD group size")
    add("--d-warmup-epochs", type=float, default=0.1)
    add("--gad-steps", type=int, default=20)
    add("--gad-lr", type=float, default=2e-4)
    add("--whitebox-lr", type=float, default=1e-3)
    add("--d-lr", type=float, default=2e-4)
    add("--kl-coef", type=float, default=0.001)
    add("--gad-variant", action="append", help="NAME='{\"setting\": value}' (GADConfig)")
    add("--long-steps", type=int, default=0, help="first seed: continue GAD to this many")
    add("--curve-every", type=int, default=10)
    add("--soda-beta", type=float, default=0.1)
    add("--soda-lr", type=float, default=2e-5)
    add("--soda-epochs", type=int, default=1)
    add("--soda-batch", type=int, default=8)
    add("--keep-models", action="store_true")
    add("--merge", nargs="+", help="other runs' folders whose rows join this table")
    add("--tiny", action="store_true", help="tiny random models and sizes: a smoke test")
    args = parser.parse_args(argv)
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    return args


TINY = {
    "prompts": ["bundled"],
    "n_test": 3,
    "n_val": 2,
    "n_train": 4,
    "eval_samples": 2,
    "teacher_eval_answers": 1,
    "max_tokens": 6,
    "sft_batch": 4,
    "batch_prompts": 2,
    "n_samples": 2,
    "d_warmup_epochs": 0.5,
    "gad_steps": 2,
    "long_steps": 4,
    "curve_every": 2,
    "soda_epochs": 1,
    "soda_batch": 4,
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run (or resume) the lab; returns what `lab-v3.json` holds."""
    args = parse(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        tiny = out / "tiny-model"
        if not (tiny / "config.json").exists():
            store.build_tiny(tiny, seed=1, num_layers=2)
        args.teacher = args.student = str(tiny)
    contexts = check_inputs(args)
    variants(args)
    check_tokenizers(args.teacher, args.student)
    started = time.perf_counter()
    teach = teacher_data(args, contexts)
    meta = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "code": code_version(),
        "machine": precision.machine(),
        "precision": precision.resolve("auto").reason,
        "threads": torch.get_num_threads(),
        "teacher_data": teach["stats"],
        "contexts": [dataclasses.asdict(c) for c in contexts],
    }
    for seed in args.seeds:
        run_seed(args, seed, contexts, teach, seed == args.seeds[0])
        meta["wall_s"] = time.perf_counter() - started
        write_results(args, meta)
    results = write_results(args, meta)
    print((out / "table.md").read_text())
    return results


if __name__ == "__main__":
    main()
