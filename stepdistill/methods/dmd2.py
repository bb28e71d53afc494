"""DMD2 (Yin et al. 2024, "Improved Distribution Matching Distillation"; official code tianweiy/DMD2).

Algorithm, one iteration (train_sd.py, sd_unified_model.py, sd_guidance.py):
  1. every dfake_gen_update_ratio-th iteration, the generator's turn: x̂ = G(z) (multi-step: backward simulation
     over a random number of its own steps), t ~ U{min_step..max_step}, x_t = a_t x̂ + s_t ε;
     L_G = DMD loss of (teacher at CFG real_guidance_scale, fake score without CFG) at x_t  [DMDLoss]
           + w_g softplus(-D(x̂))                                                          [with --gan]
  2. every iteration, the fake score's turn, on the SAME x̂ when the generator ran (one sample per iteration),
     else a fresh one: ε-matching denoising loss (mean) at t ~ U{0..999}, no CFG
           + w_d [softplus(D(fake)) + softplus(-D(real))]                                 [with --gan]
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import option
from ..errors import StepdistillError
from ..recipe import Recipe
from .base import PhaseContext, PhaseOutput
from .distribution_matching import DistributionMatching, DistributionMatchingConfig, Guidance, check_timesteps
from .losses import DenoisingLoss


@dataclass
class DMD2Config(DistributionMatchingConfig):
    """DMD2: distribution matching distillation with two time-scale updates, Diffusion-GAN and backward
    simulation. Guidance uses the Imagen convention (1 = none). Official recipes (train_sd.py): SD1.5 a full
    generator at lr 1e-5; SDXL LoRA rank 64, alpha 8 (scale 1/8) at lr 5e-5."""

    real_guidance_scale: float = option(1.75, "teacher CFG in the distribution-matching loss (SD1.5 1.75, SDXL 8)")
    dfake_gen_update_ratio: int = option(10, "the fake score updates every iteration, the generator every N-th "
                                             "(SD1.5 10, SDXL 5)")
    conditioning_timestep: int = option(999, "timestep of a one-step generator fed pure noise (SDXL one-step: 399)")
    denoising_timesteps: list[int] = option([], "timesteps of a multi-step generator, e.g. 999,749,499,249, trained "
                                           "with backward simulation; empty: one step at --conditioning_timestep")
    learning_rate: float = option(1e-5, "learning rate of the generator (SD1.5 1e-5; SDXL LoRA 5e-5)")
    adam_weight_decay: float = option(0.01, "AdamW weight decay")
    max_grad_norm: float = option(10.0, "gradient clipping norm")

    def validate(self) -> None:
        super().validate()
        if self.real_guidance_scale < 0:
            raise StepdistillError(f"--real_guidance_scale {self.real_guidance_scale}: must be >= 0 (Imagen "
                                   "convention: 1 is no guidance, 0 the unconditional score)")
        if self.denoising_timesteps:
            check_timesteps("denoising_timesteps", self.denoising_timesteps)
        else:
            check_timesteps("conditioning_timestep", [self.conditioning_timestep])
        if not (self.prompts_file or self.image_sources()):
            raise StepdistillError("DMD2 needs prompts: pass --prompts_file, or an image source whose captions "
                                   "serve as prompts")


class DMD2(DistributionMatching):
    name = "dmd2"
    config_class = DMD2Config
    denoising_loss = DenoisingLoss("mean")  # sd_guidance.py compute_loss_fake: mean squared ε error

    def build(self) -> None:
        c = self.config
        self.generator_timesteps = c.denoising_timesteps or [c.conditioning_timestep]
        self.init_noise_scale = 1.0  # pure noise at the first step (DMD2's pure_noise_mask)
        self.guidance = Guidance(real=c.real_guidance_scale)  # the fake score never sees CFG
        self.generator_loss = c.make_generator_loss()  # dmd by default: DMDLoss, DMD2's own
        super().build()

    def phases(self, step: int) -> list[str]:
        """G first, so that F trains on the very sample G's turn made (train_sd.py)."""
        return ["generator", "fake_score"] if self.generator_updates(step) else ["fake_score"]

    def loss(self, ctx: PhaseContext) -> PhaseOutput:
        sample_rng = ctx.iteration_rng.stream("sample")  # one sample per iteration, whichever phase draws it
        if ctx.phase == "generator":
            return self.generator_turn(ctx, sample_rng)
        if "generator_sample" in ctx.received:
            x_g, cond = ctx.received["generator_sample"]
        else:
            x_g, cond, _ = self.draw_sample(ctx.batch, sample_rng)
        # the fake score's denoising loss over the whole schedule, t ~ U{0..999} (sd_guidance.py)
        return self.fake_score_turn(ctx, x_g, cond, (0, self.teacher.num_train_timesteps - 1))

    def recipe(self) -> Recipe:
        steps = list(self.generator_timesteps)
        return self.student_recipe(
            scheduler="LCMScheduler",
            # every integer t is an LCM "training" timestep, so custom timesteps raise no warning
            scheduler_kwargs={"original_inference_steps": self.teacher.num_train_timesteps},
            num_inference_steps=len(steps), timesteps=steps, guidance_scale=1.0,
        )
