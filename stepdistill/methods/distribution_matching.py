"""The distribution-matching family (DMD2, SiD, and kin): a generator G, a trainable fake score F (a full copy of the
teacher UNet, or with --fake_score_lora_rank a LoRA on the frozen base that G's LoRA and the teacher share,
optionally carrying DMD2's GAN head on its mid-block features) and the frozen teacher as the real score.

This module is the family's toolkit, not an algorithm: G's sampling over its step list with backward simulation /
the uniform mixture of steps, the two scores' clean estimates at one noisy point, the generator's turn (a
``GeneratorLoss`` on that point, plus the GAN term) and the fake score's turn (a denoising loss, plus the GAN
discriminator). ``dmd2.py`` and ``sid.py`` are the algorithms: which loss, which guidance, which phase order, which
sample each phase sees and which timesteps the fake score trains on.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..config import TrainConfig, option
from ..errors import StepdistillError
from ..lora import ADAPTER_NAME, FAKE_SCORE_ADAPTER, add_second_lora, using_adapter
from ..prompts import read_prompts
from ..students import StudentShapeOptions, build_student_unet, check_student_options
from ..teacher import Conditioning
from .base import DistillationMethod, PhaseContext, PhaseOutput, ema_update
from .losses import (DIVERGENCE_LOSSES, DIVERGENCES, GENERATOR_LOSSES, RATIO_LOSSES, DenoisingLoss, GeneratorLoss,
                     ScorePair, gan_discriminator_loss, gan_generator_loss, make_generator_loss)
from .networks import FakeScore, GANHead, SharedUNetAdapter

IMAGE_SOURCES = ("train_data_dir", "dataset_name", "train_shards")


# ----------------------------------------------------------------------------------------------------- config
@dataclass
class DistributionMatchingConfig(TrainConfig, StudentShapeOptions):
    """Options shared by the distribution-matching methods (generator, fake score, frozen teacher). A generator of
    its own shape (--student_channel_multiplier, --student_config, --student_init) is MSD's smaller student; the
    fake score stays a copy of the teacher."""

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
    fake_score_lora_rank: int | None = option(None, "train the fake score as a LoRA of this rank on the frozen base "
                                                    "UNet (with --use_lora true the generator's LoRA, the fake score "
                                                    "and the teacher then share ONE set of UNet weights; with a full "
                                                    "generator the LoRA sits on the teacher's); 0 or unset: a full "
                                                    "trainable copy of the teacher")
    fake_score_lora_alpha: float | None = option(None, "alpha of the fake score's LoRA (default: its rank, i.e. "
                                                       "scale 1)")
    generator_loss: str = option("dmd", "the generator's loss, a member of the distribution-matching family (README "
                                        "'The distribution-matching family'): dmd, diff_instruct, sid, sim, fdistill "
                                        "(needs --gan), uni_instruct (needs --gan)", choices=GENERATOR_LOSSES)
    divergence: str | None = option(None, "the f-divergence of --generator_loss fdistill (default js) or uni_instruct "
                                          "(default forward_kl)", choices=DIVERGENCES)
    alpha: float = option(1.0, "α of the sid generator loss (1 for SD; 1.2 in the EDM paper; 0.5-1 for new domains)")
    sim_distance: str | None = option(None, "the distance of --generator_loss sim: l2 (= sid with α 1) or "
                                            "pseudo_huber (default)", choices=("l2", "pseudo_huber"))
    sim_huber_c: float = option(0.00054, "pseudo-Huber constant of --generator_loss sim, times √(C·H·W) of the "
                                         "latents (iCT's scaling)")

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
        if self.fake_score_lora_rank is not None and self.fake_score_lora_rank < 0:
            raise StepdistillError(f"--fake_score_lora_rank {self.fake_score_lora_rank}: must be >= 0 (0: a full "
                                   "copy of the teacher as the fake score)")
        if self.fake_score_lora_alpha is not None and not self.fake_score_lora_rank:
            raise StepdistillError("--fake_score_lora_alpha needs --fake_score_lora_rank N (N > 0): the fake score "
                                   "is a full copy otherwise")
        if self.fake_score_lora_alpha is not None and self.fake_score_lora_alpha <= 0:
            raise StepdistillError(f"--fake_score_lora_alpha {self.fake_score_lora_alpha}: must be > 0")
        self.check_generator_loss()
        check_student_options(self)

    def check_generator_loss(self) -> None:
        name = self.generator_loss
        if name in RATIO_LOSSES and not self.gan:
            raise StepdistillError(f"--generator_loss {name} weights by a density ratio read from the Diffusion-GAN "
                                   "head: pass --gan true with an image source (--train_data_dir, --dataset_name or "
                                   "--train_shards)")
        if self.divergence is not None and name not in DIVERGENCE_LOSSES:
            raise StepdistillError(f"--divergence {self.divergence}: --generator_loss {name} takes no divergence "
                                   f"(only {' and '.join(DIVERGENCE_LOSSES)} do); drop --divergence")
        if self.sim_distance is not None and name != "sim":
            raise StepdistillError(f"--sim_distance {self.sim_distance}: only --generator_loss sim takes a distance; "
                                   "drop --sim_distance")
        if self.sim_huber_c <= 0:
            raise StepdistillError(f"--sim_huber_c {self.sim_huber_c}: must be > 0")

    def make_generator_loss(self) -> GeneratorLoss:
        return make_generator_loss(self.generator_loss, self.divergence, self.alpha, self.sim_distance,
                                   self.sim_huber_c)


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
    """Generator / fake score / teacher. An algorithm sets ``generator_loss``, ``denoising_loss``, ``guidance``,
    ``generator_timesteps``, ``init_noise_scale``, and defines ``phases`` and ``loss``."""

    student_name = "generator"
    main_stream_phase = None  # every phase draws from its own stream
    generator_loss: GeneratorLoss
    denoising_loss: DenoisingLoss
    guidance: Guidance
    generator_timesteps: list[int]
    init_noise_scale: float = 1.0  # x at the first step = scale · z (DMD2: pure noise; SiD: √(1-ᾱ_t_init))

    @classmethod
    def requires_images(cls, config) -> bool:
        return bool(config.gan)

    @classmethod
    def fsdp_refusal(cls, config):
        if config.fake_score_lora_rank:
            return (f"--fake_score_lora_rank {config.fake_score_lora_rank}: a LoRA fake score sits inside the shared "
                    "frozen UNet, which FSDP does not shard; drop it for a full fake score, or launch with DDP "
                    "(configs/accelerate/ddp.yaml)")
        return super().fsdp_refusal(config)

    # ------------------------------------------------------------------ networks
    def build(self) -> None:
        c, teacher = self.config, self.teacher
        if c.fake_score_lora_rank:
            self.build_shared_fake_score()
        else:
            # F first: a LoRA generator is added onto the teacher's UNet in place and must not be copied into F
            fake_unet = copy.deepcopy(teacher.unet).requires_grad_(True)
            head = None
            if c.gan:
                head = GANHead.for_unet(fake_unet, c.resolution // teacher.vae_scale_factor).to(teacher.device)
            self.networks["fake_score"] = FakeScore(fake_unet, head)
            self.networks["generator"] = build_student_unet(c, teacher.unet) or self.make_student()
        self.ema = None
        if c.generator_ema_decay:
            self.ema = copy.deepcopy(self.networks["generator"]).requires_grad_(False)
        self.prompts = None
        if c.prompts_file and c.image_sources():  # images feed the GAN; the generator's prompts come from the file
            self.prompts = [p for p in read_prompts(c.prompts_file) if self.keep is None or self.keep(p)]
            if not self.prompts:
                raise StepdistillError(f"--prompts_file {c.prompts_file}: no prompt belongs to this run's part")
            for i in range(0, min(len(self.prompts), 20_000), 256):
                teacher.encode_prompt(self.prompts[i:i + 256], c.resolution)

    def build_shared_fake_score(self) -> None:
        """F as a second LoRA on the teacher's frozen UNet (ProlificDreamer's VSD trains its variational score as a
        LoRA of the frozen diffusion model). With a LoRA generator, G (adapter "default"), F (adapter "fake_score")
        and the teacher (adapters off) are one UNet; each network is a ``SharedUNetAdapter`` whose parameters are
        its adapter's alone. Official DMD2 keeps F as a full copy (sd_guidance.py fake_unet) and needs FSDP for
        SDXL; this holds one UNet."""
        c, teacher = self.config, self.teacher
        # G first: a full generator copies the teacher's UNet before F's adapter goes onto it
        generator = build_student_unet(c, teacher.unet) or self.make_student()
        # its own seed: F's LoRA A matrices differ from G's (both B start at 0, so F starts as the teacher)
        add_second_lora(teacher.unet, FAKE_SCORE_ADAPTER, c.fake_score_lora_rank, c.fake_score_lora_alpha,
                        seed=c.seed + 1)
        head = None
        if c.gan:
            head = GANHead.for_unet(teacher.unet, c.resolution // teacher.vae_scale_factor).to(teacher.device)
        self.networks["fake_score"] = SharedUNetAdapter(teacher.unet, FAKE_SCORE_ADAPTER, head)
        if generator is teacher.unet:  # a LoRA generator: the network is its adapter, not the UNet carrying F's too
            generator = SharedUNetAdapter(teacher.unet, ADAPTER_NAME)
        self.networks["generator"] = generator

    def learning_rate(self, name: str) -> float:
        if name == "fake_score" and self.config.fake_score_learning_rate is not None:
            return self.config.fake_score_learning_rate
        return self.config.learning_rate

    def student_unet(self):
        if self.ema is not None:
            return self.ema
        generator = self.networks["generator"]
        # a shared UNet at rest runs G's adapter only: it samples as G
        return generator.shared_unet if isinstance(generator, SharedUNetAdapter) else generator

    def teacher_mode(self):
        """The teacher: with a LoRA fake score, the teacher's UNet with every adapter off (F's sits there too, also
        beside a full generator); otherwise as every method."""
        if self.config.fake_score_lora_rank:
            return using_adapter(self.teacher.unet, None)
        return super().teacher_mode()

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

    def gan_active(self, step: int) -> bool:
        return self.config.gan and step >= self.config.gan_start_step

    def generator_updates(self, step: int) -> bool:
        """Two time-scale updates: G trains on every dfake_gen_update_ratio-th iteration, F on every one (DMD2
        train_sd.py: COMPUTE_GENERATOR_GRADIENT = step % ratio == 0)."""
        return step % self.config.dfake_gen_update_ratio == 0

    def generator_x0(self, unet, x: torch.Tensor, t: int, cond: Conditioning) -> torch.Tensor:
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        return self.teacher.to_x0(self.teacher.predict(x, tt, cond, unet=unet), x, tt)

    def generate(self, cond: Conditioning, rng, trained=None, depth: int | None = None) -> tuple[torch.Tensor, int]:
        """G's sample after a random number of its steps: DMD2's backward simulation, few-step SiD's uniform
        mixture (DMD2 paper section 4.5; few-step SiD section 3). The depth is drawn identically on every process;
        the first ``depth`` steps run without gradient from fresh noise, each x0 re-noised with NEW noise to the
        next step (correlated noise here causes artifacts, DMD2 issues 9, 61); the last step runs through
        ``trained`` with gradient when it is given."""
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
        with torch.set_grad_enabled(trained is not None):
            x0 = self.generator_x0(plain if trained is None else trained, x, steps[depth], cond)
        return x0, depth

    def draw_sample(self, batch, rng, trained=None, drop=None) -> tuple[torch.Tensor, Conditioning, int]:
        """Prompts (the batch's captions, or drawn from --prompts_file when images feed only the GAN), their
        conditioning (the empty prompt where the boolean mask ``drop`` is set), and G's sample for them."""
        prompts = list(batch["prompts"])
        if self.prompts is not None:
            prompts = [self.prompts[i] for i in rng.randint(0, len(self.prompts), len(prompts)).tolist()]
        cond = self.conditioning(prompts)
        if drop is not None:
            cond = _where(drop, self.uncond(len(prompts)), cond)
        x_g, depth = self.generate(cond, rng, trained)
        return x_g, cond, depth

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
            # non-reentrant checkpointing would recompute this forward in backward with the adapters back ON (a
            # shared UNet under a LoRA fake score checkpoints with lora.adapter_checkpointing, which replays them off)
            pause = torch.is_grad_enabled() and getattr(unet, "is_gradient_checkpointing", False) \
                and not self.config.fake_score_lora_rank
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

    # ------------------------------------------------------------------ the two turns
    def generator_turn(self, ctx: PhaseContext, sample_rng) -> PhaseOutput:
        """G's loss: the generator loss at x_t = a_t x_g + s_t ε, t ~ U{min_step..max_step}, plus w_g
        softplus(-D(x_g)) once the GAN is on (gradient through F into x_g; the loop keeps F's own gradients out).
        Hands its detached sample (and conditioning) to later phases as ``generator_sample``."""
        c, teacher, own = self.config, self.teacher, ctx.rng
        x_g, cond, depth = self.draw_sample(ctx.batch, sample_rng, ctx.trained)
        b = x_g.shape[0]
        t = own.randint(c.min_step, c.max_step + 1, b).to(x_g.device)
        noise = own.randn_like(x_g)
        x_t = teacher.add_noise(x_g, noise, t)
        logits = None
        with torch.set_grad_enabled(self.generator_loss.input_grad):
            y_real = self.real_x0(x_t, t, cond)
            y_fake = self.fake_x0(x_t, t, cond)
            if self.generator_loss.needs_ratio:  # r = p/q from the GAN head at the same noisy point (f-distill)
                fake_cond = cond if self.guidance.fake_text else self.uncond(b)
                logits = self.networks["fake_score"](x_t, t, **fake_cond.unet_kwargs(), classify=True)
        loss, logs = self.generator_loss(ScorePair(x_g, x_t, t, noise, y_real, y_fake, logits))
        logs = {f"loss_{self.generator_loss.name}": loss.detach(), "depth": float(depth), **logs}
        if self.gan_active(ctx.step):
            gan = gan_generator_loss(self.discriminate(self.networks["fake_score"], x_g, cond, own))
            loss = loss + c.gan_loss_weight_gen * gan
            logs["loss_gan_gen"] = gan.detach()
        return PhaseOutput(loss, logs, handoff={"generator_sample": (x_g.detach(), cond)})

    def fake_score_turn(self, ctx: PhaseContext, x_g: torch.Tensor, cond: Conditioning,
                        timesteps: tuple[int, int]) -> PhaseOutput:
        """F's denoising loss on sg(x_g) at t ~ U{timesteps} (ε-matching at guidance κ1; for a v-prediction teacher
        this equals SiD's SNR-weighted v-loss), plus w_d [softplus(D(fake)) + softplus(-D(real))] once the GAN is
        on."""
        c, teacher, own = self.config, self.teacher, ctx.rng
        b = x_g.shape[0]
        t = own.randint(timesteps[0], timesteps[1] + 1, b).to(x_g.device)
        noise = own.randn_like(x_g)
        x_t = teacher.add_noise(x_g, noise, t)
        out = teacher.guided_predict(x_t, t, self.fake_conditioning(cond, own), self.guidance.fake_train,
                                     uncond=self.uncond(b), unet=ctx.trained)
        loss = self.denoising_loss(teacher.to_eps(out, x_t, t), noise)
        logs = {"loss_fake": loss.detach()}
        if self.gan_active(ctx.step):
            real = self.clean_latents(ctx.batch, own)
            real_cond = self.conditioning(ctx.batch["prompts"])
            logits = self.discriminate(ctx.trained, torch.cat([real, x_g]), Conditioning.cat([real_cond, cond]), own)
            disc = gan_discriminator_loss(logits[:b], logits[b:])
            loss = loss + c.gan_loss_weight_disc * disc
            logs.update(loss_gan_disc=disc.detach(), d_real=torch.sigmoid(logits[:b]).mean().detach(),
                        d_fake=torch.sigmoid(logits[b:]).mean().detach())
        return PhaseOutput(loss, logs)
