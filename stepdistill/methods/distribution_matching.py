"""The distribution-matching family (DMD2, SiD, and kin): a generator G, a trainable fake score F (a full copy of the
teacher UNet, optionally carrying DMD2's GAN head on its mid-block features) and the frozen teacher as the real score.

What the family shares lives here: G's sampling over its step list with backward simulation / the uniform mixture
of steps, the two scores' clean estimates at one noisy point, F's denoising loss, the Diffusion-GAN head and
losses, and the loss slot. A method is the choice of generator loss (``GeneratorLoss``), of guidance (``Guidance``)
and of the phase schedule. methods.md §3 (DMD2) and §4 (SiD).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import TrainConfig, option
from ..errors import StepdistillError
from ..prompts import read_prompts
from ..teacher import Conditioning
from .base import DistillationMethod, ema_update

IMAGE_SOURCES = ("train_data_dir", "dataset_name", "train_shards")


# ----------------------------------------------------------------------------------------------------- config
@dataclass
class DistributionMatchingConfig(TrainConfig):
    """Options shared by the distribution-matching methods (generator, fake score, frozen teacher)."""

    fake_score_learning_rate: float | None = option(None, "learning rate of the fake score and its GAN head "
                                                          "(default: --learning_rate)")
    dfake_gen_update_ratio: int = option(1, "the fake score updates every iteration, the generator every N-th "
                                            "(two time-scale updates)")
    min_step: int = option(20, "lowest t at which the two scores are compared (DMD2 0.02 T, SiD t_min)")
    max_step: int = option(980, "highest t at which the two scores are compared (DMD2 0.98 T, SiD t_max)")
    gan: bool = option(False, "add the Diffusion-GAN loss: a classifier head on the fake score's mid-block "
                              "features, real images (needs an image source) against generated ones")
    gan_loss_weight_gen: float = option(1e-3, "weight of the generator's GAN loss (DMD2: 1e-3 SD1.5, 5e-3 SDXL)")
    gan_loss_weight_disc: float = option(1e-2, "weight of the discriminator's GAN loss in the fake score's loss")
    gan_start_step: int = option(0, "iteration from which the GAN losses count (DMD2's second stage)")
    diffusion_gan_max_timestep: int = option(1000, "real and generated latents are noised at t ~ U{0..this-1} "
                                                   "before the classifier sees them (Diffusion-GAN)")
    generator_ema_decay: float = option(0.0, "EMA of a full generator (0: off); the output and the validation "
                                             "grids then use the EMA weights")

    def image_sources(self) -> list[str]:
        return [k for k in IMAGE_SOURCES if getattr(self, k, None)]

    def validate(self) -> None:
        if self.dfake_gen_update_ratio < 1:
            raise StepdistillError(f"--dfake_gen_update_ratio {self.dfake_gen_update_ratio}: must be at least 1 "
                                   "(the generator updates every N-th iteration)")
        if not 0 <= self.min_step <= self.max_step < 1000:
            raise StepdistillError(f"--min_step {self.min_step} / --max_step {self.max_step}: need "
                                   "0 <= min_step <= max_step <= 999")
        if self.gan and not self.image_sources():
            raise StepdistillError("--gan needs real images: pass --train_data_dir, --dataset_name or "
                                   "--train_shards (the generator itself learns from prompts only)")
        if min(self.gan_loss_weight_gen, self.gan_loss_weight_disc) < 0 or self.gan_start_step < 0:
            raise StepdistillError("--gan_loss_weight_gen, --gan_loss_weight_disc and --gan_start_step must be "
                                   ">= 0")
        if not 1 <= self.diffusion_gan_max_timestep <= 1000:
            raise StepdistillError(f"--diffusion_gan_max_timestep {self.diffusion_gan_max_timestep}: must be in "
                                   "1..1000")
        if not 0 <= self.generator_ema_decay < 1:
            raise StepdistillError(f"--generator_ema_decay {self.generator_ema_decay}: must be in [0, 1)")
        if self.generator_ema_decay and self.use_lora:
            raise StepdistillError("--generator_ema_decay needs a full generator (--use_lora false)")


def check_timesteps(name: str, steps: list[int]) -> None:
    """Generator timesteps: integers in 1..999, strictly decreasing (the order the sampler visits them)."""
    if not steps:
        raise StepdistillError(f"--{name}: give at least one timestep, e.g. 999,749,499,249")
    bad = [t for t in steps if not 0 < t < 1000]
    if bad:
        raise StepdistillError(f"--{name} {','.join(map(str, steps))}: timesteps {bad} are outside 1..999")
    if any(b >= a for a, b in zip(steps, steps[1:])):
        raise StepdistillError(f"--{name} {','.join(map(str, steps))}: timesteps must be strictly decreasing, "
                               "e.g. 999,749,499,249")


# ----------------------------------------------------------------------------------------------------- guidance
@dataclass(frozen=True)
class Guidance:
    """Which classifier-free guidance (Imagen convention, 1 = none) each score gets, in SiD-LSG's terms."""

    real: float = 1.0  # teacher in the generator loss (DMD2 real_guidance_scale; SiD κ4)
    fake: float = 1.0  # fake score in the generator loss (SiD κ2 = κ3; DMD2 asserts 1)
    fake_train: float = 1.0  # fake score in its own denoising loss (SiD κ1)
    fake_text: bool = True  # False: the fake score only ever sees the empty prompt (Zero-CFG)
    fake_text_dropout: float = 0.0  # share of empty prompts when F trains (SiD: 10 % when κ1 or κ2 ≠ 1)


