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
    logits: torch.Tensor | None = None  # the Diffusion-GAN head's logits at (x_t, t), for the ratio-weighted losses


class GeneratorLoss:
    """A generator loss of the family: turns a ``ScorePair`` into a scalar and logs.

    ``input_grad``: whether y_real / y_fake must carry gradients into x_t (SiD, SIM) or are constants (DMD,
    Diff-Instruct, f-distill). Other members of the family are new subclasses: Diff-Instruct weights
    (ε_fake - ε_real) per t; SIM replaces SiD's inner product with a distance; the f-divergence weightings
    (f-distill, Uni-Instruct) scale DMD's gradient by h(r) of a discriminator's density ratio r = exp(logit).
    """

    name: ClassVar[str]
    input_grad: ClassVar[bool] = False
    needs_ratio: ClassVar[bool] = False  # reads ScorePair.logits (a discriminator at the same x_t): needs --gan

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


def _finite(*tensors: torch.Tensor) -> torch.Tensor:
    """Per sample: whether every value of every tensor is finite."""
    return torch.stack([v.flatten(1).isfinite().all(1) for v in tensors]).all(0)


def _kept_samples(x_g, y_real, y_fake, *weights):
    """The samples whose x_g, y_r, y_f and per-sample weights are all finite (x_g, y_r, y_f in float32), SiD's
    per-sample normaliser ω = sg(mean_CHW |x_g - y_r|).clip(1e-5) of those, and how many were dropped (the score
    losses sum the kept samples and divide by the whole batch, as SiD-LSG)."""
    b = x_g.shape[0]
    finite = _finite(x_g, y_real, y_fake, *(w.view(b, 1) for w in weights))
    kept = [x_g[finite].float(), y_real[finite].float(), y_fake[finite].float(), *(w[finite] for w in weights)]
    with torch.no_grad():
        omega = (kept[0] - kept[1]).abs().mean(dim=tuple(range(1, x_g.ndim))).clip(min=1e-5)
    return kept, omega, int(b - finite.sum())


def sid_loss(x_g: torch.Tensor, y_real: torch.Tensor, y_fake: torch.Tensor, alpha: float) -> tuple[torch.Tensor, int]:
    """SiD's generator loss (SiD paper eq. 21; SiD-LSG sid_sd_loss): Σ_CHW (y_r - y_f)·((y_r - x_g) - α (y_r - y_f))
    / ω with ω = sg(mean_CHW|x_g - y_r|).clip(1e-5), summed over the samples without NaN and divided by the whole
    batch (as the official loop does). Returns the loss and the number of samples dropped."""
    b = x_g.shape[0]
    dims = tuple(range(1, x_g.ndim))
    finite = _finite(x_g, y_real, y_fake)
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


# ----------------------------------------------------------------------------------------------------- the family
# Uni-Instruct (arXiv 2505.20755) reads DMD, Diff-Instruct, SiD, SIM and f-distill as one family: the generator's
# loss weights the gap y_r - y_f between the teacher's and the fake score's clean estimates at x_t = a_t x_g + s_t ε,
# some members times a function of a density ratio r = p_teacher / q_generator read from a discriminator. Every
# loss below is written in clean-estimate (y) units: s_r - s_f = (a_t / s_t²)(y_r - y_f), and the per-t factor
# (a_t / s_t²)² is replaced by the members' per-sample normaliser ω = sg(mean_CHW |x_g - y_r|) (DMD2, SiD).

