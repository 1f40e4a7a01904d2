"""Loss functions of the policy: GRPO advantages, the clipped policy loss, the KL terms, and
SODA's DPO loss (the discriminator's and the reward model's are `score_losses`).

Pure functions of tensors; no model code. Suffixes name the shape of a tensor:
``_p`` = [prompts], ``_pn`` = [prompts, N samples per prompt], ``_b`` = [batch of sequences],
``_bt`` = [batch, time], ``_btv`` = [batch, time, vocab]. Equation numbers refer to
SPEC.md §3 (GAD, arXiv 2511.10643).

Conventions shared with verl (volcengine/verl, ``trainer/ppo/core_algos.py``):

* GRPO advantage: ``(r - mean) / (std + eps)`` with the unbiased ``torch.std``.
* Policy loss aggregation: "seq-mean-token-mean" (mean over each sequence's response tokens,
  then mean over sequences), which is the ``1/N Σ_i 1/|y_i| Σ_t`` of Eq. 7.
* KL: the k3 ("low_var_kl") estimator added to the loss (verl's ``use_kl_loss``), with verl's
  clamps: log-ratio to [-20, 20], k3 value to [-10, 10].
"""

import torch
import torch.nn.functional as F

# verl clamps the log-ratio before exp() so that a stale or garbage log-prob cannot overflow.
_LOG_RATIO_CLAMP = 20.0
# verl's clamp of the k3 value: bounds the KL penalty (and zeroes its gradient) on outlier tokens.
_K3_CLAMP = 10.0


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision inputs to float32; float32/float64 unchanged (every loss computes in at
    least float32)."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x


def masked_mean(
    x: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...] | None = None
) -> torch.Tensor:
    """Mean of ``x`` over the entries where ``mask`` is non-zero.

    Args:
        x: any shape.
        mask: same shape as ``x`` (or broadcastable to it); bool or 0/1 float.
        dim: dimension(s) to reduce; ``None`` reduces everything to a scalar.

    Returns:
        ``x`` reduced over ``dim``. Where no entry is selected the result is exactly 0, never NaN.
        Values of ``x`` under mask == 0 never leak into the result, even if they are inf or NaN.
    """
    mask = mask.to(x.dtype)
    # where() rather than x * mask alone: padding may hold inf/NaN, and 0 * inf = NaN.
    total = torch.where(mask != 0, x * mask, torch.zeros_like(x)).sum(dim=dim)
    count = mask.expand_as(x).sum(dim=dim)
    safe_count = torch.where(count > 0, count, torch.ones_like(count))
    return torch.where(count > 0, total / safe_count, torch.zeros_like(total))


AGGREGATIONS = ("seq-mean-token-mean", "token-mean")


def seq_mean_token_mean(x_bt: torch.Tensor, mask_bt: torch.Tensor) -> torch.Tensor:
    """verl's "seq-mean-token-mean": mean over each row's masked tokens, then mean over rows.

    Every row weighs the same whatever its length (the ``1/N Σ_i 1/|y_i| Σ_t`` of Eq. 7).
    A row with no token contributes 0 and still counts in the row mean, so the normaliser is
    the batch size and does not depend on the content of the batch.

    Args:
        x_bt: [B, T] per-token values.
        mask_bt: [B, T] response mask, bool or 0/1 float.

    Returns:
        scalar tensor.
    """
    return masked_mean(x_bt, mask_bt, dim=-1).mean()


