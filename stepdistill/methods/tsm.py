"""Teacher score matching (TSM): a student of its own (smaller) shape regresses the frozen teacher's prediction on
noised real data, the first of the three stages of MSD's smaller students (Song et al. 2024, "Multi-student Diffusion
Distillation", arXiv 2410.23274, section 3.3: TSM → DM → ADM). It makes the randomly initialised student a
diffusion model close to the teacher, from which distribution matching starts stably.

One iteration: z0 from the batch's images (VAE posterior sample), t ~ U{0..T-1}, x_t = a_t z0 + s_t ε; the prompt is
dropped to "" with probability ``prompt_dropout`` (the student learns the unconditional score too, as the teacher
has it); L = mean ‖s(x_t, t, c) − sg(teacher_w(x_t, t, c))‖², both in the teacher's prediction type, the target at
CFG ``tsm_guidance_scale`` (1: the teacher itself, what a full-size student starts from).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import TrainConfig, option
from ..errors import StepdistillError
from ..recipe import Recipe
from ..students import StudentShapeOptions, build_student_unet, check_student_options
from .base import DistillationMethod, PhaseContext, PhaseOutput


@dataclass
class TSMConfig(TrainConfig, StudentShapeOptions):
    """Teacher score matching: a student of another shape regresses the teacher's predictions on noised images."""

    use_lora: bool = option(False, "TSM trains a full student of its own shape (must stay false)")
    tsm_guidance_scale: float = option(1.0, "CFG of the teacher's target (1: the teacher itself)")
    prompt_dropout: float = option(0.1, "share of prompts replaced by '' (the student learns the unconditional "
                                        "score as well)")
    guidance_scale: float = option(3.0, "CFG with which the TSM student samples as a diffusion model (validation "
                                        "grids, recipe)")
    num_inference_steps: int = option(25, "DDIM steps of the recipe")

    def validate(self) -> None:
        if not (self.student_config or self.student_channel_multiplier is not None or self.student_init):
            raise StepdistillError("TSM trains a student of its own shape: pass --student_channel_multiplier (e.g. "
                                   "0.5), --student_config or --student_init")
        check_student_options(self)
        if not 0 <= self.prompt_dropout < 1:
            raise StepdistillError(f"--prompt_dropout {self.prompt_dropout}: must be in [0, 1)")


class TSM(DistillationMethod):
    name = "tsm"
    config_class = TSMConfig
    needs_images = True  # noised real data (MSD section 3.3)

    def build(self) -> None:
        self.networks["student"] = build_student_unet(self.config, self.teacher.unet)

    def loss(self, ctx: PhaseContext) -> PhaseOutput:
        c, teacher, rng = self.config, self.teacher, ctx.rng
        z0 = self.clean_latents(ctx.batch, rng)
        b = z0.shape[0]
        t = rng.randint(0, teacher.num_train_timesteps, b).to(z0.device)
        noise = rng.randn_like(z0)
        x_t = teacher.add_noise(z0, noise, t)
        prompts = [("" if drop else p) for p, drop in zip(ctx.batch["prompts"],
                                                           (rng.rand(b) < c.prompt_dropout).tolist())]
        cond = self.conditioning(prompts)
        with torch.no_grad():
            target = teacher.guided_predict(x_t, t, cond, c.tsm_guidance_scale,
                                            uncond=teacher.uncond(b, c.resolution).to(teacher.device))
        pred = teacher.predict(x_t, t, cond, unet=ctx.trained)
        loss = torch.nn.functional.mse_loss(pred.float(), target.float())
        return PhaseOutput(loss, {"loss_tsm": loss.detach()})

    def recipe(self) -> Recipe:
        c = self.config
        return self.student_recipe(scheduler="DDIMScheduler", num_inference_steps=c.num_inference_steps,
                                   guidance_scale=c.guidance_scale)
