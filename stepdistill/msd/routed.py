"""An MSD output at inference: a stock pipeline carrying K student LoRAs, called like the stock pipeline, routing
each prompt to its student (MSD paper section 3: NFE stays that of one student).

Prompts of a call are grouped per student (``set_adapters`` switches the LoRA; full-UNet students are swapped in as
``pipe.unet`` for their group and the pipeline's own UNet is put back after), so a batch costs at most K UNet
passes per step; per-prompt generators and latents follow their prompts, and the images come back in the input
order in the stock output object. A prompt the router has not seen goes to the nearest part (k-means routers use its
pooled text embedding) — also one far from every part.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from ..errors import StepdistillError
from .partition import Router, pooled_text_embeddings

_OWN = ("pipe", "router", "adapter_names", "unets")


@dataclasses.dataclass
class MSDStudents:
    """What an MSD output is made of before it is written: the students' output folders (each a stepdistill LoRA
    output, inside the MSD folder) and the router."""

    student_dirs: list[Path]
    router: Router


class RoutedPipeline:
    routes_prompts = True  # the evaluation passes routing_prompts beside prompt_embeds

    def __init__(self, pipe, router: Router, adapter_names: list[str] | None = None, unets: list | None = None):
        object.__setattr__(self, "pipe", pipe)
        object.__setattr__(self, "router", router)
        object.__setattr__(self, "adapter_names", adapter_names)
        object.__setattr__(self, "unets", unets)

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

    def __call__(self, prompt=None, *, routing_prompts=None, generator=None, latents=None,
                 num_images_per_prompt: int = 1, **kwargs):
        """The stock call. Called with ``prompt_embeds`` instead of prompts (stepdistill's evaluation encodes each
        prompt once), ``routing_prompts`` names the prompts the router routes: per-prompt tensors among the
        arguments are split along with them."""
        if prompt is None and routing_prompts is None:
            raise StepdistillError("an MSD pipeline routes by prompt: pass prompt=[...] (or routing_prompts=[...] "
                                   "beside prompt_embeds)")
        texts = list(routing_prompts if prompt is None else ([prompt] if isinstance(prompt, str) else prompt))
        # one row per image, as the stock pipeline orders them (each prompt's images next to each other)
        prompts = [p for p in texts for _ in range(num_images_per_prompt)]
        per_row = {}
        for key, value in kwargs.items():
            if torch.is_tensor(value) and value.ndim and value.shape[0] == len(texts):
                per_row[key] = value.repeat_interleave(num_images_per_prompt, dim=0)
        parts = self.route(prompts)
        images: list = [None] * len(prompts)
        out = None
        own_unet = self.pipe.unet
        try:
            for k in sorted(set(parts)):
                rows = [i for i, part in enumerate(parts) if part == k]
                if self.unets is not None:
                    self.pipe.unet = self.unets[k]
                else:
                    self.pipe.set_adapters(self.adapter_names[k])
                call = {**kwargs, **{key: value[rows] for key, value in per_row.items()}}
                out = self.pipe(None if prompt is None else [prompts[i] for i in rows], **call,
                                generator=[generator[i] for i in rows] if isinstance(generator, list) else generator,
                                latents=None if latents is None else latents[rows])
                for j, i in enumerate(rows):
                    images[i] = out.images[j]
        finally:
            self.pipe.unet = own_unet
        if isinstance(out.images, torch.Tensor):
            images = torch.stack(images)
        elif not isinstance(out.images, list):  # numpy
            import numpy as np

            images = np.stack(images)
        fields = {f.name: None for f in dataclasses.fields(type(out))}
        return type(out)(**{**fields, "images": images})
