"""Train the tiny-digits Stable Diffusion pipeline from scratch: VAE, tokenizer, text encoder, UNet, classifier.

Seeded and reproducible on a given machine; writes a standard Diffusers folder that a stock
``StableDiffusionPipeline.from_pretrained`` loads.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..tokenizer import write_clip_tokenizer
from . import data
from .classifier import train_classifier

logger = logging.getLogger(__name__)


@dataclass
class BuildConfig:
    seed: int = 0
    vae_steps: int = 1000
    vae_batch_size: int = 128
    vae_lr: float = 1e-3
    kl_weight: float = 1e-4
    unet_steps: int = 4000
    unet_batch_size: int = 128
    unet_lr: float = 1e-3
    text_lr: float = 3e-4
    ema_decay: float = 0.999
    empty_prompt_prob: float = 0.1
    classifier_steps: int = 1500
    max_length: int = 16


def vae_config() -> dict:
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=data.RESOLUTION,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, mid_block_add_attention=False,
    )


def unet_config(cross_attention_dim: int = 64) -> dict:
    return dict(
        sample_size=data.RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=16, norm_num_groups=16,
    )


def scheduler_config() -> dict:
    """Stable Diffusion 1.5's noise schedule and sampler settings."""
    return dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
        timestep_spacing="leading",
    )


def _seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def train_vae(images: torch.Tensor, cfg: BuildConfig, progress: bool = True):
    from diffusers import AutoencoderKL

    g = _seed_everything(cfg.seed)
    vae = AutoencoderKL(**vae_config())
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.vae_lr, total_steps=cfg.vae_steps, pct_start=0.1)
    x_all = images * 2 - 1
    bar = tqdm(range(cfg.vae_steps), desc="vae", disable=not progress)
    for _ in bar:
        x = x_all[torch.randint(0, len(x_all), (cfg.vae_batch_size,), generator=g)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        recon = vae.decode(z).sample
        rec = F.mse_loss(recon, x) + F.l1_loss(recon, x)
        kl = posterior.kl().mean() / z[0].numel()
        loss = rec + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(rec=f"{rec.item():.4f}", kl=f"{kl.item():.2f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        posterior = vae.encode(x_all).latent_dist
        latents = posterior.sample(generator=g)
        scaling = 1.0 / latents.std().item()
        recon_mse = F.mse_loss(vae.decode(posterior.mean).sample, x_all).item()
    vae.register_to_config(scaling_factor=scaling)
    return vae, posterior.mean, posterior.std, recon_mse


def train_unet(latent_mean, latent_std, scaling_factor: float, labels, tokenizer, cfg: BuildConfig,
               progress: bool = True):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    g = _seed_everything(cfg.seed + 1)
    vocab = tokenizer.get_vocab()
    text_config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=cfg.max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=64,
    )
    text_encoder = CLIPTextModel(text_config)
    unet = UNet2DConditionModel(**unet_config(text_config.hidden_size))
    noise_scheduler = DDPMScheduler(**{k: v for k, v in scheduler_config().items()
                                       if k not in ("set_alpha_to_one", "steps_offset")})
    alphas_cumprod = noise_scheduler.alphas_cumprod

    # Every prompt a training image can have, tokenized once; row d*T + j is template j for digit d.
    templates = data.TRAIN_TEMPLATES
    all_prompts = [p for d in range(10) for p in data.prompts_for(d, templates)] + [""]
    ids = tokenizer(all_prompts, padding="max_length", max_length=cfg.max_length, truncation=True,
                    return_tensors="pt").input_ids
    empty_row = len(all_prompts) - 1

    params = [{"params": unet.parameters(), "lr": cfg.unet_lr},
              {"params": text_encoder.parameters(), "lr": cfg.text_lr}]
    opt = torch.optim.AdamW(params, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[cfg.unet_lr, cfg.text_lr], total_steps=cfg.unet_steps,
                                                pct_start=0.05)
    modules = torch.nn.ModuleList([unet, text_encoder])
    ema = [p.detach().clone() for p in modules.parameters()]
    bar = tqdm(range(cfg.unet_steps), desc="unet+text", disable=not progress)
    for step in bar:
        idx = torch.randint(0, len(labels), (cfg.unet_batch_size,), generator=g)
        z0 = (latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=g)) * scaling_factor
        rows = labels[idx] * len(templates) + torch.randint(0, len(templates), idx.shape, generator=g)
        drop = torch.rand(idx.shape, generator=g) < cfg.empty_prompt_prob
        rows = torch.where(drop, torch.full_like(rows, empty_row), rows)
        t = torch.randint(0, 1000, idx.shape, generator=g)
        noise = torch.randn(z0.shape, generator=g)
        a = alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
        x_t = a * z0 + s * noise
        cond = text_encoder(ids[rows]).last_hidden_state
        loss = F.mse_loss(unet(x_t, t, cond).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in modules.parameters()], 1 - decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    with torch.no_grad():
        for p, e in zip(modules.parameters(), ema):
            p.copy_(e)
    return unet.eval().requires_grad_(False), text_encoder.eval().requires_grad_(False)


def build(output_dir: str | Path, cfg: BuildConfig | None = None, progress: bool = True) -> dict:
    """Train everything and write ``output_dir`` (a Diffusers StableDiffusionPipeline folder). Returns a summary."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    cfg = cfg or BuildConfig()
    torch.set_flush_denormal(True)  # denormals in Adam state slow CPU steps many-fold
    start = time.time()
    output_dir = Path(output_dir)
    images, labels = data.load_digits_images()

    vae, latent_mean, latent_std, recon_mse = train_vae(images, cfg, progress)
    logger.info("vae: reconstruction mse %.5f, scaling factor %.4f", recon_mse, vae.config.scaling_factor)

    tokenizer_files = Path(tempfile.mkdtemp())
    write_clip_tokenizer(tokenizer_files, data.vocabulary(), model_max_length=cfg.max_length)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_files)
    unet, text_encoder = train_unet(latent_mean, latent_std, vae.config.scaling_factor, labels, tokenizer, cfg,
                                   progress)

    classifier, accuracy = train_classifier(images, labels, steps=cfg.classifier_steps, seed=cfg.seed,
                                            progress=progress)

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(**scheduler_config()), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    # Write next to the destination, then swap in: an interrupted build never leaves a half-written world.
    staging = output_dir.with_name(output_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    pipe.save_pretrained(staging, safe_serialization=True)
    classifier.save(staging)
    # transformers 5 saves only tokenizer.json; the BPE files keep the folder loadable by transformers 4's slow
    # CLIPTokenizer too.
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tokenizer_files / name, staging / "tokenizer" / name)
    shutil.rmtree(tokenizer_files, ignore_errors=True)
    summary = {
        "config": asdict(cfg),
        "vae_reconstruction_mse": recon_mse,
        "vae_scaling_factor": vae.config.scaling_factor,
        "classifier_holdout_accuracy": accuracy,
        "build_seconds": round(time.time() - start, 1),
        "torch": torch.__version__,
    }
    (staging / "build_info.json").write_text(json.dumps(summary, indent=2))
    if output_dir.exists():
        shutil.rmtree(output_dir)
    staging.rename(output_dir)
    return summary
