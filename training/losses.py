"""Loss terms of the recipes: ground-truth CE, soft-label KD, and the MatTA composite."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token CE; logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


class SoftTarget:
    """A frozen target distribution at temperature T, computed once and reused by every width."""

    def __init__(self, logits: torch.Tensor, temperature: float) -> None:
        vocab = logits.shape[-1]
        self.temperature = temperature
        self.log_probs = F.log_softmax(logits.detach().float().reshape(-1, vocab) / temperature, dim=-1)
        self.probs = self.log_probs.exp()
        # sum p log p: the target's negative entropy, so KL = this - sum p log q.
        self.neg_entropy = (self.probs * self.log_probs).sum() / self.log_probs.shape[0]

    def kl(self, student_log_probs: torch.Tensor) -> torch.Tensor:
        """T^2 * KL(target || student), mean over tokens; ``student_log_probs`` at the same T.

        The T^2 factor keeps the gradient scale independent of T (Hinton et al.), so soft and
        hard terms stay comparable when T changes.
        """
        cross = (self.probs * student_log_probs).sum() / student_log_probs.shape[0]
        return (self.neg_entropy - cross) * self.temperature**2


def tempered_log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.log_softmax(logits.float().reshape(-1, logits.shape[-1]) / temperature, dim=-1)


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), mean over tokens; teacher detached."""
    return SoftTarget(teacher_logits, temperature).kl(tempered_log_probs(student_logits, temperature))


def width_loss(
    logits: torch.Tensor, targets: torch.Tensor, teacher: SoftTarget | None, label_mix: float,
    ta: SoftTarget | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss against teacher labels, TA -> this width distillation), sharing one log-softmax.

    Teacher labels = (1 - label_mix) * CE(ground truth) + label_mix * T^2 KL(teacher || model).
    """
    zero = logits.new_zeros((), dtype=torch.float32)
    hard = cross_entropy(logits, targets) if (teacher is None or label_mix < 1) else zero
    needs_soft = (teacher is not None and label_mix > 0) or ta is not None
    log_probs = tempered_log_probs(logits, (teacher or ta).temperature) if needs_soft else None
    labels = hard
    if teacher is not None and label_mix > 0:
        labels = (1 - label_mix) * hard + label_mix * teacher.kl(log_probs)
    distill_term = ta.kl(log_probs) if ta is not None else zero
    return labels, distill_term


def label_loss(
    logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None, label_mix: float,
    temperature: float,
) -> torch.Tensor:
    """Loss against "teacher labels" for a single model (the ``kd`` recipe)."""
    teacher = SoftTarget(teacher_logits, temperature) if teacher_logits is not None and label_mix > 0 else None
    return width_loss(logits, targets, teacher, label_mix)[0]


@dataclass(frozen=True)
class MattaWeights:
    ta: float
    student: float
    distill: float | torch.Tensor  # beta at this step, ramp applied; a tensor always computes the term
    middle: float
    temperature: float
    label_mix: float


def distill_ramp(step: int, weight: float, ramp_steps: int) -> float:
    """beta at ``step``: rises linearly from 0 to ``weight`` over ``ramp_steps`` steps."""
    if ramp_steps <= 0:
        return weight
    return weight * min(1.0, step / ramp_steps)


def matta_loss(
    targets: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    ta_logits: torch.Tensor,
    student_logits: torch.Tensor,
    middle_logits: list[torch.Tensor],
    w: MattaWeights,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The MatTA composite loss and its parts (detached, for logging).

    TA and Student (and sampled middle widths) each learn from teacher labels; the Student and
    middle widths also distil from the TA's softened distribution. The TA side of that term is
    detached: the TA is taught by the teacher, not pulled towards its own sub-network.
    """
    teacher = SoftTarget(teacher_logits, w.temperature) if teacher_logits is not None and w.label_mix > 0 else None
    distilling = isinstance(w.distill, torch.Tensor) or w.distill > 0
    ta = SoftTarget(ta_logits, w.temperature) if distilling else None
    ta_term, _ = width_loss(ta_logits, targets, teacher, w.label_mix)
    student_term, distill_term = width_loss(student_logits, targets, teacher, w.label_mix, ta)
    total = w.ta * ta_term + w.student * student_term + w.distill * distill_term
    # Parts stay tensors: an .item() here would sync and break a torch.compile graph in two.
    parts = {"ta": ta_term.detach(), "student": student_term.detach(), "distill": distill_term.detach()}
    if middle_logits:
        middle_total = ta_term.new_zeros(())
        for logits in middle_logits:
            labels, distill = width_loss(logits, targets, teacher, w.label_mix, ta)
            middle_total = middle_total + labels + w.distill * distill
        middle_total = middle_total / len(middle_logits)
        total = total + w.middle * middle_total
        parts["middle"] = middle_total.detach()
    parts["total"] = total.detach()
    return total, parts
