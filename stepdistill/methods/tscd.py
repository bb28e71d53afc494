"""Trajectory segmented consistency distillation (Hyper-SD's TSCD), methods.md §2.

[0, T) is cut into k segments whose edges are the trailing DDIM timesteps for k steps; the student is consistent
only inside a segment: from (x_t, t) it jumps (DDIM, its own x0/ε) to the segment's lower edge, and the target is
the target network's jump from the teacher's next point (x_prev, t_prev) to the same edge. Stages k = 8 → 4 → 2 → 1
train one LoRA progressively; the result serves every step count with trailing DDIM ("unified LoRA").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import option
from ..errors import StepdistillError
from ..recipe import Recipe
from .consistency import consistency_loss, guided_solver_step, lower_edge, skipping_grid
from .lcm import LCM, LCMConfig


@dataclass
class TSCDConfig(LCMConfig):
    """Trajectory segmented consistency distillation (Hyper-SD TSCD), progressive over segment counts."""

    segments: list = option([8, 4, 2, 1], "segment counts of the stages, trained in order (e.g. 8,4,2,1)")
    stage_steps: list = option([], "iterations per stage (default: max_train_steps split evenly)")
    num_ddim_timesteps: int = option(40, "N of the solver grid; must be a multiple of every segment count so "
                                         "edges fall on trailing DDIM timesteps")
    guidance_scale_min: float = option(3.0, "lowest teacher CFG scale drawn per sample")
    guidance_scale_max: float = option(3.0, "highest teacher CFG scale drawn per sample")
    num_inference_steps: int = option(4, "steps written into the sampling recipe (any of the trained segment "
                                         "counts works)")
    adversarial_weight: float = option(0.0, "weight of the adversarial term at the first stage (0: off); it grows "
                                            "as segments shrink: weight x first_segments / segments")
    adversarial_start_step: int = option(0, "iteration from which the adversarial term is on")
    discriminator_learning_rate: float | None = option(None, "learning rate of the discriminator head "
                                                             "(default: --learning_rate)")

    def validate(self) -> None:
        super().validate()
        self.segments = [int(k) for k in self.segments]
        self.stage_steps = [int(s) for s in self.stage_steps]
        if not self.segments or any(k < 1 for k in self.segments):
            raise StepdistillError(f"--segments {self.segments}: give positive segment counts such as 8,4,2,1")
        bad = [k for k in self.segments if self.num_ddim_timesteps % k or 1000 % k]
        if bad:
            raise StepdistillError(f"--num_ddim_timesteps {self.num_ddim_timesteps} is not a multiple of segment "
                                   f"counts {bad}: segment edges would miss the grid (use 40 for 8,4,2,1)")
        if self.stage_steps and len(self.stage_steps) != len(self.segments):
            raise StepdistillError(f"--stage_steps has {len(self.stage_steps)} entries for {len(self.segments)} "
                                   "stages")
        if self.stage_steps and sum(self.stage_steps) != self.max_train_steps:
            self.max_train_steps = sum(self.stage_steps)
        if self.adversarial_weight < 0:
            raise StepdistillError(f"--adversarial_weight {self.adversarial_weight}: must be >= 0 (0 turns it off)")
        if self.adversarial_weight and not self.use_lora:
            raise StepdistillError("--adversarial_weight needs --use_lora true: the discriminator's backbone is the "
                                   "frozen teacher, i.e. the shared UNet with its adapters off")


class TSCD(LCM):
    name = "tscd"
    config_class = TSCDConfig
    guidance_embedded = False

    def build(self) -> None:
        super().build()
        c = self.config
        self.grid = skipping_grid(self.teacher.num_train_timesteps, c.num_ddim_timesteps)
        self.k = self.teacher.num_train_timesteps // c.num_ddim_timesteps
        if c.stage_steps:
            bounds = c.stage_steps
        else:
            base, rest = divmod(c.max_train_steps, len(c.segments))
            bounds = [base + (i < rest) for i in range(len(c.segments))]
        self.stage_ends = torch.tensor(bounds).cumsum(0).tolist()
        if c.adversarial_weight:
            self._build_discriminator()

    def _build_discriminator(self) -> None:
        """PCM's adversarial head: a small trainable head on the FROZEN teacher's mid-block features (the shared
        UNet with adapters off, so no second UNet is held); only the head trains."""
        from .distribution_matching import FakeScore, GANHead

        unet = self.teacher.unet
        channels = int(unet.config.block_out_channels[-1])
        size = (self.config.resolution // self.teacher.vae_scale_factor) // 2 ** (len(unet.config.block_out_channels) - 1)
        self.networks["discriminator"] = GANHead(channels, size).to(self.teacher.device)
        self._trunk = FakeScore(unet, torch.nn.Identity())  # runs the UNet up to its mid block; not trained
        self._adversarial_batch = None

    def adversarial_on(self, step: int) -> bool:
        return bool(self.config.adversarial_weight) and step >= self.config.adversarial_start_step

    def phases(self, step: int) -> list[str]:
        return ["student", "discriminator"] if self.adversarial_on(step) else ["student"]

    def learning_rate(self, name: str) -> float:
        if name == "discriminator" and self.config.discriminator_learning_rate is not None:
            return self.config.discriminator_learning_rate
        return self.config.learning_rate

    def discriminate(self, x: torch.Tensor, t: torch.Tensor, cond, training_head: bool) -> torch.Tensor:
        """Head logits on the frozen teacher's features. Training the head: features without a graph and the
        (DDP-)wrapped head; training the student: gradients flow through the trunk into x, and the plain head."""
        with self.teacher_mode(), torch.set_grad_enabled(not training_head and torch.is_grad_enabled()):
            features = self._trunk(x, t, **cond.unet_kwargs(), classify=True)
        head = self.net("discriminator") if training_head else self.networks["discriminator"]
        return head(features)

    def segments_at(self, step: int) -> int:
        for k, end in zip(self.config.segments, self.stage_ends):
            if step < end:
                return k
        return self.config.segments[-1]

    def loss(self, phase, batch, rng, step):
        if phase == "discriminator":
            # hinge loss (PCM) on the student's jump vs the teacher trajectory's point at the same edge
            prediction, target, edge, cond = self._adversarial_batch
            loss = (torch.relu(1 - self.discriminate(target, edge, cond, training_head=True)).mean()
                    + torch.relu(1 + self.discriminate(prediction, edge, cond, training_head=True)).mean())
            return loss, {"loss_disc": loss.detach()}
        c, teacher = self.config, self.teacher
        segments = self.segments_at(step)
        z0 = self.clean_latents(batch, rng)
        b = z0.shape[0]
        t = self.grid[rng.randint(0, c.num_ddim_timesteps, b)].to(z0.device)
        t_prev = (t - self.k).clamp(min=0)
        edge = lower_edge(t, segments, teacher.num_train_timesteps)
        x = teacher.add_noise(z0, rng.randn_like(z0), t)
        w = c.guidance_scale_min + (c.guidance_scale_max - c.guidance_scale_min) * rng.rand(b).to(z0.device)
        cond = self.conditioning(batch["prompts"])
        student_out = teacher.predict(x, t, cond, unet=self.net("student"))
        prediction = teacher.ddim_step(student_out, x, t, edge)
        with torch.no_grad():
            with self.teacher_mode() as teacher_unet:
                x_prev = guided_solver_step(teacher, teacher_unet, x, t, t_prev, cond, w)
            target_unet = self.target if self.target is not None else self.networks["student"]
            target_out = teacher.predict(x_prev, t_prev, cond, unet=target_unet)
            jumped = teacher.ddim_step(target_out, x_prev, t_prev, edge)
            at_edge = (t_prev == edge).view(-1, *([1] * (x.ndim - 1)))
            target = torch.where(at_edge, x_prev, jumped)  # the teacher step already landed on the edge
        loss = consistency_loss(prediction, target, c.loss_type, c.huber_c)
        logs = {"loss": loss.detach(), "segments": float(segments)}
        if self.adversarial_on(step):
            # Hyper-SD: the adversarial weight grows as the segments shrink
            weight = c.adversarial_weight * c.segments[0] / segments
            adversarial = -self.discriminate(prediction, edge, cond, training_head=False).mean()
            loss = loss + weight * adversarial
            logs["loss_adv"] = adversarial.detach()
            self._adversarial_batch = (prediction.detach(), target, edge, cond)
        return loss, logs

    def recipe(self) -> Recipe:
        c = self.config
        return Recipe(
            method="tscd", base_model=str(c.pretrained_model_name_or_path),
            adapter="lora" if c.use_lora else "full_unet", scheduler="DDIMScheduler",
            scheduler_kwargs={"timestep_spacing": "trailing", "clip_sample": False, "set_alpha_to_one": False},
            num_inference_steps=c.num_inference_steps, guidance_scale=1.0, eta=0.0,
            extra={"trained_segments": list(c.segments),
                   "one_step": {"scheduler": "TCDScheduler", "eta": 1.0,
                                "note": "for 1 step, TCD with eta 1.0 (pass eta explicitly)"}},
        )
