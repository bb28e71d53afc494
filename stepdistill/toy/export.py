"""Write the digits as an image folder with ``metadata.jsonl`` (``file_name``, ``text``): the layout Hugging Face's
imagefolder reads, so trainers read toy data and real data through the same loader."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import StepdistillError
from . import data


def digit_samples(seed: int = 0):
    """(PIL image, caption, label) for all 1797 digits; each caption is a training template drawn with ``seed``."""
    from PIL import Image

    images, labels = data.load_digits_images()
    images = data.to_uint8(images)
    g = torch.Generator().manual_seed(seed)
    n_templates = len(data.TRAIN_TEMPLATES)
    out = []
    for img, label in zip(images, labels.tolist()):
        template = data.TRAIN_TEMPLATES[int(torch.randint(0, n_templates, (1,), generator=g))]
        out.append((Image.fromarray(img.permute(1, 2, 0).numpy()), template.format(name=data.NAMES[label], k=label),
                    label))
    return out


def export_data(directory: str | Path, seed: int = 0) -> Path:
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StepdistillError(f"{directory}: cannot create the export directory ({e.strerror})") from e
    if any(directory.iterdir()):
        raise StepdistillError(f"{directory} is not empty; pass a new or empty directory")
    rows = []
    for i, (image, text, label) in enumerate(digit_samples(seed)):
        name = f"{i:04d}.png"
        image.save(directory / name)
        rows.append({"file_name": name, "text": text, "label": label})
    with open(directory / "metadata.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return directory
