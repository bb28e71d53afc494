"""The digits classifier: the tiny-digits world's stand-in for Inception (features → digits-FID) and for CLIP
(predictions → prompt agreement)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .data import RESOLUTION

WEIGHTS_NAME = "digits_classifier.safetensors"
CONFIG_NAME = "digits_classifier.json"


class DigitsClassifier(nn.Module):
    """A small CNN on 16x16 RGB images. ``features`` is the penultimate layer, used for digits-FID.

    ``forward`` takes uint8 images in [0, 255] or float images in [0, 1] of any size (resized to 16x16), the way
    torchmetrics' FID hands images to a custom feature extractor, and returns features.
    """

    def __init__(self, width: int = 32, feature_dim: int = 64, num_classes: int = 10):
        super().__init__()
        self.config = {"width": width, "feature_dim": feature_dim, "num_classes": num_classes}
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),  # 8x8
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),  # 4x4
            nn.Flatten(),
            nn.Linear(2 * width * 16, feature_dim), nn.SiLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)
        self.num_features = feature_dim

    @staticmethod
    def preprocess(images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        if images.shape[1] == 3:
            images = images.mean(dim=1, keepdim=True)
        if images.shape[-2:] != (RESOLUTION, RESOLUTION):
            images = F.interpolate(images, size=(RESOLUTION, RESOLUTION), mode="bilinear", antialias=True,
                                   align_corners=False)
        return images * 2 - 1

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(self.preprocess(images))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, directory / WEIGHTS_NAME)
        (directory / CONFIG_NAME).write_text(json.dumps(self.config, indent=2))

    @classmethod
    def load(cls, directory: str | Path) -> "DigitsClassifier":
        directory = Path(directory)
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"no digits classifier at {weights}: run `stepdistill toy build` to make one")
        config = json.loads((directory / CONFIG_NAME).read_text())
        model = cls(**config)
        model.load_state_dict(load_file(weights))
        return model.eval().requires_grad_(False)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 2 pixels and a little contrast jitter: generated digits are never pixel-aligned."""
    n = images.shape[0]
    padded = F.pad(images, (2, 2, 2, 2))
    dx = torch.randint(0, 5, (n,), generator=generator)
    dy = torch.randint(0, 5, (n,), generator=generator)
    out = torch.stack([padded[i, :, dy[i]:dy[i] + RESOLUTION, dx[i]:dx[i] + RESOLUTION] for i in range(n)])
    gain = 0.8 + 0.4 * torch.rand(n, 1, 1, 1, generator=generator)
    return (out * gain).clamp(0, 1)


def train_classifier(images: torch.Tensor, labels: torch.Tensor, steps: int = 3000, batch_size: int = 128,
                     seed: int = 0, holdout: float = 0.2, progress: bool = True) -> tuple[DigitsClassifier, float]:
    """Train on (1 - holdout) of the data; return the model and its accuracy on the held-out part."""
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    perm = torch.randperm(len(images), generator=g)
    n_hold = int(len(images) * holdout)
    hold, train = perm[:n_hold], perm[n_hold:]
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    for _ in tqdm(range(steps), desc="classifier", disable=not progress):
        idx = train[torch.randint(0, len(train), (batch_size,), generator=g)]
        loss = F.cross_entropy(model.logits(augment(images[idx], g)), labels[idx], label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval().requires_grad_(False)
    with torch.no_grad():
        acc = (model.logits(images[hold]).argmax(1) == labels[hold]).float().mean().item()
    return model, acc