# φ(r) = r² f''(r) for D_f(p‖q) = E_q[f(p/q)], up to a constant factor; also FastGen's h(r)
# (methods/distribution_matching/f_distill.py, all_f_div_weighting_function: rkl 1, kl r, js 1 - 1/(1+r), sh √r,
# jf 1 + r). Checked by hand: reverse KL f = -log r; forward KL f = r log r; JS f = ½[r log r - (1+r) log((1+r)/2)]
# gives ½ r/(1+r); squared Hellinger f = (√r - 1)² gives ½ √r; Jeffreys f = (r - 1) log r gives 1 + r.
F_WEIGHTS = {
    "reverse_kl": lambda r: torch.ones_like(r),
    "forward_kl": lambda r: r,
    "js": lambda r: r / (1 + r),
    "hellinger": lambda r: r.sqrt(),
    "jeffreys": lambda r: 1 + r,
}
# ψ(r) = -r² φ''(r): the weight of Uni-Instruct's Diff-Instruct branch (see UniInstructLoss), with φ's constants;
# zero where φ is linear in r. JS: 2r²/(1+r)³, as a-little-hoof/Uni_Instruct fsim_training_loop.py's
# w_diff_instruct; squared Hellinger: ¼√r.
F_DI_WEIGHTS = {
    "reverse_kl": lambda r: torch.zeros_like(r),
    "forward_kl": lambda r: torch.zeros_like(r),
    "js": lambda r: 2 * r ** 2 / (1 + r) ** 3,
    "hellinger": lambda r: 0.25 * r.sqrt(),
    "jeffreys": lambda r: torch.zeros_like(r),
}
DIVERGENCES = tuple(F_WEIGHTS)
LOGIT_CLAMP = 10.0  # FastGen f_distill.py: logits clamped to [-10, 10] before exp
RATIO_RANGE = (0.1, 20.0)  # FastGen config_f_distill.py: ratio_lower 0.1, ratio_upper 20


def density_ratio(logits: torch.Tensor) -> torch.Tensor:
    """r = p_teacher / q_generator ≈ exp(D(x_t)) from a discriminator trained with softplus(D(fake)) +
    softplus(-D(real)) (its optimum is log p/q), clamped as FastGen's f_distill.py: logit to [-10, 10], r to
    [0.1, 20]. Gradients pass where no clamp is active (Uni-Instruct backprops through the ratio's input)."""
    logits = logits.float().clamp(-LOGIT_CLAMP, LOGIT_CLAMP)
    return logits.exp().clamp(*RATIO_RANGE)


def _per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (x.ndim - 1)))


class DiffInstructLoss(GeneratorLoss):
    """Diff-Instruct (Luo et al. 2023, the integral-KL gradient E_t[w(t)(s_f - s_r)·∂x_t/∂θ]): the gradient on x_g is
    w(t) a_t (a_t / s_t²)(y_f - y_r). The paper leaves w(t) open; we take w(t) = s_t² / a_t², so the gradient is
    y_f - y_r in clean-estimate units: DMD's direction without DMD's per-sample normaliser. Same surrogate as DMD:
    0.5 · mean((x_g - sg(x_g - g))²), no backprop through the score networks."""

    name = "diff_instruct"

    def __call__(self, s: ScorePair) -> tuple[torch.Tensor, dict]:
        with torch.no_grad():
            grad = torch.nan_to_num(s.y_fake.float() - s.y_real.float())
        loss = 0.5 * F.mse_loss(s.x_g.float(), (s.x_g.float() - grad).detach())
        return loss, {"dm_grad_norm": grad.norm().detach()}


class FDistillLoss(GeneratorLoss):
    """f-distill (Xu et al. 2025; NVlabs/FastGen methods/distribution_matching/f_distill.py): DMD's gradient times
    h(r) = r² f''(r) per sample, r from the Diffusion-GAN head's logits at the same x_t (no gradient through r), h
    normalised to batch mean 1 (h / (mean h + 1e-6), as FastGen). Reverse KL has h ≡ 1: DMD exactly.
    Differs from FastGen: its default ratio_normalization also divides r by its batch mean within 10 t-bins
    before h; we do not (methods.md's line does not either). FastGen's discriminator reads the frozen teacher's
    features; ours is DMD2's head on the fake score's mid block (the trainer's existing Diffusion-GAN)."""

    name = "fdistill"
    needs_ratio = True

    def __init__(self, divergence: str = "js"):
        self.divergence = divergence

    def __call__(self, s: ScorePair) -> tuple[torch.Tensor, dict]:
        with torch.no_grad():
            r = density_ratio(s.logits)
            h = F_WEIGHTS[self.divergence](r)
            if self.divergence != "reverse_kl":  # h ≡ 1 is left exactly 1 (DMD's figures, bit for bit)
                h = h / (h.mean() + 1e-6)
            grad = _per_sample(h, s.x_g) * dmd_gradient(s.x_g.float(), s.y_real.float(), s.y_fake.float())
        loss = 0.5 * F.mse_loss(s.x_g.float(), (s.x_g.float() - grad).detach())
        return loss, {"dm_grad_norm": grad.norm().detach(), "ratio_mean": r.mean(), "h_max": h.max()}


