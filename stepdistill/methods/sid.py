"""Score identity Distillation, one- and few-step, with long-and-short guidance and the Zero-/Anti-CFG presets
(Zhou et al. 2024, SiD and SiD-LSG; few-step SiD; official code mingyuanzhou/SiD-LSG). Data-free: the generator
learns from prompts only; real images serve only the optional Diffusion-GAN (SiDA).

Algorithm, one iteration (SiD-LSG's training loop):
  1. the fake score's turn, on its own fresh sample x_g = G(x_in) (few-step: the uniform mixture of steps):
     t ~ U{min_step..max_step}; ε-matching loss of F at CFG κ1, summed over C·H·W, batch mean
     (10 % empty prompts when κ1 or κ2 ≠ 1, emptied before G samples: sid_training_loop.py,
     use_context_dropout_train_fake; the generator's turn keeps every prompt) [+ GAN disc. with --gan]
  2. every dfake_gen_update_ratio-th iteration (official: every one), the generator's turn on another fresh
     sample: L_G = SiD loss (SiD eq. 21) of (teacher at κ4, F at κ2 = κ3), autograd THROUGH both scores into
     x_t                                                                                   [+ GAN gen. with --gan]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import option
from ..errors import StepdistillError
from ..recipe import Recipe
from .base import PhaseContext, PhaseOutput
from .distribution_matching import DistributionMatching, DistributionMatchingConfig, Guidance, check_timesteps
from .losses import DenoisingLoss

LSG_DEFAULT = 1.5  # SiD-LSG SD1.5 one step: κ = 1.5 gives FID 8.15
ANTI_CFG_DEFAULT = -0.5  # a first guess: our references name Anti-CFG (negative CFG in F) but give no value


def sid_timesteps(init_timestep: int, num_steps: int) -> list[int]:
    """t_i = t_init (1 - i/K), truncated as the official sampler's long cast: 625, 468, 312, 156 for K = 4."""
    return [int(init_timestep * (1 - i / num_steps)) for i in range(num_steps)]


@dataclass
class SiDConfig(DistributionMatchingConfig):
    """Score identity Distillation (SiD, SiD-LSG, few-step SiD). Guidance uses the Imagen convention (1 = none).
    SiD-LSG trains the full generator (it has no LoRA recipe)."""

    generator_loss: str = option("sid", "the generator's loss, a member of the distribution-matching family (README "
                                        "'The distribution-matching family'): sid, sim, uni_instruct (needs --gan), "
                                        "dmd, diff_instruct, fdistill (needs --gan)",
                                 choices=("dmd", "diff_instruct", "sid", "sim", "fdistill", "uni_instruct"))
    init_timestep: int = option(625, "t_init: the generator's first (for one step, only) timestep")
    init_noise: str = option("scaled", "scaled: the first input is √(1-ᾱ_t_init)·z as in the paper (a stock "
                                       "pipeline then needs latents scaled by the recipe's init_noise_scale); unit: "
                                       "z itself, which a stock pipeline with the recipe reproduces exactly",
                             choices=("scaled", "unit"))
    num_steps: int = option(1, "K of few-step SiD: steps t_i = t_init (1 - i/K) with fresh noise; each iteration "
                               "trains step k ~ U{1..K} on the detached first k-1")
    guidance_preset: str = option("lsg", "lsg: the scales κ1..κ4 below; zero_cfg: no CFG in the teacher and no "
                                         "text in the fake score; anti_cfg: no CFG in the teacher, negative CFG "
                                         "(κ2 = κ3) in the fake score", choices=("lsg", "zero_cfg", "anti_cfg"))
    guidance_scale: float | None = option(None, f"one long-and-short guidance scale for κ1..κ4 (default "
                                                f"{LSG_DEFAULT})")
    kappa1: float | None = option(None, "κ1: CFG of the fake score in its own denoising loss")
    kappa2: float | None = option(None, "κ2: CFG of the fake score in the generator loss (must equal κ3)")
    kappa3: float | None = option(None, "κ3: CFG of the fake score in the generator loss (must equal κ2)")
    kappa4: float | None = option(None, "κ4: CFG of the teacher in the generator loss")
    text_dropout_placement: str = option(
        "generator", "where the 10 % empty prompts go (when κ1 or κ2 ≠ 1) in the fake score's turn: generator, as "
                     "SiD-LSG: before the generator samples, so the fake score learns G's empty-prompt samples under "
                     "the empty prompt; fake_score: G samples from every prompt and only the fake score's text is "
                     "emptied", choices=("generator", "fake_score"))
    learning_rate: float = option(1e-6, "learning rate of both networks (paper: 1e-6 one step, 5e-6 few steps)")
    adam_beta1: float = option(0.0, "Adam beta1 (SiD: 0)")
    max_grad_norm: float = option(0.0, "gradient clipping norm (SiD: none)")

    def kappas(self) -> tuple[float, float, float, float]:
        given = [self.kappa1, self.kappa2, self.kappa3, self.kappa4]
        if self.guidance_preset == "zero_cfg":
            return 1.0, 1.0, 1.0, 1.0
        if self.guidance_preset == "anti_cfg":
            k1, k2, k3, k4 = given
            k2 = k2 if k2 is not None else k3 if k3 is not None else ANTI_CFG_DEFAULT
            k3 = k3 if k3 is not None else k2
            return (1.0 if k1 is None else k1), k2, k3, (1.0 if k4 is None else k4)
        scale = LSG_DEFAULT if self.guidance_scale is None else self.guidance_scale
        return tuple(scale if k is None else k for k in given)

    def validate(self) -> None:
        super().validate()
        if self.image_sources() and not self.prompts_file:
            raise StepdistillError("SiD is data-free: pass --prompts_file (one prompt per line); an image dataset "
                                   "serves only the optional --gan")
        if not self.prompts_file:
            raise StepdistillError("SiD is data-free: pass --prompts_file (one prompt per line)")
        if self.image_sources() and not self.gan:
            raise StepdistillError("SiD uses real images only for --gan: pass --gan or drop the image source")
        if self.num_steps < 1:
            raise StepdistillError(f"--num_steps {self.num_steps}: must be at least 1")
        if not 0 < self.init_timestep < 1000:
            raise StepdistillError(f"--init_timestep {self.init_timestep}: must be in 1..999")
        check_timesteps("init_timestep/--num_steps", sid_timesteps(self.init_timestep, self.num_steps))
        if self.guidance_preset == "zero_cfg" and any(
                v is not None for v in (self.guidance_scale, self.kappa1, self.kappa2, self.kappa3, self.kappa4)):
            raise StepdistillError("--guidance_preset zero_cfg sets every scale to 1: drop --guidance_scale and "
                                   "--kappa1..4")
        if self.guidance_preset == "anti_cfg" and self.guidance_scale is not None:
            raise StepdistillError("--guidance_preset anti_cfg takes --kappa1..4, not --guidance_scale")
        k1, k2, k3, k4 = self.kappas()
        if k2 != k3:
            raise StepdistillError(f"--kappa2 {k2} and --kappa3 {k3} must be equal (the fake score is evaluated "
                                   "once in the generator loss)")
        if self.guidance_preset == "anti_cfg":
            if k2 >= 0:
                raise StepdistillError(f"--guidance_preset anti_cfg: κ2 = κ3 = {k2} must be negative")
            if min(k1, k4) < 0:
                raise StepdistillError(f"--guidance_preset anti_cfg: κ1 = {k1} and κ4 = {k4} must be >= 0")
        elif min(k1, k2, k3, k4) < 0:
            raise StepdistillError(f"guidance scales κ1..κ4 = {k1}, {k2}, {k3}, {k4}: negative scales make sense "
                                   "only as --guidance_preset anti_cfg")


