"""Tests for gad.losses against numbers worked out by hand in the comments.

Reference values used below (σ = sigmoid, softplus(x) = log(1 + e^x) = -log σ(-x)):
  -log σ(1)  = log(1 + e^-1) = 0.313262
  -log σ(0)  = log 2         = 0.693147
  -log σ(-1) = 1 + 0.313262  = 1.313262
  -log σ(-2) = log(1 + e^2)  = 2.126928
  σ(1) = 0.731059, σ(-1) = 0.268941, σ(0) = 0.5
  e^-1 = 0.367879, e = 2.718282
"""

import math

import pytest
import torch

from gad.train.losses import (
    gather_logprobs,
    group_advantages,
    k3_kl,
    masked_mean,
    policy_loss,
    seq_mean_token_mean,
    token_entropy_from_logits,
)
from gad.train.score_losses import (
    bt_discriminator_loss,
    ce_discriminator_loss,
    discriminator_accuracy,
)

ATOL = 1e-5


def close(actual: torch.Tensor, expected: float | list, atol: float = ATOL) -> None:
    expected_t = torch.tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual.detach(), expected_t, atol=atol, rtol=0)


# --- masked_mean -------------------------------------------------------------------------------


def test_masked_mean_rows_and_fully_masked_row():
    x_bt = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask_bt = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    # row 0: (1 + 2) / 2 = 1.5; row 1 has no token -> 0, not NaN
    close(masked_mean(x_bt, mask_bt, dim=-1), [1.5, 0.0])
    # global: only the two tokens of row 0 count -> 1.5
    close(masked_mean(x_bt, mask_bt), 1.5)
    # a bool mask gives the same
    close(masked_mean(x_bt, mask_bt.bool(), dim=-1), [1.5, 0.0])
    # nothing selected at all -> 0
    close(masked_mean(x_bt, torch.zeros_like(mask_bt)), 0.0)


def test_masked_mean_ignores_inf_and_nan_under_the_mask():
    x_bt = torch.tensor([[2.0, float("inf"), float("nan")]])
    mask_bt = torch.tensor([[1.0, 0.0, 0.0]])
    close(masked_mean(x_bt, mask_bt, dim=-1), [2.0])


def test_masked_mean_gradient_only_on_selected_entries():
    x_bt = torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True)
    masked_mean(x_bt, torch.tensor([[1, 1, 0]])).backward()
    # d/dx of (x0 + x1) / 2
    close(x_bt.grad, [[0.5, 0.5, 0.0]])


# --- discriminator losses ------------------------------------------------------------------------

# 2 prompts x 2 student samples
TEACHER_P = [1.0, 0.0]
STUDENT_PN = [[0.0, 2.0], [-1.0, 0.0]]


def test_bt_loss_by_hand():
    teacher_p = torch.tensor(TEACHER_P, requires_grad=True)
    student_pn = torch.tensor(STUDENT_PN)
    loss = bt_discriminator_loss(teacher_p, student_pn)
    # pair differences t_p - s_pi: p0: 1-0 = 1, 1-2 = -1; p1: 0-(-1) = 1, 0-0 = 0
    # -log σ(d): 0.313262, 1.313262, 0.313262, 0.693147 -> sum 2.632932 / 4 = 0.658233
    close(loss, 0.658233)
    loss.backward()
    # each student sample is paired with the SAME teacher score of its prompt:
    # dL/dt_p = (1/4) Σ_i -σ(-(t_p - s_pi))
    #   p0: -(σ(-1) + σ(1)) / 4 = -(0.268941 + 0.731059) / 4 = -0.25
    #   p1: -(σ(-1) + σ(0)) / 4 = -(0.268941 + 0.5) / 4      = -0.192235
    close(teacher_p.grad, [-0.25, -0.192235])


def test_bt_loss_swapping_roles():
    # one sample per prompt so that teacher and student can swap roles
    teacher_p = torch.tensor([1.0, 0.0])
    student_pn = torch.tensor([[0.0], [-1.0]])
    # both pairs have d = 1: -log σ(1) = 0.313262
    close(bt_discriminator_loss(teacher_p, student_pn), 0.313262)
    # swapped, d = -1: -log σ(-1) = 1.313262 = 0.313262 + mean(d),
    # since softplus(x) - softplus(-x) = x: the loss grows by exactly the mean margin
    close(bt_discriminator_loss(student_pn[:, 0], teacher_p.unsqueeze(-1)), 1.313262)
    # a [P] student tensor means N = 1
    close(bt_discriminator_loss(teacher_p, student_pn[:, 0]), 0.313262)