def uni_instruct_loss(x_g, y_real, y_fake, sim_weight, di_weight) -> tuple[torch.Tensor, int]:
    """Σ_CHW [φ δ·(y_f - x_g) + ψ sg(‖δ‖ δ)·x_g] / ω per sample, δ = y_r - y_f, summed over the samples without NaN
    and divided by the whole batch (SiD-LSG's reduction). Autograd runs through y_r, y_f (the score networks'
    inputs) and x_g in the first term (SiD's loss at α = 1 when φ ≡ 1) and only into x_g in the second (its
    gradient on x_g is ψ ‖δ‖ δ / ω); φ, ψ are per-sample constants."""
    b, dims = x_g.shape[0], tuple(range(1, x_g.ndim))
    (x_g, y_real, y_fake, sim_weight, di_weight), omega, dropped = _kept_samples(x_g, y_real, y_fake, sim_weight,
                                                                                 di_weight)
    delta = y_real - y_fake
    d_sg = delta.detach()
    di_direction = d_sg * _per_sample(d_sg.flatten(1).norm(dim=1), d_sg)
    per_sample = (sim_weight.detach() * (delta * (y_fake - x_g)).sum(dim=dims)
                  + di_weight.detach() * (di_direction * x_g).sum(dim=dims)) / omega
    return per_sample.sum() / b, dropped


class UniInstructLoss(GeneratorLoss):
    """Uni-Instruct (arXiv 2505.20755), the estimator of its official code (a-little-hoof/Uni_Instruct,
    fsim_training/fsim_loss.py generator_share_encoder_loss and fsim_training_loop.py's divergence branches): the
    SIM/SiD branch δ·(y_f - x_g)/ω (SiD at α = 1, backprop through both score networks' inputs) weighted by
    φ(r) = r² f''(r), plus a Diff-Instruct branch whose gradient on x_g is ψ(r)‖δ‖δ/ω, ψ = -r² φ''(r) (nonzero for
    JS and squared Hellinger only); r is read from the discriminator with no gradient. So reverse KL (φ ≡ 1) is
    SiD's loss at α = 1 (with the GAN term: SiDA), forward KL is r times it. Where we differ from that code:
      - r = exp(logit) clamped as f-distill (density_ratio), which is D/(1-D) for D = σ(logit); the code applies
        the D/(1-D) formula (as -L/(1-L)) to its GAN loss value L, a BCE (-log σ(logit), reduced and rescaled),
        not to σ(logit);
      - φ and ψ are divided by sg(batch mean φ) (the code: batch sum for forward KL with variance_reduction, none
        for JS); reverse KL is left exact;
      - the DI branch uses each sample's ‖δ‖ and SiD's ω (the code: the L2 norm of the whole batch's δ and no ω);
      - Jeffreys is φ = 1 + r (the code mixes 0.4 r + 0.6); the GAN term is the trainer's, for every divergence
        (the code drops it for JS);
      - the code turns the divergence on after 200k images (plain SiD before); we use it from the first step.
    Our own derivation of the exact gradient (methods.md section 7: (φ - rφ')‖Δ‖² + 2φΔ·(a_t/s_t²)(y_f - x_g), with
    the gradient of the sampling distribution and through r) is a different estimator: it gives SiD at α = 0.5 for
    reverse KL where the official code has α = 1."""

    name = "uni_instruct"
    input_grad = True
    needs_ratio = True

    def __init__(self, divergence: str = "forward_kl"):
        self.divergence = divergence

    def __call__(self, s: ScorePair) -> tuple[torch.Tensor, dict]:
        with torch.no_grad():
            r = density_ratio(s.logits)
            phi = F_WEIGHTS[self.divergence](r)
            psi = F_DI_WEIGHTS[self.divergence](r)
            if self.divergence != "reverse_kl":
                norm = phi.mean() + 1e-6
                phi, psi = phi / norm, psi / norm
        loss, dropped = uni_instruct_loss(s.x_g, s.y_real, s.y_fake, phi, psi)
        return loss, {"nan_dropped": float(dropped), "ratio_mean": r.mean()}


