"""Images on disk and in memory: the reference folder and its checks, the ``clean`` preprocessing of the COCO-2014
protocol, the evaluation's ``images/{i:05d}.png`` files and the grids (evaluation, validation, toy tables)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import StepdistillError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CLEAN_SIZE = 256
IMAGES_DIR = "images"

RESIZE_RULES = {
    "none": "images as stored (uint8, real and generated alike), then the feature extractor's own resize",
    "clean": f"center crop to the shorter side, PIL Lanczos resize to {CLEAN_SIZE}x{CLEAN_SIZE} (uint8), then the "
             "feature extractor's own resize; applied identically to real and generated images",
}


def list_images(directory: str | Path) -> list[Path]:
    return sorted(p for p in Path(directory).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def check_reference_dir(directory: str | Path, preprocess: str) -> tuple[list[Path], list[tuple[int, int]]]:
    """The reference images and their distinct sizes, after checking they can be fed to the extractor."""
    from PIL import Image, UnidentifiedImageError

    directory = Path(directory)
    if not directory.is_dir():
        raise StepdistillError(f"--reference_dir {directory}: no such directory; pass a folder of real images")
    paths = list_images(directory)
    if len(paths) < 2:
        raise StepdistillError(f"--reference_dir {directory}: {len(paths)} images found (extensions "
                               f"{', '.join(IMAGE_EXTENSIONS)}); FID needs at least 2")
    sizes: dict[tuple[int, int], Path] = {}
    for p in paths:
        try:
            with Image.open(p) as im:  # reads the header only
                sizes.setdefault(im.size, p)
        except (UnidentifiedImageError, OSError) as e:
            raise StepdistillError(f"--reference_dir {directory}: cannot read {p.name} as an image ({e})") from e
    if len(sizes) > 1 and preprocess == "none":
        (s1, p1), (s2, p2) = list(sizes.items())[:2]
        raise StepdistillError(f"--reference_dir {directory}: images of mixed sizes ({p1.name} is {s1[0]}x{s1[1]}, "
                               f"{p2.name} is {s2[0]}x{s2[1]}); resize them or pass --preprocess clean")
    return paths, list(sizes)


def clean_resize(image, size: int = CLEAN_SIZE):
    """Center crop to a square on the shorter side, then PIL Lanczos to ``size``: the COCO-30k rule."""
    from PIL import Image

    w, h = image.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return image.crop((left, top, left + s, top + s)).resize((size, size), Image.LANCZOS)


def load_images(paths: Sequence[Path], preprocess: str = "none") -> torch.Tensor:
    """uint8 RGB images ``(N, 3, H, W)`` from files, preprocessed for the feature extractor."""
    from PIL import Image

    arrays = []
    for p in paths:
        with Image.open(p) as im:
            im = im.convert("RGB")
            if preprocess == "clean":
                im = clean_resize(im)
            arrays.append(np.asarray(im))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _clean_batch(images: torch.Tensor) -> torch.Tensor:
    from PIL import Image

    out = [np.asarray(clean_resize(Image.fromarray(im.permute(1, 2, 0).numpy()))) for im in images]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def preprocess_images(images: torch.Tensor, preprocess: str) -> torch.Tensor:
    return _clean_batch(images) if preprocess == "clean" else images


def save_png(image: torch.Tensor, path: Path) -> None:
    from PIL import Image

    # write then rename: an interrupted run never leaves a truncated PNG that a resume would trust
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp, format="PNG")
    os.replace(tmp, path)


def image_path(output_dir: str | Path, i: int) -> Path:
    return Path(output_dir) / IMAGES_DIR / f"{i:05d}.png"


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


def write_eval_grid(output_dir: Path, n: int) -> Path:
    """``grid.png`` of an evaluation directory: its first images, about 4k pixels wide whatever the resolution."""
    first = load_images([image_path(output_dir, 0)])
    w = first.shape[-1]
    nrow = min(10, max(2, 4096 // w))
    count = min(n, nrow * nrow)
    images = load_images([image_path(output_dir, i) for i in range(count)])
    path = output_dir / "grid.png"
    save_grid(images, path, nrow=nrow, upscale=max(1, 64 // w))
    return path