def test_bt_loss_rejects_mismatched_prompts():
    with pytest.raises(ValueError):
        bt_discriminator_loss(torch.zeros(3), torch.zeros(2, 4))


def test_discriminator_accuracy():
    # pairs: 1 > 0 yes, 1 > 2 no, 0 > -1 yes, 0 > 0 no (tie counts as a miss) -> 2 / 4
    close(discriminator_accuracy(torch.tensor(TEACHER_P), torch.tensor(STUDENT_PN)), 0.5)


def test_ce_loss_by_hand():
    loss = ce_discriminator_loss(torch.tensor(TEACHER_P), torch.tensor(STUDENT_PN))
    # per pair: -log σ(t) - log(1 - σ(s)) = -log σ(t) - log σ(-s)
    #   p0,i0: t=1, s=0   -> 0.313262 + 0.693147 = 1.006409
    #   p0,i1: t=1, s=2   -> 0.313262 + 2.126928 = 2.440190
    #   p1,i0: t=0, s=-1  -> 0.693147 + 0.313262 = 1.006409
    #   p1,i1: t=0, s=0   -> 0.693147 + 0.693147 = 1.386294
    # mean = 5.839302 / 4 = 1.459825
    close(loss, 1.459825)
    # a discriminator that outputs 0 everywhere: log 2 + log 2 = 1.386294
    close(ce_discriminator_loss(torch.zeros(2), torch.zeros(2, 3)), 1.386294)


def test_discriminator_losses_upcast_half_precision():
    loss = bt_discriminator_loss(torch.tensor([1.0], dtype=torch.bfloat16), torch.zeros(1, 1))
    assert loss.dtype == torch.float32
    close(loss, 0.313262)


# --- advantages ------------------------------------------------------------------------------


def test_group_advantages_by_hand():
    reward_pn = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.1, 0.1, 0.1, 0.1]])
    advantage_pn = group_advantages(reward_pn)
    # row 0: mean 3, deviations -2, -1, 0, 3; Σ dev² = 14; unbiased var = 14/3 = 4.666667;
    # std = 2.160247 -> -2/2.160247 = -0.925820, -0.462910, 0, 3/2.160247 = 1.388730
    close(advantage_pn[0], [-0.925820, -0.462910, 0.0, 1.388730])
    # row 1: every reward equal -> exactly zero (not NaN, not ulp-sized noise / eps)
    assert torch.equal(advantage_pn[1], torch.zeros(4))


def test_group_advantages_single_sample_is_zero():
    advantage_pn = group_advantages(torch.tensor([[0.7], [-3.0]]))
    assert torch.equal(advantage_pn, torch.zeros(2, 1))


def test_group_advantages_are_detached():
    reward_pn = torch.tensor([[1.0, 2.0]], requires_grad=True)
    assert not group_advantages(reward_pn).requires_grad


# --- k3 KL -----------------------------------------------------------------------------------


def test_k3_by_hand():
    logp_bt = torch.tensor([[-1.0, -2.0, -0.5, -6.0]])
    ref_logp_bt = torch.tensor([[-2.0, -1.0, -0.5, -1.0]])
    # d = ref - logp: -1, 1, 0, 5
    # k3 = e^d - d - 1: e^-1 + 1 - 1 = 0.367879; e - 2 = 0.718282; 0;
    #   e^5 - 6 = 142.41 -> clamped to 10 (verl's low_var_kl clamp)
    close(k3_kl(logp_bt, ref_logp_bt), [[0.367879, 0.718282, 0.0, 10.0]])
    assert torch.equal(k3_kl(logp_bt, logp_bt), torch.zeros(1, 4))


# --- policy loss -----------------------------------------------------------------------------


def _policy_inputs(ratio_bt: list, mask_bt: list) -> tuple[torch.Tensor, torch.Tensor]:
    old_logp_bt = torch.full((len(ratio_bt), len(ratio_bt[0])), -1.0)
    logp_bt = (old_logp_bt + torch.tensor(ratio_bt).log()).requires_grad_(True)
    return logp_bt, old_logp_bt


