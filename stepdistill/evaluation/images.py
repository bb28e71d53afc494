"""Images on disk and in memory: the reference folder and its checks, the ``crop_lanczos_256`` preprocessing of the
COCO-2014 protocol, clean-fid's resize to 299, the evaluation's ``images/{i:05d}.png`` files and the grids
(evaluation, validation, toy tables)."""

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

CROP_LANCZOS = "crop_lanczos_256"
# the name this rule had before it was called by what it does (``--preprocess clean``); still accepted
PREPROCESS_ALIASES = {"clean": CROP_LANCZOS}

RESIZE_RULES = {
    "none": "images as stored (uint8, real and generated alike), then the feature extractor's own resize",
    CROP_LANCZOS: f"center crop to the shorter side, PIL Lanczos resize to {CLEAN_SIZE}x{CLEAN_SIZE} (uint8), then "
                  "the feature extractor's own resize; applied identically to real and generated images (the COCO "
                  "image step of GigaGAN's evaluation/evaluation.py, which DMD2 and SiD-LSG reuse)",
}


def canonical_preprocess(name: str) -> str:
    """``--preprocess`` by its current name (``clean`` is the old name of ``crop_lanczos_256``)."""
    return PREPROCESS_ALIASES.get(name, name)


def list_images(directory: str | Path) -> list[Path]:
    return sorted(p for p in Path(directory).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def check_reference_dir(directory: str | Path, preprocess: str) -> tuple[list[Path], list[tuple[int, int]]]:
    """The reference images and their distinct sizes, after checking they can be fed to the extractor."""
    directory = Path(directory)
    if not directory.is_dir():
        raise StepdistillError(f"--reference_dir {directory}: no such directory; pass a folder of real images")
    paths = list_images(directory)
    if len(paths) < 2:
        raise StepdistillError(f"--reference_dir {directory}: {len(paths)} images found (extensions "
                               f"{', '.join(IMAGE_EXTENSIONS)}); FID needs at least 2")
    return paths, check_image_files(paths, preprocess, f"--reference_dir {directory}")


def check_image_files(paths: Sequence[Path], preprocess: str, name: str) -> list[tuple[int, int]]:
    """The distinct sizes of image files, after checking each opens and that they can be batched."""
    from PIL import Image, UnidentifiedImageError

    sizes: dict[tuple[int, int], Path] = {}
    for p in paths:
        try:
            with Image.open(p) as im:  # reads the header only
                sizes.setdefault(im.size, p)
        except (UnidentifiedImageError, OSError) as e:
            raise StepdistillError(f"{name}: cannot read {p.name} as an image ({e}); remove or replace it") from None
    if len(sizes) > 1 and preprocess == "none":
        (s1, p1), (s2, p2) = list(sizes.items())[:2]
        raise StepdistillError(f"{name}: images of mixed sizes ({p1.name} is {s1[0]}x{s1[1]}, "
                               f"{p2.name} is {s2[0]}x{s2[1]}); resize them or pass --preprocess {CROP_LANCZOS}")
    return list(sizes)


def center_crop_lanczos(image, size: int = CLEAN_SIZE):
    """Center crop to a square on the shorter side, then PIL Lanczos to ``size``: the COCO-30k image rule
    (``--preprocess crop_lanczos_256``)."""
    from PIL import Image

    w, h = image.size
    s = min(w, h)
    # the offset torchvision's center_crop takes (round half to even), as GigaGAN's CenterCropLongEdge calls it; a
    # floor differs by one pixel when the sides differ by 3 mod 4 (e.g. 640x425)
    left, top = int(round((w - s) / 2.0)), int(round((h - s) / 2.0))
    return image.crop((left, top, left + s, top + s)).resize((size, size), Image.LANCZOS)


clean_resize = center_crop_lanczos  # the old name


def clean_fid_resize(image_hwc: np.ndarray, size: int = 299) -> np.ndarray:
    """clean-fid's "clean" resize to Inception's input: each channel as a float32 PIL image (mode ``F``), PIL
    bicubic to ``size`` x ``size``, clipped to [0, 255], no quantisation; uint8 ``(H, W, 3)`` in, float32
    ``(size, size, 3)`` out. (clean-fid: cleanfid/resize.py, ``make_resizer("PIL", False, "bicubic", (299, 299))``
    as ``build_resizer("clean")`` returns it.)"""
    from PIL import Image

    channels = []
    for c in range(image_hwc.shape[2]):
        # a 2-D float32 array becomes a mode-F image (the `mode` argument of fromarray is deprecated in Pillow 11)
        channel = Image.fromarray(np.ascontiguousarray(image_hwc[:, :, c], dtype=np.float32))
        channels.append(np.asarray(channel.resize((size, size), Image.BICUBIC)).clip(0, 255))
    return np.stack(channels, axis=2).astype(np.float32)


def load_images(paths: Sequence[Path], preprocess: str = "none") -> torch.Tensor:
    """uint8 RGB images ``(N, 3, H, W)`` from files, preprocessed for the feature extractor."""
    from PIL import Image

    arrays = []
    for p in paths:
        with Image.open(p) as im:
            im = im.convert("RGB")
            if canonical_preprocess(preprocess) == CROP_LANCZOS:
                im = center_crop_lanczos(im)
            arrays.append(np.asarray(im))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _clean_batch(images: torch.Tensor) -> torch.Tensor:
    from PIL import Image

    out = [np.asarray(center_crop_lanczos(Image.fromarray(im.permute(1, 2, 0).numpy()))) for im in images]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def preprocess_images(images: torch.Tensor, preprocess: str) -> torch.Tensor:
    return _clean_batch(images) if canonical_preprocess(preprocess) == CROP_LANCZOS else images


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
