"""The teacher: one object through which every method talks to a Diffusers text-to-image pipeline.

It owns the noise schedule (read from the pipeline's own scheduler), prediction-type conversions, prompt encoding
with a cache, classifier-free guidance in one batched UNet call, forward noising and the deterministic DDIM jump.
Methods pass their own UNet (a student, a fake score) to the same functions, so no method re-implements any of it.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .errors import StepdistillError

SUPPORTED_PIPELINES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
}


@dataclass
class Conditioning:
    """Text conditioning for a batch: what the UNet needs besides (x_t, t)."""

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None = None  # SDXL
    add_time_ids: torch.Tensor | None = None  # SDXL: (orig_h, orig_w, crop_top, crop_left, target_h, target_w)

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def _map(self, fn) -> "Conditioning":
        return Conditioning(*(None if v is None else fn(v) for v in
                              (self.prompt_embeds, self.pooled_prompt_embeds, self.add_time_ids)))

    def to(self, *args, **kwargs) -> "Conditioning":
        return self._map(lambda v: v.to(*args, **kwargs))

    def __getitem__(self, index) -> "Conditioning":
        return self._map(lambda v: v[index])

    def repeat(self, n: int) -> "Conditioning":
        return self._map(lambda v: v.repeat_interleave(n, dim=0))

    @staticmethod
    def cat(items: Sequence["Conditioning"]) -> "Conditioning":
        first = items[0]
        fields = []
        for name in ("prompt_embeds", "pooled_prompt_embeds", "add_time_ids"):
            values = [getattr(c, name) for c in items]
            fields.append(None if values[0] is None else torch.cat(values))
        return Conditioning(*fields) if first is not None else first

    def unet_kwargs(self) -> dict:
        kwargs = {"encoder_hidden_states": self.prompt_embeds}
        if self.pooled_prompt_embeds is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled_prompt_embeds, "time_ids": self.add_time_ids}
        return kwargs


def _offline() -> bool:
    from huggingface_hub import constants

    check = getattr(constants, "is_offline_mode", None)
    return bool(check() if check else constants.HF_HUB_OFFLINE)


def _is_local(path: str) -> bool:
    """A folder, or something meant as one (a hub id is ``name`` or ``org/name``)."""
    return Path(path).exists() or path.startswith((".", "/", "~")) or path.count("/") > 1


def hub_file(repo_id: str, filename: str, revision: str | None = None, cache_dir: str | None = None) -> Path:
    """One small file of a hub repository (``model_index.json``, ``vae/config.json``): from the local cache (the
    default one, or ``cache_dir``) when ``HF_HUB_OFFLINE`` is set, else from the cache or the hub. Every failure is
    one StepdistillError line."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import (EntryNotFoundError, GatedRepoError, HFValidationError, LocalEntryNotFoundError,
                                       RepositoryNotFoundError, RevisionNotFoundError)

    at = f" at revision {revision}" if revision else ""
    download = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir,
                                    local_files_only=_offline()))
    except LocalEntryNotFoundError:
        if _offline():
            raise StepdistillError(
                f"{repo_id}: no such folder, and not in the local hub cache{at} (HF_HUB_OFFLINE is set); download it "
                f"with `{download}` (huggingface-cli download on older huggingface_hub) or unset "
                "HF_HUB_OFFLINE, or pass a pipeline folder") from None
        raise StepdistillError(f"{repo_id}: no such folder, and the hub cannot be reached to download it; pass a "
                               "pipeline folder, or download it where the hub is reachable") from None
    except GatedRepoError:
        raise StepdistillError(f"{repo_id} is gated: accept its terms on the hub and log in (`hf auth login`)") \
            from None
    except RepositoryNotFoundError:
        raise StepdistillError(f"{repo_id}: no such folder, and no such model on the hub (or it is private: log in "
                               "with `hf auth login`)") from None
    except RevisionNotFoundError:
        raise StepdistillError(f"--revision {revision}: {repo_id} has no such revision") from None
    except EntryNotFoundError:
        raise StepdistillError(f"{repo_id}{at} has no {filename}; is it a Diffusers pipeline?") from None
    except HFValidationError as e:
        raise StepdistillError(f"{repo_id}: no such folder, and not a valid hub id ({e})") from None
    except OSError as e:  # network trouble
        raise StepdistillError(f"{repo_id}: cannot fetch {filename} from the hub ({str(e).strip().splitlines()[0]})") \
            from None


