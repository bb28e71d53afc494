"""The one generation path: a stock Diffusers pipeline called with per-image seeds and counted UNet evaluations.

:class:`Sampler` serves ``stepdistill eval`` (batch by batch, resumable), the sampling benchmark, and — through
:func:`generate` — the trainer's validation grids and the tiny-digits scorer. Image i of a call is always drawn
with the CPU generator seeded ``seeds[i]``, so an image depends neither on the device nor on the batch size.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from contextlib import contextmanager
from typing import Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..teacher import check_supported


class ForwardMeter:
    """Counts a module's forward passes in samples (a CFG UNet call on 2B latents counts 2B) and, with ``time_it``,
    their wall time (CUDA synchronised)."""

    def __init__(self, module: nn.Module | Sequence[nn.Module], time_it: bool = False):
        self.modules = list(module) if isinstance(module, (list, tuple)) else [module]
        self.module, self.time_it = self.modules[0], time_it
        self.samples = 0
        self.seconds = 0.0
        self._start = 0.0

    def _pre(self, module, args, kwargs):
        if self.time_it:
            _sync(self.module)
            self._start = time.perf_counter()

    def _post(self, module, args, kwargs, output):
        sample = args[0] if args else kwargs.get("sample")
        if sample is not None:
            self.samples += int(sample.shape[0])
        if self.time_it:
            _sync(self.module)
            self.seconds += time.perf_counter() - self._start

    @contextmanager
    def counting(self):
        handles = [h for m in self.modules for h in (m.register_forward_pre_hook(self._pre, with_kwargs=True),
                                                     m.register_forward_hook(self._post, with_kwargs=True))]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()


def sampling_unets(pipe) -> list[nn.Module]:
    """The UNets a pipeline samples with: its own, or a routed MSD pipeline's K full-UNet students."""
    return list(getattr(pipe, "unets", None) or [pipe.unet])


def _sync(module: nn.Module) -> None:
    p = next(module.parameters(), None)
    if p is not None and p.device.type == "cuda":
        torch.cuda.synchronize(p.device)