# ----------------------------------------------------------------------------------------------------- loss slot
@dataclass
class ScorePair:
    """What a generator loss of the family reads: the generator's sample x_g, the noisy point x_t = a_t x_g + s_t ε
    at t, and the real (teacher) and fake scores' clean estimates there."""

    x_g: torch.Tensor
    x_t: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    y_real: torch.Tensor
    y_fake: torch.Tensor


class GeneratorLoss:
    """The loss slot. The machinery computes a ``ScorePair`` and the loss turns it into a scalar.

    ``input_grad``: whether y_real / y_fake must carry gradients into x_t (SiD, SIM) or are constants (DMD,
    Diff-Instruct, f-distill). Other members of the family are new subclasses: Diff-Instruct weights
    (ε_fake - ε_real) per t; SIM replaces SiD's inner product with a distance; the f-divergence weightings
    (f-distill, Uni-Instruct) scale DMD's gradient by h(r) of the discriminator's density ratio r = exp(logit),
    which the machinery can add to the ScorePair from the GAN head at x_t.
    """

    name: ClassVar[str]
    input_grad: ClassVar[bool] = False

    def __call__(self, s: ScorePair) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError


def dmd_gradient(x: torch.Tensor, y_real: torch.Tensor, y_fake: torch.Tensor) -> torch.Tensor:
    """DMD2's distribution-matching gradient (sd_guidance.py): (p_fake - p_real) / mean_CHW|x - p_real| per
    sample, NaN set to 0."""
    dims = tuple(range(1, x.ndim))
    grad = (y_fake - y_real) / (x - y_real).abs().mean(dim=dims, keepdim=True)
    return torch.nan_to_num(grad)


class DMDLoss(GeneratorLoss):
    """L_DM = 0.5 · mean((x̂ - sg(x̂ - g))²): its gradient in x̂ is g / numel (methods.md §3)."""

    name = "dm"

    def __call__(self, s: ScorePair) -> tuple[torch.Tensor, dict]:
        with torch.no_grad():
            grad = dmd_gradient(s.x_g.float(), s.y_real.float(), s.y_fake.float())
        loss = 0.5 * F.mse_loss(s.x_g.float(), (s.x_g.float() - grad).detach())
        return loss, {"dm_grad_norm": grad.norm().detach()}


