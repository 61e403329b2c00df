"""Knowledge distillation (section 5.3): the student also matches the teacher's softened outputs.

loss = CE(p, softmax(z)) + weight * T^2 * CE(softmax(r / T), softmax(z / T)),
z student logits, r teacher logits, p the (smoothed / mixed) targets, T the temperature. T^2 keeps
the soft term's gradient scale independent of T (Hinton et al. 2015); the paper uses weight 1, T = 20.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .label_smoothing import soft_target_cross_entropy


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets_soft: torch.Tensor,
    temperature: float,
    weight: float,
) -> torch.Tensor:
    """The paper's distillation loss; the teacher logits are detached, so only the student learns."""
    if temperature <= 0:
        raise ValueError(f"distillation temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape (same classes?)"
        )
    teacher_probs = F.softmax(teacher_logits.detach().float() / temperature, dim=-1)
    hard = soft_target_cross_entropy(student_logits, targets_soft)
    soft = soft_target_cross_entropy(student_logits.float() / temperature, teacher_probs)
    return hard + weight * temperature**2 * soft