class SIMLoss(GeneratorLoss):
    """Score Implicit Matching (Luo et al. 2024, arXiv 2410.16794): a distance d on the score gap, trained through
    the score-projection identity; the generator's loss is -d'(y_t)·(s_sg(u)(x_t) - ∇ log q_t(x_t|x_0)), with the
    gradient through x_t everywhere, d' included, and the fake score's parameters stopped. In y units (δ = y_r - y_f,
    s_f - ∇log q(x_t|x_g) ∝ y_f - x_g) with SiD's ω for the per-t factor, and a factor ½:
        l2:           d = ‖δ‖²,            d' = 2δ:   δ·(y_f - x_g) / ω  = SiD with α = 1 ("SiD is SIM with l2")
        pseudo_huber: d = √(‖δ‖² + c²) - c, d' = δ/√(‖δ‖² + c²):   ½ δ·(y_f - x_g) / (√(‖δ‖² + c²) ω)  (SIM's d)
    with c = sim_huber_c · √(C·H·W) (iCT's scaling). Differs from the paper: d is taken on δ (clean-estimate
    units) rather than on the score gap (a_t/s_t²)δ, so our c is c·a_t/s_t² in score units; the default 0.00054
    is iCT's (SIM's own constant was not retrievable: maple-research-lab/SIM publishes inference code only)."""

    name = "sim"
    input_grad = True

    def __init__(self, distance: str = "pseudo_huber", huber_c: float = 0.00054):
        self.distance, self.huber_c = distance, huber_c

    def __call__(self, s: ScorePair) -> tuple[torch.Tensor, dict]:
        if self.distance == "l2":
            loss, dropped = sid_loss(s.x_g, s.y_real, s.y_fake, 1.0)
            return loss, {"nan_dropped": float(dropped)}
        b, dims = s.x_g.shape[0], tuple(range(1, s.x_g.ndim))
        (x_g, y_real, y_fake), omega, dropped = _kept_samples(s.x_g, s.y_real, s.y_fake)
        c = self.huber_c * float(torch.tensor(x_g.shape[1:]).prod()) ** 0.5
        delta = y_real - y_fake
        root = ((delta ** 2).sum(dim=dims) + c ** 2).sqrt()
        per_sample = 0.5 * (delta * (y_fake - x_g)).sum(dim=dims) / root / omega
        return per_sample.sum() / b, {"nan_dropped": float(dropped)}


GENERATOR_LOSSES = ("dmd", "diff_instruct", "sid", "sim", "fdistill", "uni_instruct")
RATIO_LOSSES = ("fdistill", "uni_instruct")  # need a discriminator (--gan)
DIVERGENCE_LOSSES = RATIO_LOSSES
DEFAULT_DIVERGENCE = {"fdistill": "js", "uni_instruct": "forward_kl"}  # FastGen's default; the paper's best (IN-64)


def make_generator_loss(name: str, divergence: str | None = None, alpha: float = 1.0,
                        sim_distance: str | None = None, sim_huber_c: float = 0.00054) -> GeneratorLoss:
    """The family's member by its --generator_loss name."""
    if name == "dmd":
        return DMDLoss()
    if name == "diff_instruct":
        return DiffInstructLoss()
    if name == "sid":
        return SiDLoss(alpha)
    if name == "sim":
        return SIMLoss(sim_distance or "pseudo_huber", sim_huber_c)
    if name == "fdistill":
        return FDistillLoss(divergence or DEFAULT_DIVERGENCE[name])
    if name == "uni_instruct":
        return UniInstructLoss(divergence or DEFAULT_DIVERGENCE[name])
    raise ValueError(f"unknown generator loss {name!r}")
