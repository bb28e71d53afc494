"""DMD2 (methods.md §3): distribution matching against the teacher's CFG score, a fake score trained on the
generator's samples with two time-scale updates, an optional Diffusion-GAN on the fake score's mid-block features,
and one-step or multi-step generators trained with backward simulation."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import option
from ..errors import StepdistillError
from ..recipe import Recipe
from .distribution_matching import (DistributionMatching, DistributionMatchingConfig, DMDLoss, Guidance,
                                    check_timesteps)


def _ints(name: str, values: list) -> list[int]:
    try:
        return [int(v) for v in values]
    except ValueError as e:
        raise StepdistillError(f"--{name} {','.join(map(str, values))}: expected integers, e.g. 999,749,499,249") \
            from e


@dataclass
class DMD2Config(DistributionMatchingConfig):
    """DMD2: distribution matching distillation with two time-scale updates, Diffusion-GAN and backward
    simulation. Guidance uses the Imagen convention (1 = none)."""

    real_guidance_scale: float = option(1.75, "teacher CFG in the distribution-matching loss (SD1.5 1.75, SDXL 8)")
    dfake_gen_update_ratio: int = option(10, "the fake score updates every iteration, the generator every N-th "
                                             "(SD1.5 10, SDXL 5)")
    conditioning_timestep: int = option(999, "timestep of a one-step generator fed pure noise (SDXL one-step: 399)")
    denoising_timesteps: list = option([], "timesteps of a multi-step generator, e.g. 999,749,499,249, trained "
                                           "with backward simulation; empty: one step at --conditioning_timestep")
    learning_rate: float = option(1e-5, "learning rate of the generator (SD1.5 1e-5; SDXL LoRA 5e-5)")
    adam_weight_decay: float = option(0.01, "AdamW weight decay")
    max_grad_norm: float = option(10.0, "gradient clipping norm")

    def validate(self) -> None:
        super().validate()
        self.denoising_timesteps = _ints("denoising_timesteps", self.denoising_timesteps)
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
    share_sample_across_phases = True  # DMD2's fake score trains on the images of the generator's turn
    generator_loss = DMDLoss()

    def build(self) -> None:
        c = self.config
        self.generator_timesteps = c.denoising_timesteps or [c.conditioning_timestep]
        self.init_noise_scale = 1.0  # pure noise at the first step (DMD2's pure_noise_mask)
        self.guidance = Guidance(real=c.real_guidance_scale)  # the fake score never sees CFG
        super().build()

    def fake_timestep_range(self) -> tuple[int, int]:
        return 0, self.teacher.num_train_timesteps - 1  # F's denoising loss: t ~ U{0..999}

    def recipe(self) -> Recipe:
        c, steps = self.config, list(self.generator_timesteps)
        return Recipe(
            method="dmd2", base_model=str(c.pretrained_model_name_or_path),
            adapter="lora" if c.use_lora else "full_unet", scheduler="LCMScheduler",
            # every integer t is an LCM "training" timestep, so custom timesteps raise no warning
            scheduler_kwargs={"original_inference_steps": self.teacher.num_train_timesteps},
            num_inference_steps=len(steps), timesteps=steps, guidance_scale=1.0,
        )
