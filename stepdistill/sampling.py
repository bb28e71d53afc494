"""Batched image generation through a stock Diffusers pipeline, seeded per image so results do not depend on the
batch size, with a progress bar."""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm


def generate(pipe, prompts: Sequence[str], *, guidance_scale: float, num_inference_steps: int | None = None,
             batch_size: int = 250, seed: int = 0, progress: bool = True, desc: str = "sampling",
             **call_kwargs) -> torch.Tensor:
    """Images for ``prompts`` as uint8 (N, 3, H, W). Image i always uses the generator seeded ``seed + i``.
    Pass ``num_inference_steps`` or ``timesteps`` (a recipe with explicit timesteps gives only the latter)."""
    if num_inference_steps is not None:
        call_kwargs["num_inference_steps"] = num_inference_steps
    out = []
    pipe.set_progress_bar_config(disable=True)
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress):
        chunk = list(prompts[start:start + batch_size])
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        with torch.no_grad():
            images = pipe(chunk, guidance_scale=guidance_scale, generator=generators, output_type="pt",
                          **call_kwargs).images
        out.append((images.clamp(0, 1) * 255).round().to(torch.uint8).cpu())
    return torch.cat(out)


def cycle_prompts(prompts: Sequence[str], n: int) -> list[str]:
    """``n`` prompts taken round-robin, so every prompt is used equally often."""
    return [prompts[i % len(prompts)] for i in range(n)]


def save_grid(images: torch.Tensor, path, nrow: int = 10, upscale: int = 4, rows_labels=None) -> None:
    """Write uint8 images (N, 3, H, W) as one PNG grid, upscaled with nearest neighbour so tiny images stay
    legible."""
    from PIL import Image

    n, c, h, w = images.shape
    ncol = min(nrow, n)
    nrows = (n + ncol - 1) // ncol
    pad = 1
    grid = torch.full((c, nrows * (h + pad) + pad, ncol * (w + pad) + pad), 128, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        grid[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = images[i]
    img = Image.fromarray(grid.permute(1, 2, 0).numpy())
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    img.save(path)
