"""The toy experiment of the paper's Figure 5: mode covering (SeqKD) vs mode seeking (GAD).

The teacher is a mixture of discretised Gaussians over the categories 0..K-1; the student is a
single discretised Gaussian (a learnable mean and log-std, probabilities = softmax over the
categories of the Gaussian log-density) that only ever sees teacher *samples*:

* SeqKD: maximum likelihood on teacher samples. Its optimum is the forward-KL projection
  KL(teacher || student), which a single Gaussian meets by covering every mode (wide).
* GAD: REINFORCE with GRPO group-normalised advantages (`losses.group_advantages`) against a
  co-trained discriminator, a learnable score per category trained with the Bradley–Terry loss
  (`score_losses.bt_discriminator_loss`, teacher sample vs the N student samples of a "prompt"). The
  reward approximates log(teacher / student), so the student follows reverse KL and seeks one
  mode, provided the discriminator keeps up with it (see `ToyConfig.d_lr`, `d_steps`).

Two exact references from the same init are computed beside them: gradient descent on the
exact reverse KL(student || teacher) (mode seeking) and on the exact forward KL(teacher ||
student) (mode covering). Suffixes name tensor shapes: ``_k`` = [categories], ``_pn`` =
[groups ("prompts"), N samples per group], ``_p`` = [groups].
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from gad.config.load import ConfigError, ToyConfig
from gad.train.losses import group_advantages
from gad.train.score_losses import bt_discriminator_loss


def _floats(text: str) -> list[float]:
    """Parse a comma-separated list of numbers (the CLI passes lists as strings)."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise ConfigError(f"expected comma-separated numbers, got {text!r}") from err


def validate(config: ToyConfig) -> None:
    """Reject settings the toy cannot run with; the message names the field."""
    modes, weights = _floats(config.teacher_modes), _floats(config.teacher_weights)
    if not modes or len(modes) != len(weights):
        raise ConfigError("teacher_modes and teacher_weights need the same, non-zero, length")
    if min(weights) < 0 or sum(weights) <= 0:
        raise ConfigError("teacher_weights must be non-negative with a positive sum")
    if config.num_categories < 2:
        raise ConfigError("num_categories must be at least 2")
    if config.teacher_std <= 0 or config.student_std <= 0:
        raise ConfigError("teacher_std and student_std must be positive")
    if config.n_samples < 2:
        # With N = 1 every group advantage is 0 and GAD never moves.
        raise ConfigError("n_samples must be at least 2")
    if config.groups < 1 or config.num_seeds < 1 or config.steps < 0 or config.d_steps < 0:
        raise ConfigError("groups and num_seeds must be >= 1, steps and d_steps >= 0")


# Bounds on the student's log-std (std in [0.05, 148]). Below, a student on one category has
# log-probs of -1e3 and less elsewhere, whose policy gradients overflow Adam into NaN; above,
# it is uniform to many digits. A student pushed past a bound stays there (zero gradient):
# that is the "collapse to one category" reported for a slow discriminator.
_LOG_STD_MIN, _LOG_STD_MAX = -3.0, 5.0


def gaussian_logprobs(
    mean: torch.Tensor, log_std: torch.Tensor, num_categories: int
) -> torch.Tensor:
    """Discretised Gaussian: log-softmax over the categories of the Gaussian log-density. -> [K]."""
    cat_k = torch.arange(num_categories, dtype=torch.float64)
    std = log_std.clamp(_LOG_STD_MIN, _LOG_STD_MAX).exp()
    logit_k = -0.5 * ((cat_k - mean) / std) ** 2
    return torch.log_softmax(logit_k, dim=-1)


def gaussian_probs(mean: torch.Tensor, log_std: torch.Tensor, num_categories: int) -> torch.Tensor:
    """Probabilities of the discretised Gaussian (see `gaussian_logprobs`). -> [K]."""
    return gaussian_logprobs(mean, log_std, num_categories).exp()


