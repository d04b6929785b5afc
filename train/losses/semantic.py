"""Understanding terms (spec: losses): image–text distillation for images, SigLIP's sigmoid loss for video and 3D.

Captions repeat in a batch (class names): every pair of samples with the same caption counts as a match, in
the sigmoid loss's labels and in the distillation's text list (one row per distinct caption).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from atoken.train.model.tokens import to_device


def caption_matches(captions: list[str], others: list[str] | None = None) -> torch.Tensor:
    """(S, S') bool: caption i equals other caption j (`others`: the global batch's captions; None: the same
    list, (S, S))."""
    others = captions if others is None else others
    index = {caption: i for i, caption in enumerate(dict.fromkeys(others + captions))}
    rows, columns = torch.tensor([index[c] for c in captions]), torch.tensor([index[c] for c in others])
    return rows[:, None] == columns[None, :]


def sigmoid_loss(embeddings: torch.Tensor, text: torch.Tensor, matches: torch.Tensor, logit_scale: torch.Tensor,
                 logit_bias: torch.Tensor) -> torch.Tensor:
    """SigLIP (Zhai et al. 2023): −1/S Σ_ij log σ(z_ij (e^t ⟨x_i, y_j⟩ + b)), z = +1 for a match, −1 otherwise.

    embeddings (S, D) of this worker's samples, text (S', D) of the global batch's captions (the negatives of
    every worker, as SigLIP's chunked all-gather), unit-normalised here; matches (S, S') bool. Normalised by the
    local rows S; the caller rescales to the global batch."""
    logits = logit_scale.exp() * F.normalize(embeddings, dim=-1) @ F.normalize(text, dim=-1).T + logit_bias  # (S, S')
    signs = to_device(matches, logits.device).to(logits.dtype) * 2.0 - 1.0  # (S, S'): +1 match, -1 not
    return -F.logsigmoid(signs * logits).sum() / embeddings.shape[0]


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, text: torch.Tensor, temperature: float = 2.0,
                      scale: float = 100.0) -> torch.Tensor:
    """KL(p_teacher ‖ p_student) of the image→text distributions softmax(scale·cos / τ), times τ² (Hinton et al.
    2015, so the gradient's size does not shrink with τ).

    student (S, D) and teacher (S, D) embed the same images; text (C, D) the batch's distinct captions, from the
    frozen text encoder both share."""
    text = F.normalize(text, dim=-1)
    student_logits = scale * F.normalize(student, dim=-1) @ text.T / temperature  # (S, C)
    teacher_logits = scale * F.normalize(teacher, dim=-1) @ text.T / temperature  # (S, C)
    teacher_log_probs = F.log_softmax(teacher_logits.detach(), dim=-1)
    return F.kl_div(F.log_softmax(student_logits, dim=-1), teacher_log_probs, log_target=True,
                    reduction="batchmean") * temperature**2
