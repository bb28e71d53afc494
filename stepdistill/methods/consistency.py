"""The consistency family: LCM and TSCD are siblings over one algorithm whose only difference is the projection
of a prediction to its end point (LCM: c_skip/c_out to the trajectory's origin; TSCD: the DDIM jump to the lower
edge of the segment). Also the family's schedule arithmetic: the skipping-step grid, LCM's boundary scalings and
Hyper-SD's segment edges.

One step (LCM paper Algorithm 1; Diffusers train_lcm_distill_lora_sd_wds.py): z0 from the data, t on the
skipping-step grid, x_t = add_noise(z0, ε, t); the teacher's guided DDIM step gives x_prev at t_prev = t - k;
prediction = project(student(x_t, t)), target = project(target(x_prev, t_prev)) without gradient; loss d(·, ·).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..config import TrainConfig, option
from ..errors import StepdistillError
from ..teacher import Conditioning, Teacher
from .base import DistillationMethod, PhaseContext, PhaseOutput, ema_update
from .losses import ConsistencyLoss


def skipping_grid(num_train_timesteps: int, num_ddim_timesteps: int) -> torch.Tensor:
    """grid[i] = (i + 1) k - 1 with k = T / N: 19, 39, ..., 999 for N = 50 (LCM paper section 4.3)."""
    k = num_train_timesteps // num_ddim_timesteps
    return torch.arange(1, num_ddim_timesteps + 1) * k - 1


def boundary_scalings(t: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """LCM's c_skip, c_out: f(x, t) = c_skip x + c_out x0 with f(x, 0) = x (consistency boundary condition; the
    Diffusers LCM scripts' scalings_for_boundary_conditions)."""
    scaled = t.double() * timestep_scaling
    c_skip = sigma_data ** 2 / (scaled ** 2 + sigma_data ** 2)
    c_out = scaled / (scaled ** 2 + sigma_data ** 2).sqrt()
    return c_skip.float(), c_out.float()


def segment_edges(num_segments: int, num_train_timesteps: int = 1000) -> list[int]:
    """Segment boundaries, high to low, equal to the trailing DDIM timesteps for ``num_segments`` steps plus the
    end point 0: k = 4 → [999, 749, 499, 249, 0] (DDIMScheduler(timestep_spacing='trailing') gives 999, 749, 499,
    249 and its last step lands on ᾱ_0 with set_alpha_to_one=False)."""
    step = num_train_timesteps / num_segments
    edges = [round(num_train_timesteps - j * step) - 1 for j in range(num_segments)]
    return edges + [0]


