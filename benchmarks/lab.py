"""Lab benchmark: SeqKD vs GAD (and the off-policy discriminator) with a teacher whose
probabilities we can compute.

Both methods train the same student on the same teacher samples (drawn once, at temperature 1,
shared by every seed and method); only the training seed changes between seeds. Every system
then samples answers to held-out prompts at temperature 1 and is scored against the teacher:

- `reverse_kl`: KL(student || teacher) per student token, on the student's own samples.
  Same tokenizer: exact, the full next-token distributions compared at every sampled position.
  Cross-tokenizer: text level, mean of log q(y) - log p(y) over samples, each model scoring the
  text with its own template, divided by the student's tokens (a Monte-Carlo estimate).
- `forward_kl`: KL(teacher || student) per teacher token on held-out teacher samples (exact /
  text level as above).
- `teacher_logp`: the teacher's mean per-token log-likelihood of the student's samples.
- `length`: mean student answer length in tokens; `train_s`: wall time of the training.

Systems: `before` (the initial student), `seqkd`, `gad_warmup` (GAD's warmup stage alone: the
GAD run's state when its wall time is closest to SeqKD's), `gad`, and `offpolicy` (SeqKD, then a
discriminator trained on the frozen student's samples, then RL against it frozen).

    python benchmarks/lab.py same-tokenizer --seeds 0 1 2 --out runs/lab
    python benchmarks/lab.py cross-tokenizer --seeds 0 1 2 --out runs/lab --methods seqkd gad

same-tokenizer: teacher SmolLM2-135M-Instruct (30 layers); student = its embeddings, final norm
and the layers outside `--drop` (default: 20 of 30 layers, 99M parameters instead of 135M).
cross-tokenizer: teacher Qwen2.5-Coder-0.5B-Instruct, student SmolLM2-135M-Instruct.
Prompts: the Self-Instruct seed tasks, a fixed split. Writes `<out>/<setting>/results.json`,
`table.md` and the curves of the seed-0 GAD run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from gad import config as cfg
from gad import data, evalsets, evaluate, gad, models, report, sft, teacher
from gad.tracking import read_metrics

SETTINGS = {
    "same-tokenizer": {"teacher": "smollm2-135m", "student": None},
    "cross-tokenizer": {"teacher": "qwen2.5-coder-0.5b", "student": "smollm2-135m"},
}
METRICS = ("reverse_kl", "forward_kl", "teacher_logp", "length", "train_s")


# ------------------------------------------------------------------ setup


def layer_dropped_student(teacher: str, drop: str, out: Path) -> Path:
    """The teacher without the decoder layers `drop` ("first-last", inclusive); embeddings,
    the other layers, the final norm and the head are kept."""
    if (out / "config.json").exists():
        return out
    model, tokenizer = models.load(teacher)
    layers = model.model.layers
    first, last = (int(x) for x in drop.split("-"))
    kept = [layer for i, layer in enumerate(layers) if not first <= i <= last]
    model.model.layers = torch.nn.ModuleList(kept)
    for index, layer in enumerate(kept):
        layer.self_attn.layer_idx = index
    model.config.num_hidden_layers = len(kept)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[: len(kept)]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def prompt_split(n_train: int, n_eval: int, out: Path) -> tuple[Path, Path]:
    """A fixed train / held-out split of the Self-Instruct seed tasks (prompts only)."""
    records = evalsets.load_set("self-instruct")
    random.Random(0).shuffle(records)
    if len(records) < n_train + n_eval:
        raise SystemExit(f"only {len(records)} prompts; asked for {n_train} + {n_eval}")
    train, held = out / "train_prompts.jsonl", out / "eval_prompts.jsonl"
    data.write_records(train, [data.Record(r.id, r.prompt) for r in records[:n_train]])
    data.write_records(held, [data.Record(r.id, r.prompt) for r in records[n_train:][:n_eval]])
    return train, held


def sample(
    model: str, prompts: Path, output: Path, args: argparse.Namespace, seed: int, n: int
) -> Path:
    """`n` answers per prompt of a local model at temperature 1 (resumable)."""
    job = cfg.CollectConfig(
        prompts=str(prompts),
        output=str(output),
        backend="local",
        model=model,
        n=n,
        temperature=1.0,
        max_tokens=args.max_tokens,
        batch_size=64,
        seed=seed,
    )
    teacher.collect(job, progress=False)
    return output


# ------------------------------------------------------------------ metrics


def exact_token_kl(
    q_model: Any, p_model: Any, tokenizer: Any, records: list[data.Record]
) -> tuple[float, float]:
    """(KL(q || p) per token, mean response tokens) over `records`' responses, exact: both
    models' full next-token distributions at every response position (shared tokenizer)."""
    examples = []
    for r in records:
        prompt_ids = data.encode_prompt(tokenizer, r.prompt)
        response_ids = data.encode_response(tokenizer, r.prompt, r.response or "")
        examples.append(data.Example(r.id, prompt_ids + response_ids, len(prompt_ids), False))
    kl_sum, tokens = 0.0, 0
    with torch.no_grad():
        for idx in sft.length_sorted_chunks(examples, 8):
            part = [examples[i] for i in idx]
            batch = sft.collate(part, tokenizer.pad_token_id)
            logits_q, _, mask_bt = sft.response_logits(q_model, batch)
            logits_p, _, _ = sft.response_logits(p_model, batch)
            for row in range(len(part)):
                keep = mask_bt[row].bool()
                lq = torch.log_softmax(logits_q[row][keep].float(), -1)
                lp = torch.log_softmax(logits_p[row][keep].float(), -1)
                kl_sum += float((lq.exp() * (lq - lp)).sum())
                tokens += int(keep.sum())
    return kl_sum / tokens, tokens / len(records)


