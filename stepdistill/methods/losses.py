"""The losses of every method, each a small callable that reads like its equation (the EDM ``training/loss.py``
style). A method file picks its losses here; nothing in this module knows about networks, phases or the loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------- consistency
@dataclass(frozen=True)
class ConsistencyLoss:
    """d(f_θ(x_t, t), f_θ⁻(x_prev, t_prev)): pseudo-Huber √((f - target)² + c²) - c (LCM, and iCT's eq. 11) or
    the squared error, averaged over every element."""

    loss_type: str = "huber"
    huber_c: float = 1e-3

    def __call__(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.loss_type == "huber":
            return (torch.sqrt((prediction.float() - target.float()) ** 2 + self.huber_c ** 2) - self.huber_c).mean()
        if self.loss_type == "l2":
            return F.mse_loss(prediction.float(), target.float())
        raise ValueError(f"unknown loss_type {self.loss_type!r}")


# ----------------------------------------------------------------------------------------------------- denoising
@dataclass(frozen=True)
class DenoisingLoss:
    """The fake score's ε-matching loss ‖ε̂ - ε‖². Samples with a non-finite error are dropped (SiD's loop does).
    ``mean``: over every element (DMD2 sd_guidance.py compute_loss_fake); ``sum``: over C·H·W, then divided by the
    whole batch (SiD-LSG's training loop)."""

    reduction: str = "mean"

    def __call__(self, eps_pred: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        err = (eps_pred.float() - noise.float()) ** 2
        kept = err[err.flatten(1).isfinite().all(1)]
        if self.reduction == "mean":
            return kept.mean()
        if self.reduction == "sum":
            return kept.sum() / err.shape[0]
        raise ValueError(f"unknown reduction {self.reduction!r}")


# ----------------------------------------------------------------------------------------------------- GAN
def gan_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss softplus(-D(x̂)) (DMD2 sd_guidance.py compute_generator_clean_cls_loss)."""
    return F.softplus(-logits_fake).mean()


def gan_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """softplus(D(fake)) + softplus(-D(real)) (DMD2 sd_guidance.py compute_guidance_clean_cls_loss)."""
    return F.softplus(logits_fake).mean() + F.softplus(-logits_real).mean()


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """relu(1 - D(real)) + relu(1 + D(fake)) (PCM's adversarial head, train_pcm_lora_sd15_adv.py)."""
    return torch.relu(1 - logits_real).mean() + torch.relu(1 + logits_fake).mean()


def hinge_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """-D(x̂): the generator's side of the hinge GAN."""
    return -logits_fake.mean()


# ----------------------------------------------------------------------------------------------------- generator
@dataclass
class ScorePair:
    """What a generator loss of the distribution-matching family reads: the generator's sample x_g, the noisy
    point x_t = a_t x_g + s_t ε at t, and the real (teacher) and fake scores' clean estimates there."""

    x_g: torch.Tensor
    x_t: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    y_real: torch.Tensor
    y_fake: torch.Tensor


class GeneratorLoss:
    """A generator loss of the family: turns a ``ScorePair`` into a scalar and logs.

    ``input_grad``: whether y_real / y_fake must carry gradients into x_t (SiD, SIM) or are constants (DMD,
    Diff-Instruct, f-distill). Other members of the family are new subclasses: Diff-Instruct weights
    (ε_fake - ε_real) per t; SIM replaces SiD's inner product with a distance; the f-divergence weightings
    (f-distill, Uni-Instruct) scale DMD's gradient by h(r) of a discriminator's density ratio r = exp(logit).
    """

    name: ClassVar[str]
    input_grad: ClassVar[bool] = False

    def __call__(self, s: ScorePair) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError


def dmd_gradient(x: torch.Tensor, y_real: torch.Tensor, y_fake: torch.Tensor) -> torch.Tensor:
    """DMD's distribution-matching gradient (DMD2 sd_guidance.py compute_distribution_matching_loss):
    (p_fake - p_real) / mean_CHW|x - p_real| per sample, NaN set to 0."""
    dims = tuple(range(1, x.ndim))
    grad = (y_fake - y_real) / (x - y_real).abs().mean(dim=dims, keepdim=True)
    return torch.nan_to_num(grad)


class DMDLoss(GeneratorLoss):
    """L_DM = 0.5 · mean((x̂ - sg(x̂ - g))²), whose gradient in x̂ is g / numel (DMD2 paper eq. 2 with the official
    normaliser)."""

    name = "dm"

    def __call__(self, s: ScorePair) -> tuple[torch.Tensor, dict]:
        with torch.no_grad():
            grad = dmd_gradient(s.x_g.float(), s.y_real.float(), s.y_fake.float())
        loss = 0.5 * F.mse_loss(s.x_g.float(), (s.x_g.float() - grad).detach())
        return loss, {"dm_grad_norm": grad.norm().detach()}


def sid_loss(x_g: torch.Tensor, y_real: torch.Tensor, y_fake: torch.Tensor, alpha: float) -> tuple[torch.Tensor, int]:
    """SiD's generator loss (SiD paper eq. 21; SiD-LSG sid_sd_loss): Σ_CHW (y_r - y_f)·((y_r - x_g) - α (y_r - y_f))
    / ω with ω = sg(mean_CHW|x_g - y_r|).clip(1e-5), summed over the samples without NaN and divided by the whole
    batch (as the official loop does). Returns the loss and the number of samples dropped."""
    b = x_g.shape[0]
    dims = tuple(range(1, x_g.ndim))
    finite = torch.stack([v.flatten(1).isfinite().all(1) for v in (x_g, y_real, y_fake)]).all(0)
    x_g, y_real, y_fake = x_g[finite].float(), y_real[finite].float(), y_fake[finite].float()
    with torch.no_grad():
        omega = (x_g - y_real).abs().mean(dim=dims, keepdim=True).clip(min=1e-5)
    per_sample = ((y_real - y_fake) * ((y_real - x_g) - alpha * (y_real - y_fake)) / omega).sum(dim=dims)
    return per_sample.sum() / b, int(b - finite.sum())


class SiDLoss(GeneratorLoss):
    name = "sid"
    input_grad = True  # autograd runs through both score networks into x_t (SiD's score-identity gradient)

    def __init__(self, alpha: float):
        self.alpha = alpha

    def __call__(self, s: ScorePair) -> tuple[torch.Tensor, dict]:
        loss, dropped = sid_loss(s.x_g, s.y_real, s.y_fake, self.alpha)
        return loss, {"nan_dropped": float(dropped)}