def lower_edge(t: torch.Tensor, num_segments: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The lower boundary of the segment holding each t: the largest edge strictly below t (0 for the last)."""
    edges = torch.tensor(segment_edges(num_segments, num_train_timesteps)[1:], device=t.device)  # descending
    below = edges.view(1, -1) < t.view(-1, 1)
    # the first edge (in descending order) below t is the largest one below t
    first = below.float().argmax(dim=1)
    return edges[first]


def guided_solver_step(teacher: Teacher, unet, x: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor,
                       cond: Conditioning, guidance_scale, uncond: Conditioning | None = None) -> torch.Tensor:
    """One deterministic DDIM step of the CFG-guided teacher from t to t_prev (cond and uncond in one call)."""
    pred = teacher.guided_predict(x, t, cond, guidance_scale, uncond=uncond, unet=unet)
    return teacher.ddim_step(pred, x, t, t_prev)


@dataclass
class ConsistencyConfig(TrainConfig):
    """Options of every consistency method. Guidance scales use the Imagen convention (ε_u + w (ε_c - ε_u))."""

    num_ddim_timesteps: int = option(50, "N of the skipping-step grid (timesteps (i+1)·T/N - 1)")
    guidance_scale_min: float = option(4.0, "lowest teacher CFG scale drawn per sample")
    guidance_scale_max: float = option(16.0, "highest teacher CFG scale drawn per sample")
    loss_type: str = option("huber", "huber (pseudo-Huber) | l2", choices=("huber", "l2"))
    huber_c: float = option(1e-3, "pseudo-Huber c")
    ema_decay: float = option(0.95, "EMA decay of the target network (full fine-tuning only)")
    num_inference_steps: int = option(4, "steps written into the sampling recipe")

    def validate(self) -> None:
        if not 1 <= self.guidance_scale_min <= self.guidance_scale_max:
            raise StepdistillError(f"guidance range [{self.guidance_scale_min}, {self.guidance_scale_max}] must "
                                   "satisfy 1 <= min <= max (Imagen convention: 1 is no guidance)")
        if 1000 % self.num_ddim_timesteps:
            raise StepdistillError(f"--num_ddim_timesteps {self.num_ddim_timesteps} must divide 1000")


@dataclass
class ConsistencyTerms:
    """One consistency step's pieces, for methods that add a term (TSCD's adversarial loss)."""

    prediction: torch.Tensor
    target: torch.Tensor
    end: torch.Tensor | None  # where both are projected to (TSCD: the segment edge; LCM: None, the origin)
    cond: Conditioning


class ConsistencyDistillation(DistillationMethod):
    """The algorithm of the module docstring; subclasses give ``project`` and ``end_point``."""

    def build(self) -> None:
        c, teacher = self.config, self.teacher
        self.grid = skipping_grid(teacher.num_train_timesteps, c.num_ddim_timesteps)
        self.k = teacher.num_train_timesteps // c.num_ddim_timesteps
        self.loss_fn = ConsistencyLoss(c.loss_type, c.huber_c)
        if c.use_lora:
            self.networks["student"] = self.make_student()
            self.target = None  # LoRA: the student itself under no_grad (LCM-LoRA keeps no EMA)
        else:
            self.networks["student"] = self.full_student()
            self.target = copy.deepcopy(self.networks["student"]).requires_grad_(False)

    def full_student(self):
        return self.make_student()

    # ------------------------------------------------------------- what subclasses define
    def end_point(self, t: torch.Tensor, step: int) -> torch.Tensor | None:
        """Where the prediction at t is projected to."""
        raise NotImplementedError

    def project(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor, end) -> torch.Tensor:
        """The network's output at (x, t) projected to ``end``."""
        raise NotImplementedError

    def guidance_embedding(self, w: torch.Tensor) -> torch.Tensor | None:
        return None

    # ------------------------------------------------------------- the step
    def consistency_terms(self, ctx: PhaseContext) -> ConsistencyTerms:
        c, teacher, rng = self.config, self.teacher, ctx.rng
        z0 = self.clean_latents(ctx.batch, rng)
        b = z0.shape[0]
        t = self.grid[rng.randint(0, c.num_ddim_timesteps, b)].to(z0.device)
        t_prev = (t - self.k).clamp(min=0)
        end = self.end_point(t, ctx.step)
        x = teacher.add_noise(z0, rng.randn_like(z0), t)
        w = c.guidance_scale_min + (c.guidance_scale_max - c.guidance_scale_min) * rng.rand(b).to(z0.device)
        cond = self.conditioning(ctx.batch["prompts"])
        w_emb = self.guidance_embedding(w)
        prediction = self.project(teacher.predict(x, t, cond, unet=ctx.trained, timestep_cond=w_emb), x, t, end)
        with torch.no_grad():
            with self.teacher_mode() as teacher_unet:
                x_prev = guided_solver_step(teacher, teacher_unet, x, t, t_prev, cond, w, uncond=self.uncond(b))
            target_unet = self.target if self.target is not None else self.networks["student"]
            target_out = teacher.predict(x_prev, t_prev, cond, unet=target_unet, timestep_cond=w_emb)
            target = self.project(target_out, x_prev, t_prev, end)
        return ConsistencyTerms(prediction, target, end, cond)

    def loss(self, ctx: PhaseContext) -> PhaseOutput:
        terms = self.consistency_terms(ctx)
        loss = self.loss_fn(terms.prediction, terms.target)
        return PhaseOutput(loss, {"loss": loss.detach()})

    # ------------------------------------------------------------- EMA target (full students)
    def after_update(self, phase, step):
        if self.target is not None:
            ema_update(self.target, self.networks["student"], self.config.ema_decay)

    def ema_copies(self):
        return {"target": self.target} if self.target is not None else {}