def text_kl(
    q: tuple[Any, Any], p: tuple[Any, Any], records: list[data.Record]
) -> tuple[float, float]:
    """(Σ[log q(y) - log p(y)] / Σ q-tokens, mean q-tokens) over `records`' responses, each
    model scoring the text with its own tokenizer and chat template."""
    prompts = [r.prompt for r in records]
    responses = [r.response or "" for r in records]
    est = evaluate.reverse_kl_estimate(q[0], q[1], p[0], p[1], prompts, responses)
    tokens = sum(len(data.encode_response(q[1], r.prompt, r.response or "")) for r in records)
    return est["per_token"], tokens / len(records)


def score_system(
    folder: str,
    answers: Path,
    teacher_eval: list[data.Record],
    teacher_pair: tuple[Any, Any],
    same_tokenizer: bool,
) -> dict[str, float]:
    student_pair = models.load(folder)
    records = [r for r in data.read_records(answers).records if r.response is not None]
    if same_tokenizer:
        reverse, length = exact_token_kl(student_pair[0], teacher_pair[0], teacher_pair[1], records)
        forward, _ = exact_token_kl(teacher_pair[0], student_pair[0], teacher_pair[1], teacher_eval)
    else:
        reverse, length = text_kl(student_pair, teacher_pair, records)
        forward, _ = text_kl(teacher_pair, student_pair, teacher_eval)
    logp = evaluate.teacher_logprob(
        teacher_pair[0], teacher_pair[1], [r.prompt for r in records], [r.response for r in records]
    )
    return {
        "reverse_kl": reverse,
        "forward_kl": forward,
        "teacher_logp": statistics.mean(logp),
        "length": length,
    }


# ------------------------------------------------------------------ training


def train_all(
    method: str, student: str, data_file: Path, run: Path, args: argparse.Namespace, seed: int
) -> dict[str, tuple[str, float]]:
    """Train one method; returns {system: (final folder, training seconds)}."""
    started = time.perf_counter()
    if method == "seqkd":
        final = sft.train(
            cfg.SFTConfig(
                data=str(data_file),
                model=student,
                output_dir=str(run),
                epochs=args.seqkd_epochs,
                lr=args.lr,
                batch_size=args.batch_prompts,
                max_response_tokens=args.max_tokens,
                seed=seed,
                save_every=0,
                save_state=False,
            )
        )
        return {"seqkd": (str(final), time.perf_counter() - started)}
    config = cfg.GADConfig(
        data=str(data_file),
        model=student,
        output_dir=str(run),
        method="offpolicy" if method == "offpolicy" else "gad",
        warmup_epochs=1.0,
        warmup_d_only_steps=1,
        offpolicy_d_epochs=1.0,
        epochs=args.gad_epochs,
        batch_prompts=args.batch_prompts,
        n_samples=args.n_samples,
        micro_batch_size=8,
        rollout_batch_size=64,
        temperature=1.0,
        max_response_tokens=args.max_tokens,
        lr=args.lr,
        d_lr=args.d_lr,
        seed=seed,
        save_every=0,
        save_state=False,
    )
    warm = gad.train(dataclasses.replace(config, stage="warmup"))
    warm_s = time.perf_counter() - started
    final = gad.train(dataclasses.replace(config, stage="gad", lr=args.gad_lr))
    out = {method: (str(final), time.perf_counter() - started)}
    if method == "gad":
        out["gad_warmup"] = (str(warm), warm_s)
    return out


