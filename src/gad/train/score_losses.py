"""Losses on a scalar-head model's scores: the discriminator's (Bradley–Terry, Eq. 3 and its
group form Eq. 8; the cross-entropy ablation, Eq. 4), its accuracy, and the reward model's
pointwise loss. Pure functions of tensors; shape suffixes as in `losses`.
"""

import torch
import torch.nn.functional as F

from gad.train.losses import upcast


def _pair_scores(
    teacher_score_p: torch.Tensor, student_score_pn: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate and upcast, returning teacher [P, 1] and student [P, N] for broadcasting."""
    if teacher_score_p.dim() != 1:
        raise ValueError(f"teacher scores must be [P], got {tuple(teacher_score_p.shape)}")
    if student_score_pn.dim() == 1:
        student_score_pn = student_score_pn.unsqueeze(-1)
    if student_score_pn.dim() != 2 or student_score_pn.shape[0] != teacher_score_p.shape[0]:
        raise ValueError(
            f"student scores must be [P, N] or [P] with P = {teacher_score_p.shape[0]}, "
            f"got {tuple(student_score_pn.shape)}"
        )
    return upcast(teacher_score_p).unsqueeze(-1), upcast(student_score_pn)


def bt_discriminator_loss(
    teacher_score_p: torch.Tensor, student_score_pn: torch.Tensor
) -> torch.Tensor:
    """Bradley–Terry discriminator loss (Eq. 3, group form Eq. 8).

    ``L_D = mean_{p, i} -log σ(D(y_t^p) - D(y_s^{p,i}))``: each of the N student samples of
    prompt p is paired with the same teacher score of p; the mean runs over all P·N pairs.

    Args:
        teacher_score_p: [P] discriminator scores of the teacher responses.
        student_score_pn: [P, N] scores of the N student samples per prompt ([P] means N = 1).

    Returns:
        scalar loss (float32 at least, also for half-precision scores).
    """
    t_p1, s_pn = _pair_scores(teacher_score_p, student_score_pn)
    return -F.logsigmoid(t_p1 - s_pn).mean()


def discriminator_accuracy(
    teacher_score_p: torch.Tensor, student_score_pn: torch.Tensor
) -> torch.Tensor:
    """Share of (teacher, student-sample) pairs where the teacher scores strictly higher.

    Same pairing and shapes as :func:`bt_discriminator_loss`; a tie counts as a miss.
    Returns a detached scalar in [0, 1].
    """
    t_p1, s_pn = _pair_scores(teacher_score_p.detach(), student_score_pn.detach())
    return (t_p1 > s_pn).float().mean()


def ce_discriminator_loss(
    teacher_score_p: torch.Tensor, student_score_pn: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy discriminator loss, the Eq. 4 ablation.

    Per pair (p, i): ``-log σ(D(y_t^p)) - log(1 - σ(D(y_s^{p,i})))``, computed stably as
    ``-logsigmoid(t) - logsigmoid(-s)``; then the mean over all P·N pairs. The two terms are
    summed, not averaged, exactly as in Eq. 4 (so a constant D = 0 gives 2·log 2). Since every
    prompt has N samples, this equals ``mean_p(-log σ(t_p)) + mean_{p,i}(-log σ(-s_pi))``:
    teacher and student sides carry equal total weight.

    Args:
        teacher_score_p: [P] logits of "is teacher" for the teacher responses.
        student_score_pn: [P, N] the same for the student samples ([P] means N = 1).

    Returns:
        scalar loss.
    """
    t_p1, s_pn = _pair_scores(teacher_score_p, student_score_pn)
    return (-F.logsigmoid(t_p1) - F.logsigmoid(-s_pn)).mean()


def pointwise_bce_loss(score_b: torch.Tensor, target_b: torch.Tensor) -> torch.Tensor:
    """Pointwise reward-model loss: binary cross-entropy of ``σ(score)`` against 0/1 labels.

    ``mean_b -[t·log σ(s) + (1-t)·log(1 - σ(s))]``, computed stably from the logits. (The
    pairwise Bradley–Terry loss of a reward model is :func:`bt_discriminator_loss` with the
    preferred responses' scores as [P] and the others' as [P]: ``mean -log σ(s⁺ - s⁻)``.)

    Args:
        score_b: [B] reward-model scores (logits of "good").
        target_b: [B] labels, 1 = good (correct), 0 = not; soft targets in [0, 1] also work.

    Returns:
        scalar loss (float32 at least).
    """
    if score_b.shape != target_b.shape or score_b.dim() != 1:
        raise ValueError(
            f"scores and targets must both be [B], got {tuple(score_b.shape)} and "
            f"{tuple(target_b.shape)}"
        )
    score_b = upcast(score_b)
    return F.binary_cross_entropy_with_logits(score_b, target_b.to(score_b.dtype))