def group_advantages(reward_pn: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO group-normalised advantages (Eq. 6): ``(r - mean_group) / (std_group + eps)``.

    As verl's ``compute_grpo_outcome_advantage``: the std is the unbiased one (``torch.std``,
    divisor N - 1) and ``eps`` is added to it. A group whose rewards are all equal gets advantages
    of exactly 0, and so does every group when N == 1. (verl instead returns the raw reward
    when N == 1; with a discriminator reward that has no baseline, so we give 0.)

    The result is detached: advantages are constants of the policy gradient and must not carry
    gradient back into the discriminator that produced the rewards.

    Args:
        reward_pn: [P, N] rewards, the N samples of a prompt on one row. A flat batch laid out
            prompt-major (the N samples of a prompt contiguous) is ``reward_b.view(P, N)``.
        eps: added to the std, as in verl.

    Returns:
        [P, N] advantages (float32 at least).
    """
    if reward_pn.dim() != 2:
        raise ValueError(f"rewards must be [P, N], got {tuple(reward_pn.shape)}")
    reward_pn = upcast(reward_pn.detach())
    if reward_pn.shape[-1] < 2:
        return torch.zeros_like(reward_pn)
    mean_p1 = reward_pn.mean(dim=-1, keepdim=True)
    std_p1 = reward_pn.std(dim=-1, keepdim=True)
    # Compare values rather than std == 0: the mean of equal floats can be off by one ulp, which
    # would leave tiny non-zero advantages on a group that carries no signal.
    constant_p1 = (reward_pn == reward_pn[:, :1]).all(dim=-1, keepdim=True)
    advantage_pn = (reward_pn - mean_p1) / (std_p1 + eps)
    return torch.where(constant_p1, torch.zeros_like(advantage_pn), advantage_pn)


def mixed_reward(
    d_reward_pn: torch.Tensor, rm_reward_pn: torch.Tensor, alpha: float
) -> torch.Tensor:
    """Combined reward ``α·z(D) + (1-α)·z(R)`` (beyond the sources: GAD's online discriminator
    D mixed with a frozen learned reward model R).

    ``z`` is the per-group z-score of :func:`group_advantages` (a group of equal rewards gives
    0), so the two rewards, whose scales are unrelated, weigh as ``alpha`` says whatever their
    units. The result is then normalised once more by GRPO like any reward.

    Args:
        d_reward_pn: [P, N] discriminator scores, the N samples of a prompt on one row.
        rm_reward_pn: [P, N] reward-model scores of the same samples.
        alpha: weight of D in [0, 1]; 1 is GAD alone, 0 the reward model alone.

    Returns:
        [P, N] mixed rewards (detached, float32 at least).
    """
    if d_reward_pn.shape != rm_reward_pn.shape:
        raise ValueError(
            f"reward shapes differ: {tuple(d_reward_pn.shape)} vs {tuple(rm_reward_pn.shape)}"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    return alpha * group_advantages(d_reward_pn) + (1.0 - alpha) * group_advantages(rm_reward_pn)


def shaped_reward(
    score_b: torch.Tensor,
    length_b: torch.Tensor,
    *,
    length_penalty: float = 0.0,
    score_clip: float | None = None,
) -> torch.Tensor:
    """PRISM's reward shaping (SPEC §5): ``clip(s, -c, c) - λ·log(1 + |y|)``.

    The clip bounds how far one sample can pull its group's advantages; the length term
    removes the discriminator's incentive to reward ever longer answers.

    Args:
        score_b: [B] discriminator scores.
        length_b: [B] response lengths in tokens.
        length_penalty: λ >= 0; 0 leaves the scores as they are.
        score_clip: c > 0, or None for no clip.

    Returns:
        [B] rewards (float32 at least).
    """
    reward_b = upcast(score_b.detach())
    if score_clip is not None:
        reward_b = reward_b.clamp(-score_clip, score_clip)
    if length_penalty:
        reward_b = reward_b - length_penalty * torch.log1p(length_b.to(reward_b.dtype))
    return reward_b


def whitebox_advantages(teacher_logp_bt: torch.Tensor, logp_bt: torch.Tensor) -> torch.Tensor:
    """Per-token advantages of on-policy distillation with the teacher's log-probs (the
    white-box ceiling; GKD, Tinker): ``log p_teacher(y_t) - log π(y_t)`` on the student's own
    samples, so a policy-gradient step descends the per-token reverse KL(π || p_teacher).

    Args:
        teacher_logp_bt: [B, T] teacher log-probs of the sampled tokens.
        logp_bt: [B, T] the policy's log-probs of the same tokens (treated as a constant).

    Returns:
        [B, T] detached advantages (float32 at least).
    """
    return upcast(teacher_logp_bt.detach()) - upcast(logp_bt.detach())


def token_kl_from_logits(
    logits_btv: torch.Tensor, ref_logits_btv: torch.Tensor, mask_bt: torch.Tensor
) -> torch.Tensor:
    """Exact KL(p || q) per token over the full vocabulary, p = softmax(logits), q =
    softmax(ref_logits), summed over masked positions: ``Σ_t Σ_v p_tv (log p_tv - log q_tv)``.

    Args:
        logits_btv: [B, T, V] logits of p (the student).
        ref_logits_btv: [B, T, V] logits of q (the teacher), same vocabulary.
        mask_bt: [B, T] positions to count.

    Returns:
        scalar: the sum of per-token KLs over masked positions (divide by the token count).
    """
    logp_btv = F.log_softmax(upcast(logits_btv), dim=-1)
    logq_btv = F.log_softmax(upcast(ref_logits_btv), dim=-1)
    kl_bt = (logp_btv.exp() * (logp_btv - logq_btv)).sum(-1)
    return torch.where(mask_bt != 0, kl_bt, torch.zeros_like(kl_bt)).sum()


def k3_kl(logp_bt: torch.Tensor, ref_logp_bt: torch.Tensor) -> torch.Tensor:
    """Per-token low-variance KL estimator k3 of KL(π_θ || π_ref) (Schulman, "Approximating KL").

    ``k3 = exp(ref - logp) - (ref - logp) - 1 >= 0``, zero where ``logp == ref``. As verl's
    ``kl_penalty(..., "low_var_kl")``, ``ref - logp`` is clamped to [-20, 20] and the value to
    [-10, 10] (in effect [0, 10]); the clamps zero the gradient on tokens beyond them.

    Args:
        logp_bt: [B, T] log-probs of the sampled tokens under the current policy.
        ref_logp_bt: [B, T] the same under the reference policy.

    Returns:
        [B, T] per-token k3 (no masking; pad tokens hold whatever their inputs give).
    """
    log_ratio_bt = (ref_logp_bt - logp_bt).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    k3_bt = torch.exp(log_ratio_bt) - log_ratio_bt - 1.0
    return k3_bt.clamp(-_K3_CLAMP, _K3_CLAMP)


def policy_loss(
    logp_bt: torch.Tensor,
    old_logp_bt: torch.Tensor,
    advantage_b: torch.Tensor,
    mask_bt: torch.Tensor,
    clip_eps: float = 0.2,
    kl_coef: float = 0.001,
    ref_logp_bt: torch.Tensor | None = None,
    agg: str = "seq-mean-token-mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO clipped surrogate with k3 KL penalty (Eq. 7), as a loss to minimise.

    Per token: ``-min(ρ·A, clip(ρ, 1-ε, 1+ε)·A) + β·k3`` with ``ρ = exp(logp - old_logp)``,
    aggregated by ``agg``: "seq-mean-token-mean" (the paper's Eq. 7, see
    :func:`seq_mean_token_mean`: a long response does not outweigh a short one) or
    "token-mean" (verl's default, which the reference scripts run: every token weighs the
    same, :func:`masked_mean` over the batch). The KL is part of the loss (verl's
    ``use_kl_loss``), not folded into the reward; it is skipped when ``ref_logp_bt`` is None
    or ``kl_coef == 0``.
    ``logp - old_logp`` is clamped to [-20, 20] before exp(), as in verl.

    Args:
        logp_bt: [B, T] log-probs of the sampled tokens under the policy being trained.
        old_logp_bt: [B, T] the same under the sampling policy; treated as a constant.
        advantage_b: [B] one advantage per sequence ([B, T] per-token advantages also work).
        mask_bt: [B, T] response mask, bool or 0/1 float.
        clip_eps: ε of the ratio clip.
        kl_coef: β of the KL term.
        ref_logp_bt: [B, T] log-probs under the frozen reference policy; treated as a constant.

    Returns:
        ``(loss, stats)``: the scalar loss, and detached scalar tensors
        ``pg_loss`` (the clipped-surrogate part), ``kl`` (mean k3, same aggregation as the
        loss; 0 when ``ref_logp_bt`` is None, still reported when ``kl_coef == 0``),
        ``clip_frac`` (share of response tokens whose clipped term is the one taken, i.e. where
        the clip is active, over all response tokens of the batch) and ``ratio_mean`` (mean ρ
        over all response tokens of the batch).
    """
    advantage_bt = upcast(advantage_b.detach())
    if advantage_bt.dim() == 1:
        advantage_bt = advantage_bt.unsqueeze(-1)
    log_ratio_bt = (logp_bt - old_logp_bt.detach()).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    ratio_bt = torch.exp(log_ratio_bt)

    unclipped_bt = -advantage_bt * ratio_bt
    clipped_bt = -advantage_bt * ratio_bt.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    # Pessimistic bound: as a loss, the max of the two negated surrogates.
    pg_bt = torch.maximum(unclipped_bt, clipped_bt)
    if agg not in AGGREGATIONS:
        raise ValueError(f"agg must be one of {AGGREGATIONS}, got {agg!r}")
    aggregate = seq_mean_token_mean if agg == "seq-mean-token-mean" else masked_mean
    pg_loss = aggregate(pg_bt, mask_bt)

    if ref_logp_bt is not None:
        kl = aggregate(k3_kl(logp_bt, ref_logp_bt.detach()), mask_bt)
    else:
        kl = pg_loss.new_zeros(())
    loss = pg_loss + kl_coef * kl if (ref_logp_bt is not None and kl_coef != 0) else pg_loss

    # Strict ">": where the clip binds, the clipped branch is taken and its gradient is zero.
    clip_active_bt = (clipped_bt > unclipped_bt).to(ratio_bt.dtype)
    stats = {
        "pg_loss": pg_loss.detach(),
        "kl": kl.detach(),
        "clip_frac": masked_mean(clip_active_bt.detach(), mask_bt),
        "ratio_mean": masked_mean(ratio_bt.detach(), mask_bt),
    }
    return loss, stats