def pipeline_file(path_or_id: str, filename: str, revision: str | None = None, cache_dir: str | None = None) -> Path:
    """A file of a pipeline, from its folder or (a hub id) from the hub cache / the hub; one-line errors."""
    if _is_local(path_or_id):
        local = Path(path_or_id) / filename
        if not local.is_file():
            raise StepdistillError(f"{path_or_id} has no {filename}: not a complete Diffusers pipeline folder")
        return local
    return hub_file(path_or_id, filename, revision, cache_dir)


def pipeline_class_name(path_or_id: str, revision: str | None = None, cache_dir: str | None = None) -> str | None:
    """The pipeline class named by the model_index.json of a folder or a hub id (cached, when offline); one-line
    errors for a missing folder, an uncached or unknown hub id, or a folder that is no pipeline."""
    path = str(path_or_id)
    if _is_local(path):
        local = Path(path)
        if not local.exists():
            raise StepdistillError(f"{path}: no such directory; pass a Diffusers pipeline folder or a hub id")
        if not (local / "model_index.json").is_file():
            raise StepdistillError(
                f"{path} is not a Diffusers pipeline (no model_index.json); pass a folder written by "
                "pipeline.save_pretrained() or a hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5")
    return json.loads(pipeline_file(path, "model_index.json", revision, cache_dir).read_text()).get("_class_name")


def check_pipeline(path_or_id: str, revision: str | None = None, cache_dir: str | None = None) -> str:
    """Everything about a base pipeline that can be checked without loading weights; returns its kind (sd, sdxl)."""
    return check_supported(pipeline_class_name(path_or_id, revision, cache_dir), str(path_or_id))


def check_supported(class_name: str | None, source: str) -> str:
    if class_name not in SUPPORTED_PIPELINES:
        raise StepdistillError(
            f"{source}: pipeline class {class_name} is not supported; supported: {', '.join(SUPPORTED_PIPELINES)}")
    return SUPPORTED_PIPELINES[class_name]


PROMPT_CACHE_BYTES = 4 * 2**30  # host memory for prompt embeddings: ~36k SD 1.5 captions in bf16, ~17k SDXL ones


def _host(t: torch.Tensor, pin: bool) -> torch.Tensor:
    """An embedding's own copy in host memory (a row of a batch would keep the whole batch alive), pinned beside a
    GPU so the copy back overlaps."""
    t = t.detach().to("cpu", copy=True)
    return t.pin_memory() if pin else t


def _nbytes(entry) -> int:
    return sum(t.numel() * t.element_size() for t in entry if t is not None)


