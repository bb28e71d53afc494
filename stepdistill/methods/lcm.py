"""Latent consistency distillation: LCM (full UNet with a guidance embedding, EMA target) and LCM-LoRA (guidance
baked in; teacher = the same UNet with adapters off, target = the same UNet under no_grad).

Algorithm (LCM paper Algorithm 1, section 4): the consistency step of ``consistency.py`` with the projection
f(x, t) = c_skip(t) x + c_out(t) x0(x, t) to the trajectory's origin (LCM eq. 9), w ~ U[w_min, w_max] per sample;
a full student also sees w through a guidance embedding (``time_cond_proj_dim``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..config import option
from ..recipe import Recipe
from .consistency import ConsistencyConfig, ConsistencyDistillation, boundary_scalings


@dataclass
class LCMConfig(ConsistencyConfig):
    """Latent consistency distillation (LCM / LCM-LoRA). Guidance scales use the Imagen convention
    (ε_u + w (ε_c - ε_u)); LCM's paper range w ∈ [3, 15] is [4, 16] here. LCM-LoRA's recipe (Diffusers
    train_lcm_distill_lora_sd_wds.py): rank 64, alpha 64 (scale 1), lr 1e-4."""

    learning_rate: float | None = option(None, "learning rate (method default: 1e-4 for LCM-LoRA, as Diffusers' "
                                               "train_lcm_distill_lora_sd_wds.py; 1e-6 for a full LCM UNet, as "
                                               "Diffusers' full-distillation example of train_lcm_distill_sd_wds.py)")
    timestep_scaling_factor: float = option(10.0, "t scaling inside the boundary-condition c_skip / c_out")
    time_cond_proj_dim: int = option(256, "guidance-embedding width of a full LCM student")
    inference_guidance_scale: float | None = option(
        None, "guidance written into the recipe (method default: 1 for LCM-LoRA, whose guidance is baked in; for a "
              "full LCM, the embedded w, the middle of [guidance_scale_min, guidance_scale_max]: its guidance "
              "embedding learned only that range, and the middle is farthest from extrapolating it)")

    def validate(self) -> None:
        super().validate()
        lo, hi = self.guidance_scale_min, self.guidance_scale_max
        if self.learning_rate is None:
            self.learning_rate = 1e-4 if self.use_lora else 1e-6
        if self.inference_guidance_scale is None:
            self.inference_guidance_scale = 1.0 if self.use_lora else (lo + hi) / 2
        elif not self.use_lora and not lo <= self.inference_guidance_scale <= hi:
            logging.getLogger("stepdistill").warning(
                "--inference_guidance_scale %g lies outside the trained range [%g, %g]: the full LCM's guidance "
                "embedding extrapolates", self.inference_guidance_scale, lo, hi)


class LCM(ConsistencyDistillation):
    name = "lcm"
    config_class = LCMConfig

    def full_student(self):
        """The teacher's UNet with ``time_cond_proj_dim``: the w-embedding enters through a zero-initialised
        projection, so the student starts exactly at the teacher."""
        from diffusers import UNet2DConditionModel

        base = self.teacher.unet
        config = dict(base.config)
        config["time_cond_proj_dim"] = self.config.time_cond_proj_dim
        student = UNet2DConditionModel.from_config(config)
        missing, unexpected = student.load_state_dict(base.state_dict(), strict=False)
        assert not unexpected and all("cond_proj" in k for k in missing), (missing, unexpected)
        torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
        if self.config.init_from_output:  # an earlier output (a pipeline's previous stage)
            from ..students import load_init_output

            load_init_output(student, self.config)
        return student.to(base.device).requires_grad_(True).train()

    def guidance_embedding(self, w: torch.Tensor) -> torch.Tensor | None:
        if self.config.use_lora:
            return None
        # Diffusers pipelines embed (guidance_scale - 1): Imagen w → LCM's w.
        return self.teacher.pipe.get_guidance_scale_embedding(w - 1, embedding_dim=self.config.time_cond_proj_dim)

    def end_point(self, t, step):
        return None  # the consistency function maps every point to the trajectory's origin

    def project(self, out, x, t, end):
        c_skip, c_out = boundary_scalings(t, timestep_scaling=self.config.timestep_scaling_factor)
        shape = (-1,) + (1,) * (x.ndim - 1)
        return c_skip.to(x.device).view(shape) * x + c_out.to(x.device).view(shape) * self.teacher.to_x0(out, x, t)

    def recipe(self) -> Recipe:
        c = self.config
        return self.student_recipe(
            method="lcm_lora" if c.use_lora else "lcm", scheduler="LCMScheduler",
            scheduler_kwargs={"original_inference_steps": c.num_ddim_timesteps,
                              "timestep_scaling": c.timestep_scaling_factor},
            num_inference_steps=c.num_inference_steps, guidance_scale=c.inference_guidance_scale,
        )
