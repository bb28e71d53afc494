"""Training data: image folders with ``metadata.jsonl``, Hugging Face datasets, WebDataset shards, or a prompt
file; checked before training, optionally VAE-encoded once, and served in an order that depends only on
(seed, iteration) so that distributed and resumed runs see exactly the samples an uninterrupted run sees."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import StepdistillError
from .prompts import read_prompts

logger = logging.getLogger(__name__)


def load_image(source: Any, resolution: int) -> torch.Tensor:
    """An image (path, bytes or PIL image) → float tensor in [-1, 1], shorter side resized (Lanczos) to
    ``resolution`` then center-cropped, as the Diffusers training scripts do."""
    import io

    from PIL import Image

    if isinstance(source, (str, Path)):
        img = Image.open(source)
    elif isinstance(source, (bytes, bytearray)):
        img = Image.open(io.BytesIO(source))
    else:
        img = source
    img = img.convert("RGB")
    w, h = img.size
    scale = resolution / min(w, h)
    if scale != 1:
        img = img.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.LANCZOS)
    w, h = img.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0)
    return arr.permute(2, 0, 1).contiguous()


@dataclass
class Sample:
    caption: str
    image: Any = None  # a path, bytes or PIL image; None for prompt-only data


class ImageCaptionDataset:
    """Map-style list of samples. Unreadable images are skipped with a warning naming them; more than
    ``max_bad`` is an error."""

    def __init__(self, samples: list[Sample], resolution: int, max_bad: int = 10):
        self.samples, self.resolution, self.max_bad = samples, resolution, max_bad
        self.bad: set[int] = set()
        self.has_images = bool(samples) and samples[0].image is not None

    def __len__(self) -> int:
        return len(self.samples)

    def check_images(self) -> None:
        """Open every image header once, before training: a broken file is found now, not at step 40k."""
        from PIL import Image

        for i, s in enumerate(self.samples):
            if isinstance(s.image, (str, Path)):
                try:
                    with Image.open(s.image) as img:
                        img.verify()
                except Exception as e:  # PIL raises many types for broken files
                    self._mark_bad(i, f"{s.image}: {e}")

    def _mark_bad(self, index: int, why: str) -> None:
        self.bad.add(index)
        logger.warning("skipping unreadable image %s", why)
        if len(self.bad) > self.max_bad:
            raise StepdistillError(f"more than {self.max_bad} unreadable images (last: {why}); fix the data or "
                                   "raise --max_bad_images")

    def get(self, index: int) -> tuple[torch.Tensor | None, str]:
        n = len(self.samples)
        for offset in range(n):
            i = (index + offset) % n
            if i in self.bad:
                continue
            s = self.samples[i]
            if s.image is None:
                return None, s.caption
            try:
                return load_image(s.image, self.resolution), s.caption
            except Exception as e:
                self._mark_bad(i, f"{s.image}: {e}")
        raise StepdistillError("no readable image in the dataset")


BUILTIN_TINY_DIGITS = "builtin:tiny-digits"


def _image_folder(directory: str, caption_column: str) -> list[Sample]:
    if directory == BUILTIN_TINY_DIGITS:  # the embedded world's data, read directly (same as export-data writes)
        from .toy.export import digit_samples

        return [Sample(text, image) for image, text, _ in digit_samples()]
    root = Path(directory)
    meta = root / "metadata.jsonl"
    if not root.is_dir():
        raise StepdistillError(f"--train_data_dir {directory}: no such directory")
    if not meta.is_file():
        raise StepdistillError(f"--train_data_dir {directory}: no metadata.jsonl (one JSON line per image with "
                               f"file_name and {caption_column}; `stepdistill toy export-data` writes one)")
    samples = []
    for n, line in enumerate(meta.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if caption_column not in row:
            raise StepdistillError(f"{meta}:{n}: no {caption_column!r} field (columns: {sorted(row)}); set "
                                   "--caption_column")
        if "file_name" not in row:
            raise StepdistillError(f"{meta}:{n}: no 'file_name' field")
        samples.append(Sample(str(row[caption_column]), str(root / row["file_name"])))
    if not samples:
        raise StepdistillError(f"{meta} lists no images")
    return samples


def _hf_dataset(name: str, image_column: str, caption_column: str) -> list[Sample]:
    try:
        import datasets
    except ImportError as e:
        raise StepdistillError("--dataset_name needs the `datasets` package: pip install datasets") from e
    ds = datasets.load_from_disk(name) if Path(name).is_dir() else datasets.load_dataset(name, split="train")
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"]
    for column in (image_column, caption_column):
        if column not in ds.column_names:
            raise StepdistillError(f"--dataset_name {name}: no column {column!r} (columns: {ds.column_names}); set "
                                   "--image_column / --caption_column")
    return [Sample(str(row[caption_column]), row[image_column]) for row in ds]


def _webdataset(pattern: str, caption_column: str) -> list[Sample]:
    try:
        import webdataset as wds
    except ImportError as e:
        raise StepdistillError("--train_shards needs the `webdataset` package: pip install webdataset") from e
    samples = []
    for row in wds.WebDataset(pattern, shardshuffle=False):
        image = next((row[k] for k in ("jpg", "jpeg", "png", "webp") if k in row), None)
        caption = row.get("txt", row.get(caption_column))
        if image is None or caption is None:
            continue
        samples.append(Sample(caption.decode() if isinstance(caption, bytes) else str(caption), bytes(image)))
    if not samples:
        raise StepdistillError(f"--train_shards {pattern}: no (image, txt) samples found")
    return samples


def data_source(config, need_images: bool) -> tuple[str, str]:
    """The one data source of a run, (option, value), checked without reading it: called by the preflight, so a
    missing or doubled source is an error before any weights load."""
    sources = {k: getattr(config, k) for k in ("train_data_dir", "dataset_name", "train_shards", "prompts_file")
               if getattr(config, k, None)}
    image_sources = {k: v for k, v in sources.items() if k != "prompts_file"}
    if need_images and not image_sources:
        raise StepdistillError("this method trains on images: pass --train_data_dir, --dataset_name or "
                               "--train_shards")
    if len(image_sources) > 1:
        raise StepdistillError(f"pass one image source, not {', '.join('--' + k for k in image_sources)}")
    if not sources:
        raise StepdistillError("pass --prompts_file (one prompt per line) or an image source (--train_data_dir, "
                               "--dataset_name or --train_shards)")
    kind, value = next(iter(image_sources.items())) if image_sources else ("prompts_file", sources["prompts_file"])
    if kind == "train_data_dir" and value != BUILTIN_TINY_DIGITS and not Path(value).is_dir():
        raise StepdistillError(f"--train_data_dir {value}: no such directory")
    if kind == "prompts_file" and not Path(value).is_file():
        raise StepdistillError(f"--prompts_file {value}: no such file")
    if kind == "train_shards":
        _check_local_shards(value)
    return kind, str(value)


def _check_local_shards(pattern: str) -> None:
    """Local shards a --train_shards pattern names must exist (URLs and pipe: sources are the loader's to open)."""
    if "://" in pattern or pattern.startswith("pipe:"):
        return
    try:
        from braceexpand import braceexpand  # webdataset's own pattern expansion
    except ImportError:
        return  # webdataset is missing: building the dataset says so
    shards = list(braceexpand(pattern))
    missing = [s for s in shards if not Path(s).is_file()]
    if missing:
        raise StepdistillError(f"--train_shards {pattern}: {len(missing)} of {len(shards)} shards do not exist "
                               f"(first: {missing[0]}); check the path and the {{000..099}} range")


def build_dataset(config, resolution: int, need_images: bool, keep=None) -> ImageCaptionDataset:
    """The dataset named by the config (exactly one source), validated before any training work. ``keep``
    (caption → bool) selects a part of it (an MSD student's prompts), before --max_train_samples applies."""
    kind, value = data_source(config, need_images)
    if kind == "train_data_dir":
        samples = _image_folder(value, config.caption_column)
    elif kind == "dataset_name":
        samples = _hf_dataset(value, config.image_column, config.caption_column)
    elif kind == "train_shards":
        samples = _webdataset(value, config.caption_column)
    else:
        samples = [Sample(p) for p in read_prompts(value)]
    if keep is not None:
        samples = [s for s in samples if keep(s.caption)]
        if not samples:
            raise StepdistillError("no sample of the data belongs to this part of the partition")
    if config.max_train_samples:
        samples = samples[: config.max_train_samples]
    dataset = ImageCaptionDataset(samples, resolution, config.max_bad_images)
    if dataset.has_images:
        dataset.check_images()
    return dataset


class BatchServer:
    """Serves the local slice of the global batch of an iteration, without replacement within an epoch.

    The order is a permutation seeded by (seed, epoch): it depends on nothing but the iteration, so resuming needs
    no data-loader state.
    """

    def __init__(self, dataset: ImageCaptionDataset, local_batch: int, rank: int, world_size: int, seed: int,
                 latents: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.dataset, self.local_batch, self.rank, self.world_size, self.seed = (
            dataset, local_batch, rank, world_size, seed)
        self.latents = latents  # cached (mean, std) of the VAE posterior, one row per sample
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms = {epoch: torch.randperm(len(self.dataset), generator=g)}
        return self._perms[epoch]

    def indices(self, iteration: int) -> list[int]:
        n, global_batch = len(self.dataset), self.local_batch * self.world_size
        out = []
        for j in range(self.rank * self.local_batch, (self.rank + 1) * self.local_batch):
            flat = iteration * global_batch + j
            out.append(int(self._perm(flat // n)[flat % n]))
        return out

    def batch(self, iteration: int) -> dict[str, Any]:
        idx = self.indices(iteration)
        out: dict[str, Any] = {"index": torch.tensor(idx)}
        if self.latents is not None:
            mean, std = self.latents
            out["latent_mean"], out["latent_std"] = mean[idx], std[idx]
            out["prompts"] = [self.dataset.samples[i].caption for i in idx]
            return out
        items = [self.dataset.get(i) for i in idx]
        out["prompts"] = [c for _, c in items]
        if items[0][0] is not None:
            out["pixel_values"] = torch.stack([im for im, _ in items])
        return out