def sid_loss(x_g: torch.Tensor, y_real: torch.Tensor, y_fake: torch.Tensor, alpha: float) -> tuple[torch.Tensor, int]:
    """SiD's generator loss (methods.md §4): Σ_CHW (y_r - y_f)·((y_r - x_g) - α (y_r - y_f)) / ω with
    ω = sg(mean_CHW|x_g - y_r|).clip(1e-5), summed over the samples without NaN and divided by the whole batch
    (as the official loop does). Returns the loss and the number of samples dropped."""
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


# ----------------------------------------------------------------------------------------------------- GAN head
class GANHead(nn.Sequential):
    """DMD2's classifier on the fake score's mid-block output (sd_guidance.py cls_pred_branch):
    [Conv4×4 s2 → GroupNorm → SiLU] while the map is larger than 4×4 (once on SD1.5's 8×8, three times on SDXL's
    32×32), then a conv covering the whole map (the paper's 4×4 s4 on a 4×4 map; 2×2 on a tiny UNet) → GroupNorm →
    SiLU → Conv1×1 → one logit per sample. GroupNorm keeps 32 groups on wide maps (1280 channels: 40 per group)
    but at least 16 channels per group on narrow ones: on the 1×1 map a one-channel group normalises to 0."""

    def __init__(self, channels: int, size: int):
        groups = math.gcd(channels, min(32, max(1, channels // 16)))
        layers: list[nn.Module] = []
        while size > 4:
            layers += [nn.Conv2d(channels, channels, 4, stride=2, padding=1), nn.GroupNorm(groups, channels),
                       nn.SiLU()]
            size = (size - 2) // 2 + 1
        layers += [nn.Conv2d(channels, channels, size, stride=size), nn.GroupNorm(groups, channels), nn.SiLU(),
                   nn.Conv2d(channels, 1, 1)]
        super().__init__(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return super().forward(features).flatten()


class _MidBlockReached(Exception):
    def __init__(self, features: torch.Tensor):
        super().__init__("mid-block output")
        self.features = features


class FakeScore(nn.Module):
    """F: a full trainable copy of the teacher UNet, plus the GAN head when the GAN is on, as ONE module so that
    one optimiser (and one DDP wrapper) trains both. ``forward(..., classify=True)`` runs the UNet only up to its
    mid block (a forward hook stops it there, as DMD2's classify_forward does) and returns the head's logits."""

    def __init__(self, unet: nn.Module, head: GANHead | None = None):
        super().__init__()
        self.unet = unet
        self.head = head
        self._classifying = False
        unet.mid_block.register_forward_hook(self._stop_at_mid_block)

    def _stop_at_mid_block(self, module, args, output):
        if self._classifying:
            raise _MidBlockReached(output)

    def forward(self, sample, timestep, *args, classify: bool = False, **kwargs):
        if not classify:
            return self.unet(sample, timestep, *args, **kwargs)
        kwargs["return_dict"] = False
        self._classifying = True
        try:
            self.unet(sample, timestep, *args, **kwargs)
            raise RuntimeError("the UNet never reached its mid block")
        except _MidBlockReached as reached:
            features = reached.features
        finally:
            self._classifying = False
        return self.head(features.float())

    def enable_gradient_checkpointing(self):
        self.unet.enable_gradient_checkpointing()


def _where(mask: torch.Tensor, a: Conditioning, b: Conditioning) -> Conditioning:
    """Per sample: ``a`` where mask, else ``b``."""
    def pick(x, y):
        if x is None:
            return None
        return torch.where(mask.to(x.device).view(-1, *([1] * (x.ndim - 1))), x, y)

    return Conditioning(pick(a.prompt_embeds, b.prompt_embeds),
                        pick(a.pooled_prompt_embeds, b.pooled_prompt_embeds), pick(a.add_time_ids, b.add_time_ids))


# ----------------------------------------------------------------------------------------------------- machinery
class DistributionMatching(DistillationMethod):
    """Generator / fake score / teacher. Subclasses set ``generator_loss``, ``guidance``, ``generator_timesteps``,
    ``init_noise_scale`` and ``phases``."""

    student_name = "generator"
    share_sample_across_phases: ClassVar[bool] = False  # DMD2: F trains on the very samples G's turn made
    fake_loss_reduction: ClassVar[str] = "mean"  # "sum": over C·H·W, then the batch mean (SiD's code)
    generator_loss: GeneratorLoss
    guidance: Guidance
    generator_timesteps: list[int]
    init_noise_scale: float = 1.0  # x at the first step = scale · z (DMD2: pure noise; SiD: √(1-ᾱ_t_init))

    @classmethod
    def requires_images(cls, config) -> bool:
        return bool(config.gan)

    # ------------------------------------------------------------------ networks
    def build(self) -> None:
        c, teacher = self.config, self.teacher
        # F first: a LoRA generator is added onto the teacher's UNet in place and must not be copied into F
        fake_unet = copy.deepcopy(teacher.unet).requires_grad_(True)
        head = None
        if c.gan:
            channels = int(fake_unet.config.block_out_channels[-1])
            latent = c.resolution // teacher.vae_scale_factor
            size = latent // 2 ** (len(fake_unet.config.block_out_channels) - 1)
            head = GANHead(channels, size).to(teacher.device)
        self.networks["fake_score"] = FakeScore(fake_unet, head)
        self.networks["generator"] = self.make_student()
        self.ema = None
        if c.generator_ema_decay:
            self.ema = copy.deepcopy(self.networks["generator"]).requires_grad_(False)
        self._shared_samples: dict[int, tuple[torch.Tensor, int]] = {}  # iteration → G's sample, for F's turn
        self.prompts = None
        if c.prompts_file and c.image_sources():  # images feed the GAN; the generator's prompts come from the file
            self.prompts = read_prompts(c.prompts_file)
            for i in range(0, min(len(self.prompts), 20_000), 256):
                teacher.encode_prompt(self.prompts[i:i + 256], c.resolution)

    def learning_rate(self, name: str) -> float:
        if name == "fake_score" and self.config.fake_score_learning_rate is not None:
            return self.config.fake_score_learning_rate
        return self.config.learning_rate

    def student_unet(self):
        return self.ema if self.ema is not None else self.networks["generator"]

    def _distributed(self, name: str) -> bool:
        return self.net(name) is not self.networks[name]

    # ------------------------------------------------------------------ EMA
    def after_update(self, phase, step):
        if phase == "generator" and self.ema is not None:
            decay = min(self.config.generator_ema_decay, (1 + step) / (10 + step))
            ema_update(self.ema, self.networks["generator"], decay)

    def ema_copies(self):
        return {"generator_ema": self.ema} if self.ema is not None else {}

    # ------------------------------------------------------------------ pieces
    def uncond(self, b: int) -> Conditioning:
        return self.teacher.uncond(b, self.config.resolution).to(self.teacher.device)

    def sample_rng(self, rng, phase: str):
        return rng.stream("sample" if self.share_sample_across_phases else f"sample/{phase}")

    def generation_prompts(self, batch, rng) -> list[str]:
        if self.prompts is None:
            return list(batch["prompts"])
        idx = rng.randint(0, len(self.prompts), len(batch["prompts"]))
        return [self.prompts[i] for i in idx.tolist()]

    def phases(self, step: int) -> list[str]:
        """F every iteration, G every dfake_gen_update_ratio-th (DMD2 train_sd.py: COMPUTE_GENERATOR_GRADIENT = step %
        ratio == 0; SiD's official loop: ratio 1). DMD2's F trains on the sample of G's turn, so G goes first there;
        SiD updates F, then G."""
        if step % self.config.dfake_gen_update_ratio:
            return ["fake_score"]
        return ["generator", "fake_score"] if self.share_sample_across_phases else ["fake_score", "generator"]

    def gan_active(self, step: int) -> bool:
        return self.config.gan and step >= self.config.gan_start_step

    def generator_x0(self, unet, x: torch.Tensor, t: int, cond: Conditioning) -> torch.Tensor:
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        return self.teacher.to_x0(self.teacher.predict(x, tt, cond, unet=unet), x, tt)

    def generate(self, cond: Conditioning, rng, grad: bool, depth: int | None = None) -> tuple[torch.Tensor, int]:
        """G's sample after a random number of its steps: DMD2's backward simulation, few-step SiD's uniform
        mixture (methods.md §3, §4). The depth is drawn identically on every process; the first ``depth`` steps
        run without gradient from fresh noise, each x0 re-noised with NEW noise to the next step (correlated noise
        here causes artifacts, DMD2 issues 9, 61); the last step keeps the gradient when ``grad``."""
        steps = self.generator_timesteps
        if depth is None:
            depth = rng.shared_randint(0, len(steps)) if len(steps) > 1 else 0
        teacher, b = self.teacher, len(cond)
        latent = self.config.resolution // teacher.vae_scale_factor
        z = rng.randn(b, int(teacher.unet.config.in_channels), latent, latent, dtype=teacher.dtype)
        x = self.init_noise_scale * z.to(teacher.device)
        plain = self.networks["generator"]
        with torch.no_grad():
            for i in range(depth):
                x0 = self.generator_x0(plain, x, steps[i], cond)
                nxt = torch.full((b,), steps[i + 1], dtype=torch.long)
                x = teacher.add_noise(x0, rng.randn_like(x0), nxt)
        with torch.set_grad_enabled(grad):
            x0 = self.generator_x0(self.net("generator") if grad else plain, x, steps[depth], cond)
        return x0, depth

    def fake_conditioning(self, cond: Conditioning, rng) -> Conditioning:
        """F's text in its own loss: none under Zero-CFG, else the prompt with SiD's 10 % empty-prompt dropout."""
        g, b = self.guidance, len(cond)
        if not g.fake_text:
            return self.uncond(b)
        if g.fake_text_dropout > 0:
            drop = rng.rand(b) < g.fake_text_dropout
            return _where(drop, self.uncond(b), cond)
        return cond

    def real_x0(self, x_t, t, cond) -> torch.Tensor:
        """The teacher's guided clean estimate (real score). With a LoRA generator the teacher is the same UNet with
        its adapters off, so it is not held twice."""
        teacher, g = self.teacher, self.guidance
        with self.teacher_mode() as unet:
            # non-reentrant checkpointing would recompute this forward in backward with the adapters back ON
            pause = torch.is_grad_enabled() and getattr(unet, "is_gradient_checkpointing", False)
            if pause:
                unet.disable_gradient_checkpointing()
            try:
                out = teacher.guided_predict(x_t, t, cond, g.real, uncond=self.uncond(len(cond)), unet=unet)
            finally:
                if pause:
                    unet.enable_gradient_checkpointing()
        return teacher.to_x0(out, x_t, t)

    def fake_x0(self, x_t, t, cond) -> torch.Tensor:
        g = self.guidance
        cond = cond if g.fake_text else self.uncond(len(cond))
        out = self.teacher.guided_predict(x_t, t, cond, g.fake, uncond=self.uncond(len(cond)),
                                          unet=self.networks["fake_score"])
        return self.teacher.to_x0(out, x_t, t)

    def discriminate(self, fake_score, latents: torch.Tensor, cond: Conditioning, rng) -> torch.Tensor:
        """The GAN head's logits on latents noised at t ~ U{0..diffusion_gan_max_timestep-1} (Diffusion-GAN)."""
        b = latents.shape[0]
        t = rng.randint(0, self.config.diffusion_gan_max_timestep, b).to(latents.device)
        x_t = self.teacher.add_noise(latents, rng.randn_like(latents), t)
        cond = cond if self.guidance.fake_text else self.uncond(b)
        return fake_score(x_t, t, **cond.unet_kwargs(), classify=True)

    # ------------------------------------------------------------------ losses
    def loss(self, phase, batch, rng, step):
        if phase == "generator":
            return self.generator_phase(batch, rng, step)
        return self.fake_score_phase(batch, rng, step)

    def generator_phase(self, batch, rng, step):
        """G's loss: the slot's loss at x_t = a_t x_g + s_t ε, t ~ U{min_step..max_step}, plus w_g softplus(-D(x_g))
        once the GAN is on (gradient through F into x_g; the loop keeps F's own gradients out)."""
        c, teacher = self.config, self.teacher
        sample_rng, own = self.sample_rng(rng, "generator"), rng.stream("generator")
        cond = self.conditioning(self.generation_prompts(batch, sample_rng))
        x_g, depth = self.generate(cond, sample_rng, grad=True)
        if self.share_sample_across_phases:
            self._shared_samples[rng.iteration] = (x_g.detach(), depth)
        b = x_g.shape[0]
        t = own.randint(c.min_step, c.max_step + 1, b).to(x_g.device)
        noise = own.randn_like(x_g)
        x_t = teacher.add_noise(x_g, noise, t)
        with torch.set_grad_enabled(self.generator_loss.input_grad):
            y_real = self.real_x0(x_t, t, cond)
            y_fake = self.fake_x0(x_t, t, cond)
        loss, logs = self.generator_loss(ScorePair(x_g, x_t, t, noise, y_real, y_fake))
        logs = {f"loss_{self.generator_loss.name}": loss.detach(), "depth": float(depth), **logs}
        if self.gan_active(step):
            logits = self.discriminate(self.networks["fake_score"], x_g, cond, own)
            gan = F.softplus(-logits).mean()
            loss = loss + c.gan_loss_weight_gen * gan
            logs["loss_gan_gen"] = gan.detach()
        return loss, logs

    def fake_timestep_range(self) -> tuple[int, int]:
        return self.config.min_step, self.config.max_step

    def fake_score_phase(self, batch, rng, step):
        """F's denoising loss on sg(x_g) (ε-MSE at guidance κ1; for a v-prediction teacher this equals SiD's
        SNR-weighted v-loss), plus w_d [softplus(D(fake)) + softplus(-D(real))] once the GAN is on."""
        c, teacher = self.config, self.teacher
        sample_rng, own = self.sample_rng(rng, "fake_score"), rng.stream("fake_score")
        cond = self.conditioning(self.generation_prompts(batch, sample_rng))
        shared = self._shared_samples.pop(rng.iteration, None)  # DMD2: the generator's turn made it (detached)
        x_g, depth = shared if shared is not None else self.generate(cond, sample_rng, grad=False)
        b = x_g.shape[0]
        lo, hi = self.fake_timestep_range()
        t = own.randint(lo, hi + 1, b).to(x_g.device)
        noise = own.randn_like(x_g)
        x_t = teacher.add_noise(x_g, noise, t)
        fake = self.net("fake_score")
        out = teacher.guided_predict(x_t, t, self.fake_conditioning(cond, own), self.guidance.fake_train,
                                     uncond=self.uncond(b), unet=fake)
        err = (teacher.to_eps(out, x_t, t).float() - noise.float()) ** 2
        finite = err.flatten(1).isfinite().all(1)  # SiD drops samples with NaN
        err = err[finite]
        loss = err.mean() if self.fake_loss_reduction == "mean" else err.sum() / b
        logs = {"loss_fake": loss.detach()}
        if self.gan_active(step):
            real = self.clean_latents(batch, own)
            real_cond = self.conditioning(batch["prompts"])
            logits = self.discriminate(fake, torch.cat([real, x_g]), Conditioning.cat([real_cond, cond]), own)
            d_real, d_fake = logits[:b], logits[b:]
            disc = F.softplus(d_fake).mean() + F.softplus(-d_real).mean()
            loss = loss + c.gan_loss_weight_disc * disc
            logs.update(loss_gan_disc=disc.detach(), d_real=torch.sigmoid(d_real).mean().detach(),
                        d_fake=torch.sigmoid(d_fake).mean().detach())
        elif c.gan and self._distributed("fake_score"):
            # before the GAN starts the head still needs a (zero) gradient, or DDP waits for it forever
            loss = loss + 0.0 * self.discriminate(fake, x_g[:1], cond[:1], own).sum()
        return loss, logs
