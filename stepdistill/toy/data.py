"""The tiny-digits data: scikit-learn's bundled 8x8 digits as 16x16 RGB images, and their prompts."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
RESOLUTION = 16

# Several templates per digit. `{name}` is the word, `{k}` the numeral. Evaluation templates are held out of
# training: they recombine known words in new sentences, which is what a user's prompt does.
TRAIN_TEMPLATES = [
    "a handwritten digit {name}",
    "the number {k}",
    "the digit {name}",
    "a drawing of the number {name}",
    "handwritten {k}",
    "a photo of a handwritten {name}",
    "{name}",
    "an image of the digit {k}",
]
EVAL_TEMPLATES = [
    "a drawing of the digit {k}",
    "the handwritten number {name}",
    "an image of a handwritten digit {name}",
    "a photo of the number {k}",
]


def prompts_for(digit: int, templates: list[str]) -> list[str]:
    return [t.format(name=NAMES[digit], k=digit) for t in templates]


def train_prompts() -> list[str]:
    return [p for d in range(10) for p in prompts_for(d, TRAIN_TEMPLATES)]


def eval_prompts() -> list[str]:
    return [p for d in range(10) for p in prompts_for(d, EVAL_TEMPLATES)]


def vocabulary() -> list[str]:
    words = {w for p in train_prompts() + eval_prompts() for w in p.split()}
    return sorted(words)


def digit_of_prompt(prompt: str) -> int | None:
    """The digit a prompt asks for (its name or numeral), or None when it names none or several."""
    found = set()
    for word in prompt.lower().replace(",", " ").split():
        if word in NAMES:
            found.add(NAMES.index(word))
        elif word.isdigit() and len(word) == 1:
            found.add(int(word))
    return found.pop() if len(found) == 1 else None


def load_digits_images(resolution: int = RESOLUTION) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as float RGB images in [0, 1], shape (N, 3, R, R), ink bright on dark, and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]
    images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)
    images = images.clamp(0, 1).repeat(1, 3, 1, 1)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    return images, labels


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats to uint8, the quantisation every saved image goes through."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)