# seq 0: A = +1, 3 tokens, ρ = 1.5 (above the band), 1.0, 0.5 (below the band)
# seq 1: A = -2, 2 tokens, ρ = 0.5 (below the band), 1.5 (above the band), then 1 pad token
RATIO_BT = [[1.5, 1.0, 0.5], [0.5, 1.5, 7.0]]
MASK_BT = [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]
ADVANTAGE_B = [1.0, -2.0]


def test_policy_loss_clip_both_sides_and_signs():
    logp_bt, old_logp_bt = _policy_inputs(RATIO_BT, MASK_BT)
    loss, stats = policy_loss(
        logp_bt, old_logp_bt, torch.tensor(ADVANTAGE_B), torch.tensor(MASK_BT), clip_eps=0.2
    )
    # per-token surrogate min(ρA, clip(ρ, 0.8, 1.2)A), then negated:
    #   seq 0 (A = 1):  ρ=1.5: min(1.5, 1.2) = 1.2 (clipped)  -> -1.2
    #                   ρ=1.0: 1.0                             -> -1.0
    #                   ρ=0.5: min(0.5, 0.8) = 0.5 (unclipped) -> -0.5
    #                   token mean = -2.7 / 3 = -0.9
    #   seq 1 (A = -2): ρ=0.5: min(-1.0, -1.6) = -1.6 (clipped)  -> 1.6
    #                   ρ=1.5: min(-3.0, -2.4) = -3.0 (unclipped) -> 3.0
    #                   token mean = 4.6 / 2 = 2.3
    # seq mean: (-0.9 + 2.3) / 2 = 0.7   (a token mean would give 1.9 / 5 = 0.38)
    close(loss, 0.7)
    close(stats["pg_loss"], 0.7)
    # clip active on seq0 tok0 and seq1 tok0: 2 of 5 response tokens
    close(stats["clip_frac"], 0.4)
    # (1.5 + 1.0 + 0.5 + 0.5 + 1.5) / 5 = 1.0; the pad ratio 7.0 is ignored
    close(stats["ratio_mean"], 1.0)
    # no reference policy -> no KL term
    close(stats["kl"], 0.0)
    assert all(not v.requires_grad for v in stats.values())


def test_policy_loss_gradient_zero_where_clipped():
    logp_bt, old_logp_bt = _policy_inputs(RATIO_BT, MASK_BT)
    loss, _ = policy_loss(
        logp_bt, old_logp_bt, torch.tensor(ADVANTAGE_B), torch.tensor(MASK_BT), clip_eps=0.2
    )
    loss.backward()
    # unclipped token: loss ∋ -(1/N)(1/|y_i|) A ρ and dρ/dlogp = ρ -> grad = -A ρ / (N |y_i|), N = 2
    #   seq 0 (|y|=3, A=1):  clipped 0; ρ=1: -1/6 = -0.166667; ρ=0.5: -0.5/6 = -0.083333
    #   seq 1 (|y|=2, A=-2): clipped 0; ρ=1.5: 2·1.5/4 = 0.75; pad 0
    close(logp_bt.grad, [[0.0, -0.166667, -0.083333], [0.0, 0.75, 0.0]])


def test_policy_loss_long_sequence_does_not_outweigh_short_one():
    # seq 0: 1 token, A = +1; seq 1: 4 tokens, A = -1; ρ = 1 everywhere
    ratio_bt = [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]
    mask_bt = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    logp_bt, old_logp_bt = _policy_inputs(ratio_bt, mask_bt.tolist())
    loss, _ = policy_loss(logp_bt, old_logp_bt, torch.tensor([1.0, -1.0]), mask_bt)
    # per sequence: -1 and +1 -> (−1 + 1) / 2 = 0; a token mean would give (-1 + 4) / 5 = 0.6
    close(loss, 0.0)
    # and the helper on its own: row means 5 and (1+2+3+4)/4 = 2.5 -> 3.75
    x_bt = torch.tensor([[5.0, 9.0, 9.0, 9.0], [1.0, 2.0, 3.0, 4.0]])
    close(seq_mean_token_mean(x_bt, mask_bt), 3.75)