# ------------------------------------------------------------------ main


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    systems: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        systems.setdefault(row["system"], []).append(row)
    out = {}
    for system, runs in systems.items():
        out[system] = {}
        for key in METRICS:
            values = [r[key] for r in runs if key in r]
            if values:
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                out[system][key] = {"mean": statistics.mean(values), "std": std, "n": len(values)}
    return out


def table(summary: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = ["| system | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for system, metrics in summary.items():
        cells = [
            f"{metrics[k]['mean']:.3f} ± {metrics[k]['std']:.3f}" if k in metrics else "—"
            for k in METRICS
        ]
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("setting", choices=sorted(SETTINGS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["seqkd", "gad", "offpolicy"])
    parser.add_argument("--out", default="runs/lab")
    parser.add_argument("--n-train", type=int, default=32)
    parser.add_argument("--n-eval", type=int, default=16)
    parser.add_argument("--eval-samples", type=int, default=2, help="student samples per prompt")
    parser.add_argument("--max-tokens", type=int, default=48)
    # Measured on the teacher's samples (nats/token): teacher 3.08; without layers 10-19, 6.09;
    # every other layer kept, 13.2 (worse than uniform): a block of middle layers is what a
    # 30-layer SmolLM2 survives losing.
    parser.add_argument("--drop", default="10-19", help="same-tokenizer student: layers dropped")
    parser.add_argument("--batch-prompts", type=int, default=4)
    parser.add_argument("--n-samples", type=int, default=4)
    parser.add_argument("--seqkd-epochs", type=int, default=2)
    parser.add_argument("--gad-epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=5e-5, help="SeqKD and GAD warmup")
    parser.add_argument("--gad-lr", type=float, default=1e-5)
    parser.add_argument("--d-lr", type=float, default=5e-5)
    parser.add_argument("--tiny", action="store_true", help="tiny random models: a smoke test")
    args = parser.parse_args()

    out = Path(args.out) / args.setting
    out.mkdir(parents=True, exist_ok=True)
    setting = SETTINGS[args.setting]
    same_tokenizer = args.setting == "same-tokenizer"
    teacher_name = setting["teacher"]
    if args.tiny:
        teacher_name = str(models.build_tiny(out / "tiny-teacher", seed=1, num_layers=4))
    if same_tokenizer:
        student = str(layer_dropped_student(teacher_name, args.drop, out / "student-init"))
    else:
        student = (
            str(models.build_tiny(out / "tiny-student", seed=2)) if args.tiny else "smollm2-135m"
        )
        models.resolve(student)

    train_prompts, eval_prompts = prompt_split(args.n_train, args.n_eval, out)
    started = time.perf_counter()
    teacher_train = sample(teacher_name, train_prompts, out / "teacher_train.jsonl", args, 1234, 1)
    teacher_eval_file = sample(
        teacher_name, eval_prompts, out / "teacher_eval.jsonl", args, 1235, args.eval_samples
    )
    teacher_s = time.perf_counter() - started
    teacher_pair = models.load(teacher_name)
    teacher_eval = [r for r in data.read_records(teacher_eval_file).records if r.response]

    rows: list[dict[str, Any]] = []
    results_path = out / "results.json"
    for seed in args.seeds:
        systems = {"before": (student, 0.0)}
        for method in args.methods:
            systems |= train_all(
                method, student, teacher_train, out / f"{method}-s{seed}", args, seed
            )
        for system, (folder, seconds) in systems.items():
            answers_file = out / f"answers-{system}-s{seed}.jsonl"
            answers = sample(folder, eval_prompts, answers_file, args, seed, args.eval_samples)
            scores = score_system(folder, answers, teacher_eval, teacher_pair, same_tokenizer)
            rows.append({"system": system, "seed": seed, "train_s": seconds, **scores})
            print(json.dumps(rows[-1]), flush=True)
        summary = summarise(rows)
        results_path.write_text(
            json.dumps(
                {"args": vars(args), "teacher_s": teacher_s, "rows": rows, "summary": summary},
                indent=2,
            )
            + "\n"
        )
    summary = summarise(rows)
    (out / "table.md").write_text(table(summary) + "\n")
    first = args.seeds[0]
    if "gad" in args.methods:
        for stage in ("warmup", "gad"):
            folder = out / f"gad-s{first}" / stage
            report.plot_curves(f"lab-{args.setting}-gad-{stage}", read_metrics(folder), out)
    print(table(summary))


if __name__ == "__main__":
    main()