class SiD(DistributionMatching):
    name = "sid"
    config_class = SiDConfig
    denoising_loss = DenoisingLoss("sum")  # the official loop sums over C·H·W and averages over the batch

    def build(self) -> None:
        c = self.config
        self.generator_timesteps = sid_timesteps(c.init_timestep, c.num_steps)
        sigma = float(self.teacher.alpha_sigma(torch.tensor([c.init_timestep]), torch.zeros(1))[1])
        self.init_noise_scale = sigma if c.init_noise == "scaled" else 1.0
        k1, k2, _, k4 = c.kappas()
        zero = c.guidance_preset == "zero_cfg"
        dropout = 0.1 if (k1 != 1 or k2 != 1) else 0.0  # sid_training_loop.py: cfg_train_fake or cfg_eval_fake ≠ 1
        before_sampling = c.text_dropout_placement == "generator"
        self.sample_text_dropout = dropout if before_sampling else 0.0
        self.guidance = Guidance(real=k4, fake=k2, fake_train=k1, fake_text=not zero,
                                 fake_text_dropout=0.0 if before_sampling else dropout)
        self.generator_loss = c.make_generator_loss()  # sid by default: SiDLoss(α), SiD's own
        super().build()

    def phases(self, step: int) -> list[str]:
        """F, then G (the official loop updates both every iteration: ratio 1)."""
        return ["fake_score", "generator"] if self.generator_updates(step) else ["fake_score"]

    def loss(self, ctx: PhaseContext) -> PhaseOutput:
        sample_rng = ctx.iteration_rng.stream(f"sample/{ctx.phase}")  # each turn draws its own sample
        if ctx.phase == "generator":
            return self.generator_turn(ctx, sample_rng)
        drop = None
        if self.sample_text_dropout:  # its own stream: t and noise stay those of the other placement
            rng = ctx.iteration_rng.stream("text_dropout/fake_score")
            drop = rng.rand(len(ctx.batch["prompts"])) < self.sample_text_dropout
        x_g, cond, _ = self.draw_sample(ctx.batch, sample_rng, drop=drop)
        c = self.config
        return self.fake_score_turn(ctx, x_g, cond, (c.min_step, c.max_step))  # t ~ U{t_min..t_max}, as G's

    def recipe(self) -> Recipe:
        c, steps = self.config, list(self.generator_timesteps)
        note = ("a stock call starts from unit noise, which is what this generator was trained on"
                if c.init_noise == "unit" else
                "trained on first inputs √(1-ᾱ_t_init)·z: pass latents = init_noise_scale · randn to reproduce the "
                "training sampler exactly (a stock call starts from unit noise)")
        return self.student_recipe(
            scheduler="LCMScheduler",
            # LCM's multistep sampling re-noises each x0 with fresh noise: few-step SiD's sampler
            scheduler_kwargs={"original_inference_steps": self.teacher.num_train_timesteps},
            num_inference_steps=len(steps), timesteps=steps, guidance_scale=1.0,
            extra={"init_noise": c.init_noise, "init_noise_scale": self.init_noise_scale, "note": note},
        )