def test_policy_loss_kl_term():
    # ρ = 1 and A = 0, so only the KL term is left
    ratio_bt = [[1.0, 1.0], [1.0, 1.0]]
    mask_bt = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    logp_bt, old_logp_bt = _policy_inputs(ratio_bt, mask_bt.tolist())
    # ref - logp: seq 0: -1, 0; seq 1: +1 (and a pad)
    ref_logp_bt = logp_bt.detach() + torch.tensor([[-1.0, 0.0], [1.0, 30.0]])
    advantage_b = torch.zeros(2)
    loss, stats = policy_loss(
        logp_bt, old_logp_bt, advantage_b, mask_bt, kl_coef=0.1, ref_logp_bt=ref_logp_bt
    )
    # k3: seq 0: 0.367879, 0 -> mean 0.183940; seq 1: 0.718282
    # kl = (0.183940 + 0.718282) / 2 = 0.451111; loss = 0 + 0.1 · 0.451111 = 0.0451111
    close(stats["kl"], 0.451111)
    close(stats["pg_loss"], 0.0)
    close(loss, 0.0451111)
    loss.backward()
    # d k3 / d logp = 1 - e^(ref - logp); weight β / (N |y_i|):
    #   seq 0: 0.1/(2·2) · (1 - e^-1) = 0.025 · 0.632121 = 0.015803; 0.025 · 0 = 0
    #   seq 1: 0.1/(2·1) · (1 - e)   = 0.05 · -1.718282 = -0.085914; pad 0
    close(logp_bt.grad, [[0.015803, 0.0], [-0.085914, 0.0]])

    # kl_coef = 0: no KL in the loss, still reported
    loss0, stats0 = policy_loss(
        logp_bt, old_logp_bt, advantage_b, mask_bt, kl_coef=0.0, ref_logp_bt=ref_logp_bt
    )
    close(loss0, 0.0)
    close(stats0["kl"], 0.451111)


# --- logits helpers --------------------------------------------------------------------------


def test_gather_logprobs_by_hand_and_stable():
    # logits [0, log 3] -> p = [1/4, 3/4]; log p = [-1.386294, -0.287682]
    logits_btv = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])
    ids_bt = torch.tensor([[1, 0]])
    close(gather_logprobs(logits_btv, ids_bt), [[-0.287682, -1.386294]])
    # a shift by 1000 changes nothing and does not overflow
    close(gather_logprobs(logits_btv + 1000.0, ids_bt), [[-0.287682, -1.386294]], atol=1e-4)


def test_gather_logprobs_matches_log_softmax_gather():
    gen = torch.Generator().manual_seed(0)
    logits_btv = torch.randn(3, 4, 11, generator=gen, dtype=torch.float64) * 5
    ids_bt = torch.randint(0, 11, (3, 4), generator=gen)
    reference_bt = logits_btv.log_softmax(-1).gather(-1, ids_bt.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(gather_logprobs(logits_btv, ids_bt), reference_bt)
    # bf16 logits come back as float32, equal to the float32 computation on the same values
    logits_bf16 = logits_btv.to(torch.bfloat16)
    out_bt = gather_logprobs(logits_bf16, ids_bt)
    assert out_bt.dtype == torch.float32
    reference32_bt = logits_bf16.float().log_softmax(-1).gather(-1, ids_bt.unsqueeze(-1))
    torch.testing.assert_close(out_bt, reference32_bt.squeeze(-1))
    # gradients agree too
    lg_a = logits_btv.clone().requires_grad_(True)
    lg_b = logits_btv.clone().requires_grad_(True)
    gather_logprobs(lg_a, ids_bt).sum().backward()
    lg_b.log_softmax(-1).gather(-1, ids_bt.unsqueeze(-1)).sum().backward()
    torch.testing.assert_close(lg_a.grad, lg_b.grad)


def test_token_entropy():
    # uniform over V = 7: log 7 = 1.945910, whatever the constant
    close(token_entropy_from_logits(torch.full((2, 3, 7), 4.0)), [[1.945910] * 3] * 2)
    # p = [1/4, 3/4]: 0.25 log 4 + 0.75 log(4/3) = 0.346574 + 0.215762 = 0.562335
    logits_btv = torch.tensor([[[0.0, math.log(3.0)]]])
    close(token_entropy_from_logits(logits_btv), [[0.562335]])
    # a near-one-hot distribution: entropy ~ 0, finite
    peaked_btv = torch.tensor([[[0.0, 200.0, -200.0]]])
    close(token_entropy_from_logits(peaked_btv), [[0.0]])