def teacher_probs(config: ToyConfig) -> torch.Tensor:
    """The teacher: a mixture of discretised Gaussians, each normalised over the grid. -> [K]."""
    validate(config)
    modes = _floats(config.teacher_modes)
    weights = _floats(config.teacher_weights)
    log_std = torch.tensor(math.log(config.teacher_std), dtype=torch.float64)
    mix_k = sum(
        w * gaussian_probs(torch.tensor(m, dtype=torch.float64), log_std, config.num_categories)
        for m, w in zip(modes, weights, strict=True)
    )
    return mix_k / mix_k.sum()


def entropy(probs_k: torch.Tensor) -> float:
    """Shannon entropy in nats (log 10 = 2.30 is uniform over 10 categories)."""
    p_k = probs_k.clamp_min(1e-30)
    return float(-(probs_k * p_k.log()).sum())


def dist_std(probs_k: torch.Tensor) -> float:
    """Std of the category index under a distribution (the discrete, measured width)."""
    cat_k = torch.arange(len(probs_k), dtype=torch.float64)
    mean = (probs_k * cat_k).sum()
    return float(((probs_k * (cat_k - mean) ** 2).sum()).sqrt())


def mode_masses(probs_k: torch.Tensor, modes: list[float]) -> list[float]:
    """Mass of `probs_k` within ±1 category of each teacher mode centre."""
    cat_k = torch.arange(len(probs_k), dtype=torch.float64)
    return [float(probs_k[(cat_k - m).abs() <= 1.0].sum()) for m in modes]


def mass_in_mode(probs_k: torch.Tensor, modes: list[float]) -> float:
    """Mass in the best teacher mode: max over modes of the mass within ±1 of its centre.

    With the default modes 2 and 7 the windows {1,2,3} and {6,7,8} are disjoint, so this is the
    share of the student on the one mode it holds most of: a mode-seeking student scores near 1,
    a uniform one 0.3 and the teacher itself 0.5.
    """
    return max(mode_masses(probs_k, modes))


