"""Latent consistency distillation: LCM (full UNet with a guidance embedding, EMA target) and LCM-LoRA (guidance
baked in; teacher = the same UNet with adapters off, target = the same UNet under no_grad). methods.md §1."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..config import TrainConfig, option
from ..errors import StepdistillError
from ..recipe import Recipe
from .base import DistillationMethod, ema_update
from .consistency import boundary_scalings, consistency_loss, guided_solver_step, skipping_grid


@dataclass
class LCMConfig(TrainConfig):
    """Latent consistency distillation (LCM / LCM-LoRA). Guidance scales use the Imagen convention
    (ε_u + w (ε_c - ε_u)); LCM's paper range w ∈ [3, 15] is [4, 16] here."""

    num_ddim_timesteps: int = option(50, "N of the skipping-step grid (timesteps (i+1)·T/N - 1)")
    guidance_scale_min: float = option(4.0, "lowest teacher CFG scale drawn per sample")
    guidance_scale_max: float = option(16.0, "highest teacher CFG scale drawn per sample")
    loss_type: str = option("huber", "huber (pseudo-Huber) | l2", choices=("huber", "l2"))
    huber_c: float = option(1e-3, "pseudo-Huber c")
    timestep_scaling_factor: float = option(10.0, "t scaling inside the boundary-condition c_skip / c_out")
    ema_decay: float = option(0.95, "EMA decay of the target network (full fine-tuning only)")
    time_cond_proj_dim: int = option(256, "guidance-embedding width of a full LCM student")
    num_inference_steps: int = option(4, "steps written into the sampling recipe")
    inference_guidance_scale: float = option(1.0, "guidance written into the recipe (full LCM: the embedded w)")

    def validate(self) -> None:
        if not 1 <= self.guidance_scale_min <= self.guidance_scale_max:
            raise StepdistillError(f"guidance range [{self.guidance_scale_min}, {self.guidance_scale_max}] must "
                                   "satisfy 1 <= min <= max (Imagen convention: 1 is no guidance)")
        if 1000 % self.num_ddim_timesteps:
            raise StepdistillError(f"--num_ddim_timesteps {self.num_ddim_timesteps} must divide 1000")


class LCM(DistillationMethod):
    name = "lcm"
    config_class = LCMConfig
    guidance_embedded = True  # a full LCM student takes w through time_cond_proj_dim; LoRAs bake guidance in

    def build(self) -> None:
        c, teacher = self.config, self.teacher
        self.grid = skipping_grid(teacher.num_train_timesteps, c.num_ddim_timesteps)
        self.k = teacher.num_train_timesteps // c.num_ddim_timesteps
        if c.use_lora:
            self.networks["student"] = self.make_student()
            self.target = None  # the student itself under no_grad
        else:
            self.networks["student"] = (self._guidance_conditioned_copy() if self.guidance_embedded
                                        else self.make_student())
            self.target = copy.deepcopy(self.networks["student"]).requires_grad_(False)

    def _guidance_conditioned_copy(self):
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
        return student.to(base.device).requires_grad_(True).train()

    def guidance_embedding(self, w: torch.Tensor) -> torch.Tensor | None:
        if self.config.use_lora or not self.guidance_embedded:
            return None
        # Diffusers pipelines embed (guidance_scale - 1): Imagen w → LCM's w.
        return self.teacher.pipe.get_guidance_scale_embedding(w - 1, embedding_dim=self.config.time_cond_proj_dim)

    def consistency_fn(self, out, x, t):
        c_skip, c_out = boundary_scalings(t, timestep_scaling=self.config.timestep_scaling_factor)
        shape = (-1,) + (1,) * (x.ndim - 1)
        return c_skip.to(x.device).view(shape) * x + c_out.to(x.device).view(shape) * self.teacher.to_x0(out, x, t)

    def loss(self, phase, batch, rng, step):
        c, teacher = self.config, self.teacher
        z0 = self.clean_latents(batch, rng)
        b = z0.shape[0]
        idx = rng.randint(0, c.num_ddim_timesteps, b)
        t = self.grid[idx].to(z0.device)
        t_prev = (t - self.k).clamp(min=0)
        x = teacher.add_noise(z0, rng.randn_like(z0), t)
        w = c.guidance_scale_min + (c.guidance_scale_max - c.guidance_scale_min) * rng.rand(b).to(z0.device)
        cond = self.conditioning(batch["prompts"])
        w_emb = self.guidance_embedding(w)
        student_out = teacher.predict(x, t, cond, unet=self.net("student"), timestep_cond=w_emb)
        prediction = self.consistency_fn(student_out, x, t)
        with torch.no_grad():
            with self.teacher_mode() as teacher_unet:
                x_prev = guided_solver_step(teacher, teacher_unet, x, t, t_prev, cond, w)
            target_unet = self.target if self.target is not None else self.networks["student"]
            target_out = teacher.predict(x_prev, t_prev, cond, unet=target_unet, timestep_cond=w_emb)
            target = self.consistency_fn(target_out, x_prev, t_prev)
        loss = consistency_loss(prediction, target, c.loss_type, c.huber_c)
        return loss, {"loss": loss.detach()}

    def after_update(self, phase, step):
        if self.target is not None:
            ema_update(self.target, self.networks["student"], self.config.ema_decay)

    def ema_copies(self):
        return {"target": self.target} if self.target is not None else {}

    def recipe(self) -> Recipe:
        c = self.config
        return Recipe(
            method="lcm_lora" if c.use_lora else "lcm", base_model=str(c.pretrained_model_name_or_path),
            adapter="lora" if c.use_lora else "full_unet", scheduler="LCMScheduler",
            scheduler_kwargs={"original_inference_steps": c.num_ddim_timesteps,
                              "timestep_scaling": c.timestep_scaling_factor},
            num_inference_steps=c.num_inference_steps, guidance_scale=c.inference_guidance_scale,
        )