class Sampler:
    """A stock Diffusers pipeline called with per-image seeds and counted UNet calls, returning uint8 images.

    ``cache_prompts=True`` (evaluation, benchmark): each distinct prompt is encoded on its own, once (an LRU bounds
    the cache: 30k COCO captions of SDXL embeddings would not fit), so an image never depends on which other
    prompts shared its batch or were cached before, and a resumed run reproduces an uninterrupted one. The negative
    embeddings come from the pipeline's own ``encode_prompt`` with CFG on, so SDXL's zeroed negative prompt and
    SD's encoded "" stay exactly the pipeline's choice; images are quantised from float32.

    ``cache_prompts=False`` (:func:`generate`: validation grids, the tiny-digits scorer): the prompts go to the
    pipeline as text, which encodes each batch itself, and images are quantised in the pipeline's output dtype —
    how those callers have always sampled, kept so their numbers do not move (the text encoder's batched matmuls
    may differ from one-prompt encodings in the last bits).
    """

    def __init__(self, pipe, call_kwargs: dict, cache_prompts: bool = True, cache_size: int = 1024,
                 time_unet: bool = False):
        self.pipe = pipe
        self.cache_prompts = cache_prompts
        base = getattr(pipe, "pipe", pipe)  # a routed MSD pipeline wraps a stock one
        self.kind = check_supported(type(base).__name__, type(base).__name__) if cache_prompts else None
        self.call_kwargs = dict(call_kwargs)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()
        self._negative: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.counter = ForwardMeter(sampling_unets(pipe), time_it=time_unet)
        pipe.set_progress_bar_config(disable=True)

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    @torch.no_grad()
    def _encode(self, prompt: str, cfg: bool):
        out = self.pipe.encode_prompt(prompt=[prompt], device=self.device, num_images_per_prompt=1,
                                      do_classifier_free_guidance=cfg)
        if self.kind == "sdxl":
            embeds, negative, pooled, negative_pooled = out
        else:
            (embeds, negative), pooled, negative_pooled = out, None, None
        return (embeds, pooled), (negative, negative_pooled)

    def _embedding(self, prompt: str):
        if prompt in self._cache:
            self._cache.move_to_end(prompt)
            return self._cache[prompt]
        value = self._encode(prompt, False)[0]
        self._cache[prompt] = value
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return value

    def embed_kwargs(self, prompts: Sequence[str], cfg: bool) -> dict:
        """``prompt_embeds`` (and pooled/negative ones) for a batch, as the pipeline's ``__call__`` takes them."""
        pairs = [self._embedding(p) for p in prompts]
        kwargs = {"prompt_embeds": torch.cat([e for e, _ in pairs])}
        if self.kind == "sdxl":
            kwargs["pooled_prompt_embeds"] = torch.cat([p for _, p in pairs])
        if cfg:
            if self._negative is None:
                self._negative = self._encode("", True)[1]
            negative, negative_pooled = self._negative
            kwargs["negative_prompt_embeds"] = negative.expand(len(prompts), *negative.shape[1:])
            if self.kind == "sdxl":
                kwargs["negative_pooled_prompt_embeds"] = negative_pooled.expand(len(prompts), -1)
        return kwargs

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], seeds: Sequence[int], **overrides) -> torch.Tensor:
        """uint8 images ``(N, 3, H, W)`` for ``prompts``, image k drawn with the generator seeded ``seeds[k]``."""
        kwargs = {**self.call_kwargs, **overrides}
        if self.cache_prompts:
            prompt_kwargs = self.embed_kwargs(prompts, float(kwargs.get("guidance_scale", 1.0)) > 1.0)
            if getattr(type(self.pipe), "routes_prompts", False):  # an MSD pipeline routes by the prompt text
                prompt_kwargs["routing_prompts"] = list(prompts)
        else:
            prompt_kwargs = {"prompt": list(prompts)}
        # CPU generators: diffusers draws the noise on the CPU and moves it, so image i is the same on any device
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        with self.counter.counting():
            images = self.pipe(**prompt_kwargs, generator=generators, output_type="pt", **kwargs).images
        if self.cache_prompts:
            images = images.float()
        return (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu()

    def generate(self, prompts: Sequence[str], batch_size: int, seed: int = 0, progress: bool = True,
                 desc: str = "sampling") -> torch.Tensor:
        """All of ``prompts`` in batches of ``batch_size``, image i seeded ``seed + i``."""
        out = []
        for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress):
            chunk = list(prompts[start:start + batch_size])
            out.append(self(chunk, range(seed + start, seed + start + len(chunk))))
        return torch.cat(out)


def generate(pipe, prompts: Sequence[str], *, guidance_scale: float, num_inference_steps: int | None = None,
             batch_size: int = 250, seed: int = 0, progress: bool = True, desc: str = "sampling",
             cache_prompts: bool = False, **call_kwargs) -> torch.Tensor:
    """Images for ``prompts`` as uint8 (N, 3, H, W) through a :class:`Sampler`. Image i always uses the generator
    seeded ``seed + i``. Pass ``num_inference_steps`` or ``timesteps`` (a recipe with explicit timesteps gives only
    the latter)."""
    if num_inference_steps is not None:
        call_kwargs["num_inference_steps"] = num_inference_steps
    sampler = Sampler(pipe, {"guidance_scale": guidance_scale, **call_kwargs}, cache_prompts=cache_prompts)
    return sampler.generate(prompts, batch_size, seed=seed, progress=progress, desc=desc)


def cycle_prompts(prompts: Sequence[str], n: int) -> list[str]:
    """``n`` prompts taken round-robin, so every prompt is used equally often."""
    return [prompts[i % len(prompts)] for i in range(n)]