def _student_params(config: ToyConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh learnable (mean, log_std) at the configured init."""
    mean = torch.tensor(config.student_mean, dtype=torch.float64, requires_grad=True)
    log_std = torch.tensor(math.log(config.student_std), dtype=torch.float64, requires_grad=True)
    return mean, log_std


def train_seqkd(config: ToyConfig, seed: int) -> torch.Tensor:
    """SeqKD: maximum likelihood of the student on fresh teacher samples each step. -> [K]."""
    gen = torch.Generator().manual_seed(seed)
    t_k = teacher_probs(config)
    mean, log_std = _student_params(config)
    opt = torch.optim.Adam([mean, log_std], lr=config.lr)
    for _ in range(config.steps):
        teacher_p = torch.multinomial(t_k, config.groups, replacement=True, generator=gen)
        logp_k = gaussian_logprobs(mean, log_std, config.num_categories)
        loss = -logp_k[teacher_p].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return gaussian_probs(mean, log_std, config.num_categories)


def train_gad(config: ToyConfig, seed: int) -> torch.Tensor:
    """GAD: REINFORCE with group advantages against a co-trained per-category discriminator.

    Each step, per group: one teacher sample and N student samples. The reward of a student
    sample is the discriminator's score *before* this step's D update (as in the full GAD loop),
    advantages are normalised within each group, then D takes `d_steps` Bradley–Terry updates
    and the student one policy-gradient update. Returns the final student probabilities [K].
    """
    gen = torch.Generator().manual_seed(seed)
    t_k = teacher_probs(config)
    mean, log_std = _student_params(config)
    score_k = torch.zeros(config.num_categories, dtype=torch.float64, requires_grad=True)
    opt_s = torch.optim.Adam([mean, log_std], lr=config.lr)
    opt_d = torch.optim.Adam([score_k], lr=config.d_lr)
    p, n = config.groups, config.n_samples
    for _ in range(config.steps):
        teacher_p = torch.multinomial(t_k, p, replacement=True, generator=gen)
        with torch.no_grad():
            s_k = gaussian_probs(mean, log_std, config.num_categories)
        student_pn = torch.multinomial(s_k, p * n, replacement=True, generator=gen).view(p, n)
        reward_pn = score_k.detach()[student_pn]
        adv_pn = group_advantages(reward_pn)
        for _ in range(config.d_steps):
            d_loss = bt_discriminator_loss(score_k[teacher_p], score_k[student_pn])
            opt_d.zero_grad()
            d_loss.backward()
            opt_d.step()
        logp_k = gaussian_logprobs(mean, log_std, config.num_categories)
        pg_loss = -(adv_pn * logp_k[student_pn]).mean()
        opt_s.zero_grad()
        pg_loss.backward()
        opt_s.step()
    with torch.no_grad():
        return gaussian_probs(mean, log_std, config.num_categories)


def exact_kl_descent(config: ToyConfig, reverse: bool) -> torch.Tensor:
    """Reference: Adam on the exact KL from the same init, no sampling. -> [K].

    reverse=True minimises KL(student || teacher) (mode seeking), reverse=False minimises
    KL(teacher || student) (mode covering, SeqKD's infinite-data limit).
    """
    t_k = teacher_probs(config)
    mean, log_std = _student_params(config)
    opt = torch.optim.Adam([mean, log_std], lr=config.lr)
    for _ in range(config.steps):
        logs_k = gaussian_logprobs(mean, log_std, config.num_categories)
        s_k = logs_k.exp()
        if reverse:
            loss = (s_k * (logs_k - t_k.log())).sum()
        else:
            loss = (t_k * (t_k.log() - logs_k)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return gaussian_probs(mean, log_std, config.num_categories)


def teacher_mode_stds(config: ToyConfig) -> list[float]:
    """Measured (discrete) std of each teacher mode on its own: the width a mode-seeker has."""
    log_std = torch.tensor(math.log(config.teacher_std), dtype=torch.float64)
    return [
        dist_std(
            gaussian_probs(torch.tensor(m, dtype=torch.float64), log_std, config.num_categories)
        )
        for m in _floats(config.teacher_modes)
    ]


def summarize(probs_k: torch.Tensor, modes: list[float]) -> dict[str, Any]:
    """Entropy, measured std, mass in the best teacher mode and which mode that is."""
    masses = mode_masses(probs_k, modes)
    best = max(range(len(modes)), key=lambda i: masses[i])
    return {
        "entropy": entropy(probs_k),
        "std": dist_std(probs_k),
        "mass_in_mode": masses[best],
        "mode": modes[best],
    }


def plot(teacher_k: torch.Tensor, curves: dict[str, torch.Tensor], path: Path, title: str) -> Path:
    """The Figure 5 picture: teacher as bars, each method as a line with markers."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; also keeps tests headless
    import matplotlib.pyplot as plt

    cat_k = list(range(len(teacher_k)))
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.bar(cat_k, teacher_k.tolist(), color="0.75", label="teacher")
    styles = {
        "SeqKD": dict(color="tab:blue", marker="o", lw=2),
        "GAD": dict(color="tab:red", marker="s", lw=2),
        "reverse-KL ref": dict(color="tab:red", ls=":", lw=1),
        "forward-KL ref": dict(color="tab:blue", ls=":", lw=1),
    }
    for name, probs_k in curves.items():
        ax.plot(cat_k, probs_k.tolist(), label=name, **styles.get(name, {}))
    ax.set_xticks(cat_k)
    ax.set_xlabel("category")
    ax.set_ylabel("probability")
    ax.set_title(title)
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(config: ToyConfig, verbose: bool = True) -> dict[str, Any]:
    """Run the toy for every seed, print the tables, write toy.png and toy.json.

    Returns a dict with the probabilities (``teacher``, ``reverse_kl``, ``forward_kl`` as [K]
    lists; ``seqkd``, ``gad`` as one [K] list per seed), ``stats`` (method -> one `summarize`
    dict per seed; the references have one entry), ``teacher_mode_stds``, ``seeds``, ``config``
    and the paths ``png`` and ``json``.
    """
    import json

    validate(config)
    torch.set_num_threads(1)  # a 10-category toy: threads only add overhead
    modes = _floats(config.teacher_modes)
    seeds = list(range(config.seed, config.seed + config.num_seeds))
    teacher_k = teacher_probs(config)
    rev_k = exact_kl_descent(config, reverse=True)
    fwd_k = exact_kl_descent(config, reverse=False)
    seqkd = [train_seqkd(config, s) for s in seeds]
    gad = [train_gad(config, s) for s in seeds]
    stats = {
        "teacher": [summarize(teacher_k, modes)],
        "SeqKD": [summarize(p_k, modes) for p_k in seqkd],
        "GAD": [summarize(p_k, modes) for p_k in gad],
        "reverse-KL ref": [summarize(rev_k, modes)],
        "forward-KL ref": [summarize(fwd_k, modes)],
    }
    out = Path(config.output_dir)
    curves = {"SeqKD": seqkd[0], "GAD": gad[0], "reverse-KL ref": rev_k, "forward-KL ref": fwd_k}
    png = plot(
        teacher_k, curves, out / "toy.png", f"Teacher vs one-Gaussian students (seed {seeds[0]})"
    )
    result: dict[str, Any] = {
        "config": asdict(config),
        "seeds": seeds,
        "teacher": teacher_k.tolist(),
        "reverse_kl": rev_k.tolist(),
        "forward_kl": fwd_k.tolist(),
        "seqkd": [p_k.tolist() for p_k in seqkd],
        "gad": [p_k.tolist() for p_k in gad],
        "stats": stats,
        "teacher_mode_stds": teacher_mode_stds(config),
        "png": str(png),
    }
    json_path = out / "toy.json"
    json_path.write_text(json.dumps(result, indent=2))
    result["json"] = str(json_path)
    if verbose:
        _print_tables(result, curves, teacher_k)
    return result


def _print_tables(
    result: dict[str, Any], curves: dict[str, torch.Tensor], teacher_k: torch.Tensor
) -> None:
    """Rich tables: the first seed's distributions, then the per-seed summary numbers."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    dist = Table(title=f"Final distributions (seed {result['seeds'][0]})")
    dist.add_column("category", justify="right")
    for name in ["teacher", *curves]:
        dist.add_column(name, justify="right")
    for k in range(len(teacher_k)):
        row = [f"{float(teacher_k[k]):.3f}"] + [f"{float(p_k[k]):.3f}" for p_k in curves.values()]
        dist.add_row(str(k), *row)
    console.print(dist)

    summary = Table(title="Entropy (nats), std and mass within ±1 of the best teacher mode")
    for col in ["method", "seed", "entropy", "std", "mass in mode", "mode"]:
        summary.add_column(col, justify="left" if col == "method" else "right")
    for name, rows in result["stats"].items():
        # The teacher and the exact references involve no sampling: one row, no seed.
        seeds = result["seeds"] if name in ("SeqKD", "GAD") else ["-"]
        for seed, row in zip(seeds, rows, strict=True):
            summary.add_row(
                name,
                str(seed),
                f"{row['entropy']:.2f}",
                f"{row['std']:.2f}",
                f"{row['mass_in_mode']:.2f}",
                f"{row['mode']:g}",
            )
    console.print(summary)
    mode_stds = ", ".join(f"{s:.2f}" for s in result["teacher_mode_stds"])
    console.print(f"teacher mode stds: {mode_stds}; figure: {result['png']}")
