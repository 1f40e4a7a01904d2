"""Reward distillation (issue 7) end to end on a reasoning-gym arithmetic set, on this machine.

Pipeline (every step is a `gad` command's Python entry point, nothing re-implemented):

1. `gad tasks reasoning-gym`: basic_arithmetic prompts (2 terms of 0-100, + or -), a
   train set (seed 0) and a disjoint test set (seed 100000: reasoning-gym seeds item i with
   seed + i). The ground truth goes to separate files that only steps 2 (report) and 6 read.
2. `gad label`: teacher Qwen2.5-Coder-0.5B (local) samples `k` answers per train prompt, the
   untouched student SmolLM2-135M `k` more; majority vote -> pseudo-labels, correct/incorrect
   labels. Reports the pseudo-labels' accuracy against the ground truth.
3. `gad reward-model`: SmolLM2-135M scalar head, Bradley–Terry on within-prompt pairs;
   held-out pairwise accuracy before/after.
   Steps 1-3 are SHARED by all seeds (teacher labelling dominates the CPU budget); the reward
   model is trained once, with seed 0.
4. Per seed, every RL method starts from the same checkpoint:
   `sft`       `gad train --method reward-distill --stage warmup`: SFT on the teacher answers
               labelled correct;
   `rl_rm`     `--stage gad` of the same run: GRPO against the frozen reward model;
   `gad`       GAD from the SFT checkpoint: a short discriminator-only warmup, then GRPO
               against the online discriminator (teacher answers = one correct teacher answer
               per labelled prompt);
   `combined`  the same GAD run with `--reward-mix-alpha`: α·z(D) + (1-α)·z(RM).
5. `before` is the untouched student (seed-independent, evaluated once).
6. Every system answers the test prompts greedily (`gad generate`, temperature 0) and is scored
   with `gad eval --metric accuracy` (number extractor).

Writes `<out>/results.json` and `<out>/results.md` (accuracy per system and seed, mean ± std,
plus the labelling and reward-model numbers and the wall time of every stage). A stage whose
output exists is not run again, so a killed run continues where it stopped.

    python benchmarks/reward_distill.py --seeds 0 1 2 --out runs/bench/reward_distill
    python benchmarks/reward_distill.py --tiny --seeds 0 1 --out /tmp/rd-tiny   # smoke, ~1 min

Sizing of the real run (defaults), for about 25-35 minutes on 2 CPU cores in all: 24 train
prompts x (4 teacher + 4 student samples of <= 48 tokens), a reward model of 2 epochs of 4
prompts per step, then per seed an SFT epoch, 4 GRPO steps of 4 prompts x 4 samples of <= 40
tokens for each RL method (no KL reference pass: kl_coef 0), a one-step discriminator warmup for
the GAD runs, and 24 greedy test answers of <= 40 tokens per system. Shared part ~6 min (plus ~1
min the first time the built-in models are converted), each seed ~8 min.

`--tiny` swaps in tiny random-init models (the teacher is a tiny model fitted to the train set's
answers so that votes exist at all): it checks the plumbing, its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any

from gad.api import label, teacher
from gad.config import load as cfg
from gad.data import chats, evalsets, tasks
from gad.eval import run as eval_run
from gad.methods import stage as gad_stage
from gad.models import precision, store
from gad.train import reward, sft

SYSTEMS = ("before", "sft", "rl_rm", "gad", "combined")
INSTRUCTION = " Answer in one short line that ends with: The answer is <number>."
# Two terms of 0-10 or 0-100, + or - (no parentheses, so no negative operands).
OPTIONS = (
    "{min_terms: 2, max_terms: 2, min_digits: 1, max_digits: 2, operators: ['+', '-'], "
    "allow_parentheses: false}"
)


def sizes(args: argparse.Namespace) -> dict[str, Any]:
    """Run sizes: the real run is sized for <= 35 min on 2 CPU cores (see --help)."""
    if args.tiny:
        return dict(
            train=16,
            test=8,
            k=4,
            teacher_tokens=16,
            tokens=16,
            rl_steps=2,
            batch=4,
            n=4,
            sft_lr=1e-3,
            rl_lr=1e-3,
            rm_lr=1e-3,
            rm_epochs=2,
            precision="no",
        )
    return dict(
        train=args.train,
        test=args.test,
        k=args.k,
        teacher_tokens=args.teacher_tokens,
        tokens=args.tokens,
        rl_steps=args.rl_steps,
        batch=4,
        n=4,
        sft_lr=5e-5,
        rl_lr=1e-5,
        rm_lr=2e-5,
        rm_epochs=2,
        precision="auto",
    )


def timed(times: dict[str, float], name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    started = time.time()
    result = fn(*args, **kwargs)
    times[name] = round(time.time() - started, 1)
    print(f"[reward_distill] {name}: {times[name]:.0f}s", flush=True)
    return result


def tiny_models(out: Path, prompts: Path, truth: Path) -> tuple[str, str]:
    """(teacher, student) for --tiny: the teacher is a tiny model fitted to the train answers."""
    student = out / "tiny-student"
    if not (student / "config.json").exists():
        store.build_tiny(student, seed=1)
    fitted = out / "tiny-teacher" / "final"
    if not (fitted / "config.json").exists():
        answers = label.read_truth(truth)
        rows = [
            chats.Record(
                r.id,
                r.prompt + [{"role": "assistant", "content": f"The answer is {answers[r.id]}."}],
            )
            for r in chats.read_records(prompts).records
        ]
        chats.write_records(out / "tiny-teacher.jsonl", rows)
        base = store.build_tiny(out / "tiny-base", seed=0)
        sft.train(
            cfg.SFTConfig(
                data=str(out / "tiny-teacher.jsonl"),
                model=str(base),
                output_dir=str(out / "tiny-teacher"),
                epochs=40,
                lr=1e-2,
                micro_batch_size=8,
                mixed_precision="no",
                save_every=0,
            )
        )
    return str(fitted), str(student)


def accuracy(model: str, name: str, test: Path, truth: Path, out: Path, s: dict) -> float:
    """Greedy answers of `model` to the test prompts, scored against the ground truth."""
    answers = out / "eval" / f"{name}.jsonl"
    job = evalsets.generation_job(
        cfg.GenerateConfig(
            model=model,
            prompts=str(test),
            output=str(answers),
            temperature=0.0,
            max_response_tokens=s["tokens"],
            generation_batch_size=32,
        )
    )
    teacher.collect(job, progress=False)
    result = eval_run.run_eval(
        cfg.EvalConfig(
            answers=str(answers), metric="accuracy", ground_truth=str(truth), bootstrap_reps=200
        )
    )
    return result["metrics"]["accuracy"]["mean"]


def train_values(s: dict, seed: int, out: Path, **overrides: Any) -> cfg.GADConfig:
    values = dict(
        batch_prompts=s["batch"],
        n_samples=s["n"],
        micro_batch_size=8,
        generation_batch_size=32,
        max_response_tokens=s["tokens"],
        lr=s["rl_lr"],
        d_lr=s["rl_lr"],
        kl_coef=0.0,  # a few steps from the SFT start: skip the reference pass (and its copy)
        max_grad_norm=0.2,
        epochs=100.0,
        max_steps=s["rl_steps"],
        mixed_precision=s["precision"],
        save_every=0,
        save_state=False,
        seed=seed,
        output_dir=str(out),
    )
    values.update(overrides)
    return cfg.build(cfg.GADConfig, values, "benchmark")


def run_seed(
    seed: int, s: dict, out: Path, shared: dict, args: argparse.Namespace
) -> dict[str, Any]:
    """SFT, RL vs the reward model, GAD and the combined reward, from one seed; accuracies."""
    times: dict[str, float] = {}
    acc: dict[str, float] = {}
    rd = out / f"seed{seed}" / "reward-distill"
    base = train_values(
        s,
        seed,
        rd,
        data=str(shared["labels"]),
        model=shared["student"],
        method="reward-distill",
        reward_model=str(shared["rm"]),
    )
    if not (rd / "warmup/final/config.json").exists():
        warm_lr = dataclasses.replace(base, stage="warmup", lr=s["sft_lr"])
        timed(times, "sft", gad_stage.train, warm_lr)
    sft_model = str(rd / "warmup/final")
    if not (rd / "gad/final/config.json").exists():
        timed(times, "rl_rm", gad_stage.train, dataclasses.replace(base, stage="gad"))
    teacher_answers = str(rd / "data/prompts.jsonl")  # one correct teacher answer per prompt
    for name, extra in (("gad", {}), ("combined", {"reward_mix_alpha": args.alpha})):
        run = out / f"seed{seed}" / name
        if not (run / "gad/final/config.json").exists():
            config = train_values(
                s,
                seed,
                run,
                data=teacher_answers,
                model=sft_model,
                warmup_generator=False,  # the SFT start is shared; warm up D only
                warmup_d_only_steps=0,
                warmup_epochs=s["batch"] / shared["prompts"],  # one step
                reward_model=str(shared["rm"]) if extra else None,
                **extra,
            )
            timed(times, name, gad_stage.train, config)
    systems = {
        "sft": sft_model,
        "rl_rm": str(rd / "gad/final"),
        "gad": str(out / f"seed{seed}/gad/gad/final"),
        "combined": str(out / f"seed{seed}/combined/gad/final"),
    }
    for name, model in systems.items():
        acc[name] = timed(
            times,
            f"eval_{name}",
            accuracy,
            model,
            f"seed{seed}-{name}",
            shared["test"],
            shared["test_truth"],
            out,
            s,
        )
    return {"accuracy": acc, "seconds": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/bench/reward_distill")
    parser.add_argument("--tiny", action="store_true", help="tiny models: a plumbing check")
    parser.add_argument("--teacher", default="qwen2.5-coder-0.5b")
    parser.add_argument("--student", default="smollm2-135m")
    parser.add_argument("--train", type=int, default=24, help="train prompts (labelled)")
    parser.add_argument("--test", type=int, default=24, help="test prompts (accuracy)")
    parser.add_argument("--k", type=int, default=4, help="teacher and student samples/prompt")
    parser.add_argument("--teacher-tokens", type=int, default=48, help="label max tokens")
    parser.add_argument("--tokens", type=int, default=40, help="student max tokens (RL, eval)")
    parser.add_argument("--rl-steps", type=int, default=4, help="GRPO steps of each RL method")
    parser.add_argument("--alpha", type=float, default=0.5, help="combined reward: weight of D")
    args = parser.parse_args()
    s = sizes(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    times: dict[str, float] = {}

    common = dict(dataset="basic_arithmetic", options=OPTIONS, instruction=INSTRUCTION)
    train, train_truth = tasks.run(
        cfg.TasksConfig(size=s["train"], seed=0, output=str(out / "tasks/train.jsonl"), **common)
    )
    test, test_truth = tasks.run(
        cfg.TasksConfig(
            size=s["test"], seed=100_000, output=str(out / "tasks/test.jsonl"), **common
        )
    )
    evalsets.refuse_overlap(  # same question text in both sets would inflate the accuracy
        chats.read_records(test).records, str(train), str(test)
    )
    if args.tiny:
        teacher_model, student = tiny_models(out, train, train_truth)
    else:
        teacher_model, student = args.teacher, args.student

    label_config = cfg.LabelConfig(
        prompts=str(train),
        output_dir=str(out / "label"),
        teacher=teacher_model,
        student=student,
        k=s["k"],
        max_response_tokens=s["teacher_tokens"],
        generation_batch_size=48,
        min_vote_share=0.5,
        ground_truth=str(train_truth),
    )
    labels = out / "label" / "labels.jsonl"
    if not (out / "label/summary.json").exists():
        timed(times, "label", label.run, label_config)
    label_summary = json.loads((out / "label/summary.json").read_text())

    rm_dir = out / "reward-model"
    if not (rm_dir / "summary.json").exists():
        rm_config = cfg.RewardConfig(
            data=str(labels),
            model=student,
            output_dir=str(rm_dir),
            held_out=0.2,
            epochs=s["rm_epochs"],
            lr=s["rm_lr"],
            global_batch_size=4,  # prompts per step, each with all its pairs
            micro_batch_size=8,
            max_response_tokens=s["teacher_tokens"],
            mixed_precision=s["precision"],
            save_every=0,
            save_state=False,
        )
        timed(times, "reward_model", reward.train, rm_config)
    rm_summary = json.loads((rm_dir / "summary.json").read_text())

    shared = {
        "labels": labels,
        "rm": rm_dir / "final",
        "student": student,
        "test": test,
        "test_truth": test_truth,
        "prompts": label_summary["labelled_prompts"],
    }
    before = timed(times, "eval_before", accuracy, student, "before", test, test_truth, out, s)
    per_seed = {seed: run_seed(seed, s, out, shared, args) for seed in args.seeds}

    table: dict[str, list[float]] = {"before": [before] * len(args.seeds)}
    for name in SYSTEMS[1:]:
        table[name] = [per_seed[seed]["accuracy"][name] for seed in args.seeds]
    results = {
        "tiny": args.tiny,
        "teacher": teacher_model,
        "student": student,
        "seeds": args.seeds,
        "sizes": s,
        "alpha": args.alpha,
        "accuracy": table,
        "label": {
            k: label_summary[k]
            for k in (
                "prompts",
                "labelled_prompts",
                "set_aside_prompts",
                "set_aside_no_answer",
                "set_aside_tie",
                "set_aside_low_share",
                "mean_vote_share",
                "pseudo_label_accuracy",
                "label_accuracy",
                "teacher_truth_accuracy",
                "student_truth_accuracy",
                "good_teacher",
                "good_student",
                "teacher_responses",
                "student_responses",
            )
        },
        "reward_model": {
            "train_pairs": rm_summary["train_pairs"],
            "held_out_pairs": rm_summary["held_out_pairs"],
            "held_out_before": rm_summary["held_out_before"],
            "held_out_after": rm_summary["held_out_after"],
        },
        "seconds": {"shared": times, **{f"seed{k}": v["seconds"] for k, v in per_seed.items()}},
        "wall_seconds": round(time.time() - started, 1),
        "machine": precision.machine() | {"precision": precision.resolve(s["precision"]).reason},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    print((out / "results.md").read_text())


def markdown(r: dict[str, Any]) -> str:
    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    seeds = r["seeds"]
    lines = [
        f"Teacher `{r['teacher']}`, student `{r['student']}`"
        + (" (TINY smoke run: the numbers mean nothing)" if r["tiny"] else "")
        + f"; sizes {r['sizes']}; combined reward α = {r['alpha']}. Teacher labels and the "
        "reward model are shared by all seeds (reward model trained with seed 0). Accuracy: "
        "greedy answers to the test prompts, number extractor, against the ground truth.",
        "",
        "| system | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std |",
        "|---|" + "---:|" * (len(seeds) + 1),
    ]
    names = {
        "before": "before (untouched student)",
        "sft": "after SFT (teacher answers labelled correct)",
        "rl_rm": "after SFT + RL vs learned reward model",
        "gad": "after SFT + GAD",
        "combined": "after SFT + GAD with combined reward",
    }
    for key, label_text in names.items():
        values = r["accuracy"][key]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        cells = " | ".join(pct(v) for v in values)
        lines.append(
            f"| {label_text} | {cells} | {pct(statistics.fmean(values))} ± {pct(spread)} |"
        )
    lab, rm = r["label"], r["reward_model"]
    lines += [
        "",
        f"Labelling: {lab['labelled_prompts']}/{lab['prompts']} prompts kept (set aside: "
        f"{lab['set_aside_no_answer']} no answer, {lab['set_aside_tie']} tie, "
        f"{lab['set_aside_low_share']} low vote share); mean vote share "
        f"{pct(lab['mean_vote_share'])}; pseudo-label accuracy {pct(lab['pseudo_label_accuracy'])}"
        f"; label accuracy {pct(lab['label_accuracy'])}; teacher samples right "
        f"{pct(lab['teacher_truth_accuracy'])}, student samples right "
        f"{pct(lab['student_truth_accuracy'])}.",
        f"Reward model: {rm['train_pairs']} training pairs; held-out pairwise accuracy "
        f"{pct(rm['held_out_before'].get('eval/pairwise_accuracy'))} before, "
        f"{pct(rm['held_out_after'].get('eval/pairwise_accuracy'))} after "
        f"({rm['held_out_pairs']} pairs).",
        f"Wall time: {r['wall_seconds'] / 60:.1f} min; per stage (s): {r['seconds']}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