def dpo_loss(
    policy_chosen_b: torch.Tensor,
    policy_rejected_b: torch.Tensor,
    ref_chosen_b: torch.Tensor,
    ref_rejected_b: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO loss, SODA's objective (SPEC §5): the teacher's answer y_w is chosen, the student's
    snapshot answer y_l rejected. Implicit rewards ``r = β·(log πθ(y) - log π_ref(y))``; the
    loss is ``mean_b -log σ(r_w - r_l)``.

    Args:
        policy_chosen_b, policy_rejected_b: [B] sequence log-probs (sums over response tokens)
            of the chosen / rejected answers under the policy being trained.
        ref_chosen_b, ref_rejected_b: [B] the same under the frozen reference; constants.
        beta: β > 0, the inverse strength of the implicit KL to the reference.

    Returns:
        ``(loss, stats)``: the scalar loss and detached scalars ``margin`` (mean ``r_w - r_l``),
        ``accuracy`` (share of pairs with ``r_w - r_l > 0``), ``chosen_reward`` (mean ``r_w``)
        and ``rejected_reward`` (mean ``r_l``).
    """
    shapes = {tuple(t.shape) for t in (policy_chosen_b, policy_rejected_b, ref_chosen_b)}
    if len(shapes | {tuple(ref_rejected_b.shape)}) != 1 or policy_chosen_b.dim() != 1:
        raise ValueError("dpo_loss: the four log-prob tensors must all be [B]")
    chosen_b = beta * (upcast(policy_chosen_b) - upcast(ref_chosen_b.detach()))
    rejected_b = beta * (upcast(policy_rejected_b) - upcast(ref_rejected_b.detach()))
    margin_b = chosen_b - rejected_b
    stats = {
        "margin": margin_b.detach().mean(),
        "accuracy": (margin_b.detach() > 0).float().mean(),
        "chosen_reward": chosen_b.detach().mean(),
        "rejected_reward": rejected_b.detach().mean(),
    }
    return -F.logsigmoid(margin_b).mean(), stats


def _gather_logprobs_rows(
    logits_tv: torch.Tensor, token_ids_t: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    logits_tv = upcast(logits_tv) / temperature
    picked_t = logits_tv.gather(-1, token_ids_t.unsqueeze(-1)).squeeze(-1)
    return picked_t - torch.logsumexp(logits_tv, dim=-1)


def gather_logprobs(
    logits_btv: torch.Tensor, token_ids_bt: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``log_softmax(logits / temperature)[..., token_ids]`` without a full-size copy.

    Computed as ``logits.gather(ids) - logsumexp(logits)``, one leading row at a time, so the
    full-vocab temporaries are [T, V], not [B, T, V] (as TRL's ``selective_log_softmax``).
    Half-precision logits are upcast to float32 row by row: PPO ratios of bf16 log-probs are
    too noisy.

    Args:
        logits_btv: [B, T, V] (or [T, V]); position t scores token t, so shift before calling
            if the logits are next-token predictions.
        token_ids_bt: [B, T] (or [T]) int64 ids.
        temperature: the sampling temperature the log-probs are taken at (applied per row,
            after the upcast, so no [B, T, V] float32 copy is made).

    Returns:
        [B, T] log-probs, float32 at least; differentiable wrt the logits.
    """
    if logits_btv.dim() < 3:
        return _gather_logprobs_rows(logits_btv, token_ids_bt, temperature)
    return torch.stack(
        [
            _gather_logprobs_rows(lg, ids, temperature)
            for lg, ids in zip(logits_btv, token_ids_bt, strict=True)
        ]
    )


def _entropy_rows(logits_tv: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    logits_tv = upcast(logits_tv) / temperature
    # H = logsumexp(z) - Σ softmax(z)·z: no log of a probability that may underflow to 0.
    expected_logit_t = (torch.softmax(logits_tv, dim=-1) * logits_tv).sum(dim=-1)
    return torch.logsumexp(logits_tv, dim=-1) - expected_logit_t


def token_entropy_from_logits(logits_btv: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-token entropy of ``softmax(logits / temperature)`` in nats, one row at a time.

    Args:
        logits_btv: [B, T, V] (or [T, V]).
        temperature: as in :func:`gather_logprobs`.

    Returns:
        [B, T] entropies, float32 at least. Mask and aggregate with :func:`masked_mean`.
    """
    if logits_btv.dim() < 3:
        return _entropy_rows(logits_btv, temperature)
    return torch.stack([_entropy_rows(lg, temperature) for lg in logits_btv])