class Teacher:
    """A Stable Diffusion (1.x, 2.x incl. v-prediction) or SDXL pipeline seen as a denoiser with a schedule."""

    def __init__(self, pipe):
        self.kind = check_supported(type(pipe).__name__, type(pipe).__name__)
        self.pipe = pipe
        self.unet = pipe.unet
        self.vae = pipe.vae
        self.scheduler = pipe.scheduler
        config = pipe.scheduler.config
        self.prediction_type = config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise StepdistillError(f"prediction_type {self.prediction_type!r} is not supported")
        self.num_train_timesteps = int(config.num_train_timesteps)
        alphas_cumprod = getattr(pipe.scheduler, "alphas_cumprod", None)
        if alphas_cumprod is None:  # schedulers parameterised by sigmas still share SD's DDPM betas
            from diffusers import DDPMScheduler

            alphas_cumprod = DDPMScheduler.from_config(config).alphas_cumprod
        self.alphas_cumprod = alphas_cumprod.detach().to(torch.float64).cpu()
        # prompt embeddings, kept in host memory (pinned beside a GPU) and bounded: the least recently used go first
        # (a distinct SD 1.5 caption holds 77 x 768 values; 120k captions would fill an 80 GB GPU)
        self._prompt_cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()
        self.prompt_cache_bytes = PROMPT_CACHE_BYTES
        self._prompt_cache_used = 0

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path_or_id: str, torch_dtype: torch.dtype = torch.float32, device="cpu",
                        vae: str | None = None, allow_pickle: bool = False, **kwargs):
        """Load a pipeline as a frozen teacher, its weights in ``torch_dtype`` (the VAE's dtype: ``precision.
        vae_dtype``). ``vae``: another VAE (folder or hub id) in place of the pipeline's, e.g. SDXL's fp16-safe one.
        ``kwargs``: ``revision``, ``variant``, ``cache_dir``, passed to the hub-id path. Weights load from
        safetensors only unless ``allow_pickle`` (stepdistill/safe_weights.py)."""
        from diffusers import DiffusionPipeline

        from .precision import load_vae
        from .safe_weights import check_no_pickle, load_kwargs

        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        kind = check_pipeline(str(path_or_id), kwargs.get("revision"), kwargs.get("cache_dir"))
        check_no_pickle(path_or_id, allow_pickle)
        components = load_vae(str(path_or_id), kind, torch_dtype, vae, **kwargs, **load_kwargs(allow_pickle))
        try:
            pipe = DiffusionPipeline.from_pretrained(path_or_id, dtype=torch_dtype, **kwargs, **components,
                                                     **load_kwargs(allow_pickle))
        except OSError as e:  # e.g. a hub id whose index is cached but not its weights
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise StepdistillError(f"{path_or_id}: cannot load the pipeline ({first_line})") from e
        except ValueError as e:
            if "variant" not in str(e) or "variant" not in kwargs:
                raise
            v = kwargs["variant"]
            raise StepdistillError(f"--variant {v}: {path_or_id} has no {v} weights (files named *.{v}.safetensors); "
                                   "drop --variant or pass a model that has them") from e
        check_supported(type(pipe).__name__, str(path_or_id))
        pipe.set_progress_bar_config(disable=True)
        for component in pipe.components.values():  # the teacher is frozen; students are made trainable
            if isinstance(component, torch.nn.Module):
                component.requires_grad_(False).eval()
        return cls(pipe.to(device))

    @classmethod
    def for_config(cls, config, torch_dtype: torch.dtype = torch.float32, device="cpu") -> "Teacher":
        """The teacher a training config names: base model, VAE, revision, variant, cache folder."""
        return cls.from_pretrained(config.pretrained_model_name_or_path, torch_dtype=torch_dtype, device=device,
                                   vae=getattr(config, "pretrained_vae_model_name_or_path", None),
                                   revision=config.revision, variant=getattr(config, "variant", None),
                                   cache_dir=getattr(config, "cache_dir", None),
                                   allow_pickle=getattr(config, "allow_pickle", False))

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype methods draw noise and hold latents in: float32, also when the frozen weights are held in half
        precision (``weight_dtype``; autocast bridges the two, precision.py)."""
        return torch.float32

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_resolution(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    # ---------------------------------------------------------------- schedule
    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """a_t = sqrt(ᾱ_t), s_t = sqrt(1 - ᾱ_t), shaped to broadcast against ``like``. A negative t means clean
        data (ᾱ = 1): the end point of a jump "to x0"."""
        t = torch.as_tensor(t).to("cpu", torch.long).reshape(-1)
        abar = torch.where(t < 0, torch.ones((), dtype=torch.float64), self.alphas_cumprod[t.clamp(min=0)])
        shape = (-1,) + (1,) * (like.ndim - 1)
        a = abar.sqrt().to(like.device, like.dtype).view(shape)
        s = (1 - abar).sqrt().to(like.device, like.dtype).view(shape)
        return a, s

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self.alpha_sigma(t, x0)
        return a * x0 + s * noise

    def to_x0_eps(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                  prediction_type: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean estimate and noise implied by a model output of the given prediction type."""
        a, s = self.alpha_sigma(t, x_t)
        kind = prediction_type or self.prediction_type
        if kind == "epsilon":
            return (x_t - s * pred) / a, pred
        if kind == "v_prediction":  # v = a ε - s x0  ⇒  x0 = a x_t - s v, ε = s x_t + a v
            return a * x_t - s * pred, s * x_t + a * pred
        if kind == "sample":
            return pred, (x_t - a * pred) / s
        raise StepdistillError(f"unknown prediction_type {kind!r}")

    def to_x0(self, pred, x_t, t, prediction_type=None):
        return self.to_x0_eps(pred, x_t, t, prediction_type)[0]

    def to_eps(self, pred, x_t, t, prediction_type=None):
        return self.to_x0_eps(pred, x_t, t, prediction_type)[1]

    def to_prediction(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
                      prediction_type: str | None = None) -> torch.Tensor:
        """The model output that corresponds to (x0, ε) at t: the inverse of ``to_x0_eps``."""
        kind = prediction_type or self.prediction_type
        if kind == "epsilon":
            return eps
        if kind == "sample":
            return x0
        a, s = self.alpha_sigma(t, x0)
        return a * eps - s * x0

    def ddim_jump(self, x0: torch.Tensor, eps: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
        """Deterministic DDIM (η = 0) step to ``t_next`` given the clean estimate and noise at the current point:
        x_next = a_next x0 + s_next ε. ``t_next < 0`` returns x0."""
        return self.add_noise(x0, eps, t_next)

    def ddim_step(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
                  prediction_type: str | None = None) -> torch.Tensor:
        x0, eps = self.to_x0_eps(pred, x_t, t, prediction_type)
        return self.ddim_jump(x0, eps, t_next)

    # ---------------------------------------------------------------- prompts
    def _encode_uncached(self, prompts: list[str]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        pipe = self.pipe
        with torch.no_grad():
            if self.kind == "sd":
                embeds, _ = pipe.encode_prompt(prompts, self.device, 1, False)
                pooled = [None] * len(prompts)
            else:
                embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=self.device, num_images_per_prompt=1,
                                                          do_classifier_free_guidance=False)
                # SDXL's unconditional branch is all zeros when the pipeline says so (as DMD2 and LCM use it).
                if pipe.config.get("force_zeros_for_empty_prompt", False):
                    empty = torch.tensor([p == "" for p in prompts], device=embeds.device)
                    embeds = torch.where(empty.view(-1, 1, 1), torch.zeros_like(embeds), embeds)
                    pooled = torch.where(empty.view(-1, 1), torch.zeros_like(pooled), pooled)
        return [(embeds[i], None if pooled[i] is None else pooled[i]) for i in range(len(prompts))]

    def encode_prompt(self, prompts: Sequence[str], resolution: int | None = None) -> Conditioning:
        """Encode prompts (each distinct prompt once per Teacher, then served from the cache)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        cache = self._prompt_cache
        missing = list(dict.fromkeys(p for p in prompts if p not in cache))
        found = {p: cache[p] for p in dict.fromkeys(prompts) if p in cache}
        for p in found:
            cache.move_to_end(p)
        if missing:
            pin = self.device.type == "cuda"
            for p, (e, pooled) in zip(missing, self._encode_uncached(missing)):
                e, pooled = _host(e, pin), None if pooled is None else _host(pooled, pin)
                found[p] = cache[p] = (e, pooled)
                self._prompt_cache_used += _nbytes(cache[p])
            while self._prompt_cache_used > self.prompt_cache_bytes and len(cache) > 1:
                self._prompt_cache_used -= _nbytes(cache.popitem(last=False)[1])
        embeds = torch.stack([found[p][0] for p in prompts]).to(self.device, non_blocking=True)
        if self.kind == "sd":
            return Conditioning(embeds)
        pooled = torch.stack([found[p][1] for p in prompts]).to(self.device, non_blocking=True)
        return Conditioning(embeds, pooled, self.add_time_ids(len(prompts), resolution))

    def uncond(self, batch_size: int, resolution: int | None = None) -> Conditioning:
        return self.encode_prompt([""] * batch_size, resolution)

    def add_time_ids(self, batch_size: int, resolution: int | None = None) -> torch.Tensor:
        """SDXL micro-conditioning for an uncropped square image: (h, w, 0, 0, h, w)."""
        r = resolution or self.default_resolution
        ids = torch.tensor([r, r, 0, 0, r, r], dtype=self.dtype, device=self.device)
        return ids.expand(batch_size, 6).clone()

    # ---------------------------------------------------------------- denoising
    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning, unet=None,
                timestep_cond: torch.Tensor | None = None) -> torch.Tensor:
        """Raw UNet output (in the pipeline's prediction type)."""
        unet = unet if unet is not None else self.unet
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(x_t.shape[0])
        kwargs = cond.unet_kwargs()
        if timestep_cond is not None:
            kwargs["timestep_cond"] = timestep_cond
        # under autocast a half-precision output comes back in x_t's dtype (float32): the methods' arithmetic on
        # predictions (guidance, x0 / ε conversions, losses) stays float32; a no-op without mixed precision
        return unet(x_t, t, **kwargs, return_dict=False)[0].to(x_t.dtype)

    def guided_predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                       guidance_scale: float | torch.Tensor, uncond: Conditioning | None = None, unet=None,
                       timestep_cond: torch.Tensor | None = None) -> torch.Tensor:
        """Classifier-free guidance, Imagen convention: out_u + w (out_c - out_u), cond and uncond in ONE UNet call.

        Every prediction type (ε, v, x0) is affine in the output with the same x_t coefficient, so guiding the raw
        output equals guiding ε or x0. ``guidance_scale`` may be a float or a per-sample tensor; w = 1 (everywhere)
        skips the unconditional half and returns exactly the conditional prediction.
        """
        w = torch.as_tensor(guidance_scale, dtype=x_t.dtype, device=x_t.device)
        if bool((w == 1).all()):
            return self.predict(x_t, t, cond, unet, timestep_cond)
        if uncond is None:  # SDXL: the conditional half's micro-conditioning, as the pipelines' negative_add_time_ids
            uncond = self.uncond(x_t.shape[0]).to(x_t.device)
            uncond.add_time_ids = cond.add_time_ids
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(x_t.shape[0])
        both = Conditioning.cat([uncond, cond])
        tc = None if timestep_cond is None else torch.cat([timestep_cond, timestep_cond])
        out_u, out_c = self.predict(torch.cat([x_t, x_t]), torch.cat([t, t]), both, unet, tc).chunk(2)
        w = w.reshape(-1, *([1] * (x_t.ndim - 1))) if w.ndim else w
        return out_u + w * (out_c - out_u)

    # ---------------------------------------------------------------- latents
    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @torch.no_grad()
    def latent_dist(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [-1, 1] → mean and std of the VAE posterior, in scaled latent space (float32)."""
        with _own_dtype(self.vae.device):
            dist = self.vae.encode(images.to(self.vae.device, self.vae.dtype)).latent_dist
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (dist.mean.float() - shift) * self.scaling_factor, dist.std.float() * self.scaling_factor

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] → scaled VAE latents (a posterior sample, as SD training does)."""
        mean, std = self.latent_dist(images)
        return mean + std * torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents → images in [0, 1]."""
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        with _own_dtype(self.vae.device):
            images = self.vae.decode(latents.to(self.vae.dtype) / self.scaling_factor + shift).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)


def _own_dtype(device: torch.device):
    """Autocast off: the VAE computes in the dtype it is held in (SDXL's stock VAE in float32 under mixed precision,
    as the Diffusers SDXL scripts encode outside autocast; fp16 autocast would overflow it)."""
    return torch.autocast(device_type=device.type, enabled=False)
