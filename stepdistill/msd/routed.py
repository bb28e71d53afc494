"""An MSD output at inference: a stock pipeline carrying K student LoRAs, called like the stock pipeline, routing
each prompt to its student (MSD paper section 3: NFE stays that of one student).

Prompts of a call are grouped per student (``set_adapters`` switches the LoRA), so a batch costs at most K UNet
passes per step; per-prompt generators and latents follow their prompts, and the images come back in the input
order in the stock output object. A prompt the router has not seen goes to the nearest part (k-means routers use its
pooled text embedding) — also one far from every part.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from .partition import Router, pooled_text_embeddings

_OWN = ("pipe", "router", "adapter_names")


@dataclasses.dataclass
class MSDStudents:
    """What an MSD output is made of before it is written: the students' output folders (each a stepdistill LoRA
    output, inside the MSD folder) and the router."""

    student_dirs: list[Path]
    router: Router


class RoutedPipeline:
    def __init__(self, pipe, router: Router, adapter_names: list[str]):
        object.__setattr__(self, "pipe", pipe)
        object.__setattr__(self, "router", router)
        object.__setattr__(self, "adapter_names", adapter_names)

    def __getattr__(self, name: str) -> Any:  # everything else is the stock pipeline's (scheduler, unet, ...)
        return getattr(self.pipe, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self.pipe, name, value)

    def route(self, prompts: list[str]) -> list[int]:
        unseen = [p for p in prompts if p not in self.router.assignments]
        embeddings = None
        if unseen and self.router.kind == "kmeans":
            embeddings = pooled_text_embeddings(self.pipe, prompts)
        return self.router.route(prompts, embeddings)

    def __call__(self, prompt=None, *, generator=None, latents=None, num_images_per_prompt: int = 1, **kwargs):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        # one row per image, as the stock pipeline orders them (each prompt's images next to each other)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        parts = self.route(prompts)
        images: list = [None] * len(prompts)
        out = None
        for k in sorted(set(parts)):
            rows = [i for i, part in enumerate(parts) if part == k]
            self.pipe.set_adapters(self.adapter_names[k])
            out = self.pipe([prompts[i] for i in rows], **kwargs,
                            generator=[generator[i] for i in rows] if isinstance(generator, list) else generator,
                            latents=None if latents is None else latents[rows])
            for j, i in enumerate(rows):
                images[i] = out.images[j]
        if isinstance(out.images, torch.Tensor):
            images = torch.stack(images)
        elif not isinstance(out.images, list):  # numpy
            import numpy as np

            images = np.stack(images)
        fields = {f.name: None for f in dataclasses.fields(type(out))}
        return type(out)(**{**fields, "images": images})
