"""SODA's DPO loss (`losses.dpo_loss`) against hand-computed values."""

import math

import pytest
import torch

from gad import losses


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


# ------------------------------------------------------------------ the loss


def test_dpo_loss_equals_the_hand_computed_values():
    policy_c = torch.tensor([-5.0, -3.0], requires_grad=True)
    policy_r, ref_c, ref_r = torch.tensor([-3.0, -6.0]), torch.tensor([-6.0, -3.5]), [-4.5, -5.0]
    loss, stats = losses.dpo_loss(policy_c, policy_r, ref_c, torch.tensor(ref_r), beta=0.1)
    # Pair 1: r_w = 0.1·(-5 + 6) = 0.1, r_l = 0.1·(-3 + 4.5) = 0.15, margin -0.05.
    # Pair 2: r_w = 0.1·(-3 + 3.5) = 0.05, r_l = 0.1·(-6 + 5) = -0.1, margin 0.15.
    expected = (math.log(1 + math.exp(0.05)) + math.log(1 + math.exp(-0.15))) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats["margin"].item() == pytest.approx((-0.05 + 0.15) / 2, abs=1e-6)
    assert stats["accuracy"].item() == 0.5
    assert stats["chosen_reward"].item() == pytest.approx((0.1 + 0.05) / 2, abs=1e-6)
    assert stats["rejected_reward"].item() == pytest.approx((0.15 - 0.1) / 2, abs=1e-6)
    # d loss / d log πθ(y_w) of pair b = -β·σ(-margin_b) / B.
    loss.backward()
    grads = [-0.1 * sigmoid(0.05) / 2, -0.1 * sigmoid(-0.15) / 2]
    assert policy_c.grad.tolist() == pytest.approx(grads, abs=1e-7)

    # β scales the rewards and the margin: at β = 1 the margins are -0.5 and 1.5.
    loss_1, stats_1 = losses.dpo_loss(policy_c, policy_r, ref_c, torch.tensor(ref_r), beta=1.0)
    expected_1 = (math.log(1 + math.exp(0.5)) + math.log(1 + math.exp(-1.5))) / 2
    assert loss_1.item() == pytest.approx(expected_1, abs=1e-6)
    assert stats_1["margin"].item() == pytest.approx(10 * stats["margin"].item(), abs=1e-6)
    # A policy equal to its reference: every reward 0, the loss log 2.
    same, _ = losses.dpo_loss(ref_c, torch.tensor(ref_r), ref_c, torch.tensor(ref_r), beta=5.0)
    assert same.item() == pytest.approx(math.log(2), abs=1e-6)
    with pytest.raises(ValueError, match=r"\[B\]"):
        losses.dpo_loss(policy_c, policy_r, ref_c, torch.zeros(3))
