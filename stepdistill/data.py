"""Training data: image folders with ``metadata.jsonl``, Hugging Face datasets, WebDataset shards, or a prompt
file; checked before training, optionally VAE-encoded once, and served batch by batch.

Two kinds of source. *Map-style* (a folder, ``builtin:tiny-digits``, a prompt file, a Hugging Face dataset kept as
Arrow and decoded row by row): the batches follow a permutation seeded by (seed, epoch), so distributed and resumed
runs see exactly the samples an uninterrupted run sees; a torch DataLoader (``--dataloader_num_workers``) decodes
them ahead of training. *Streamed* (``--train_shards``, ``--dataset_name ... --streaming``): ``stepdistill.stream``,
never held in memory."""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

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

    if isinstance(source, dict):  # an undecoded datasets.Image value
        source = source.get("bytes") or source["path"]
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


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@dataclass
class Sample:
    caption: str
    image: Any = None  # a path, bytes or PIL image; None for prompt-only data


class SkipsBadImages:
    """Unreadable images are skipped with a warning naming them; more than ``max_bad`` is an error."""

    max_bad: int
    bad: set

    def _mark_bad(self, item, why: str) -> None:
        self.bad.add(item)
        logger.warning("skipping unreadable image %s", why)
        if len(self.bad) > self.max_bad:
            raise StepdistillError(f"more than {self.max_bad} unreadable images (last: {why}); fix the data or "
                                   "raise --max_bad_images")


class ImageCaptionDataset(SkipsBadImages):
    """Map-style samples: a list of ``Sample``s, or the rows of an Arrow-backed Hugging Face dataset decoded one at
    a time (``HFRows``). ``captions`` holds every caption (no image is read for them)."""

    streamed = False

    def __init__(self, samples: Sequence[Sample], resolution: int, max_bad: int = 10,
                 captions: list[str] | None = None):
        self.samples, self.resolution, self.max_bad = samples, resolution, max_bad
        self.captions = captions if captions is not None else [s.caption for s in samples]
        self.bad: set[int] = set()
        self.source = ""  # the option that named the data, e.g. "--train_data_dir DIR", for error messages
        self.has_images = getattr(samples, "has_images", None) or bool(samples) and samples[0].image is not None

    def __len__(self) -> int:
        return len(self.samples)

    def validation_captions(self, n: int = 8) -> list[str]:
        return list(dict.fromkeys(self.captions))[:n]

    def all_captions(self) -> list[str]:
        return self.captions

    def check_images(self) -> None:
        """Open every image header once, before training: a broken file is found now, not at step 40k."""
        from PIL import Image

        if not isinstance(self.samples, list):
            return  # rows of a dataset: decoded (and checked) when served
        files = [(i, s.image) for i, s in enumerate(self.samples) if isinstance(s.image, (str, Path))]
        broken = []
        for i, image in files:
            try:
                with Image.open(image) as img:
                    img.verify()
            except Exception as e:  # PIL raises many types for broken files
                broken.append((i, f"{image}: {_first_line(e)}"))
        # the run is refused before anything is logged (one line), or the few broken files are skipped with a warning
        source = self.source or "the training data"
        if broken and len(broken) == len(self.samples):
            raise StepdistillError(f"{source}: none of its {len(broken)} images can be read (first: {broken[0][1]}); "
                                   "fix or replace the image files")
        if len(broken) > self.max_bad:
            raise StepdistillError(f"{source}: {len(broken)} of {len(self.samples)} images cannot be read, more than "
                                   f"--max_bad_images {self.max_bad} (first: {broken[0][1]}); fix or remove them, or "
                                   "raise --max_bad_images")
        for i, why in broken:
            self._mark_bad(i, why)

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
                self._mark_bad(i, f"{s.image if isinstance(s.image, (str, Path)) else f'sample {i}'}: {e}")
        raise StepdistillError("no readable image in the dataset")

    def load_batch(self, idx: list[int]) -> dict[str, Any]:
        """The batch of these indices, as the trainer receives it."""
        out: dict[str, Any] = {"index": torch.tensor(idx)}
        items = [self.get(i) for i in idx]
        out["prompts"] = [c for _, c in items]
        if items[0][0] is not None:
            out["pixel_values"] = torch.stack([im for im, _ in items])
        return out


class HFRows(Sequence):
    """The rows of an Arrow-backed ``datasets.Dataset`` as ``Sample``s, each read and decoded when indexed (the
    Arrow files stay memory-mapped; nothing is decoded up front)."""

    has_images = True

    def __init__(self, ds, image_column: str, caption_column: str):
        self.ds, self.image_column, self.caption_column = ds, image_column, caption_column

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> Sample:
        row = self.ds[int(i)]
        return Sample(str(row[self.caption_column]), row[self.image_column])

    def captions(self) -> list[str]:
        return [str(c) for c in self.ds[self.caption_column]]

    def select(self, indices: list[int]) -> "HFRows":
        return HFRows(self.ds.select(indices), self.image_column, self.caption_column)


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


def _hf_dataset(name: str, image_column: str, caption_column: str) -> HFRows:
    """A Hugging Face dataset kept as Arrow (memory-mapped), its rows decoded one by one when served."""
    ds = _hf_check_columns(_hf_load(name), name, image_column, caption_column)
    return HFRows(ds, image_column, caption_column)


def _hf_load(name: str, streaming: bool = False):
    try:
        import datasets
    except ImportError as e:
        raise StepdistillError("--dataset_name needs the `datasets` package: pip install datasets") from e
    saved = any((Path(name) / f).is_file() for f in ("state.json", "dataset_dict.json"))  # save_to_disk's
    ds = datasets.load_from_disk(name) if saved else datasets.load_dataset(name, split="train", streaming=streaming)
    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        ds = ds["train"]
    if streaming and isinstance(ds, datasets.Dataset):  # a save_to_disk folder, streamed from its Arrow files
        ds = ds.to_iterable_dataset(num_shards=max(1, min(len(ds), 64)))
    return ds


def _hf_check_columns(ds, name: str, image_column: str, caption_column: str):
    columns = ds.column_names
    if columns is None:  # a streamed set that does not declare its features: its first row tells
        columns = list(next(iter(ds), {}).keys())
    for column in (image_column, caption_column):
        if column not in columns:
            raise StepdistillError(f"--dataset_name {name}: no column {column!r} (columns: {columns}); set "
                                   "--image_column / --caption_column")
    return ds


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
    if getattr(config, "streaming", False) and kind != "dataset_name":
        raise StepdistillError("--streaming streams a --dataset_name (--train_shards always stream); drop it")
    if getattr(config, "dataloader_num_workers", 0) < 0:
        raise StepdistillError(f"--dataloader_num_workers {config.dataloader_num_workers}: must be >= 0")
    if getattr(config, "shuffle_buffer", 1) < 1:
        raise StepdistillError(f"--shuffle_buffer {config.shuffle_buffer}: must be at least 1")
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


def build_dataset(config, resolution: int, need_images: bool, keep=None):
    """The dataset named by the config (exactly one source), validated before any training work: an
    ``ImageCaptionDataset`` (map-style) or, for --train_shards and --dataset_name --streaming, a
    ``stream.Stream``. ``keep`` (caption → bool) selects a part of it (an MSD student's prompts), before
    --max_train_samples applies."""
    kind, value = data_source(config, need_images)
    max_bad = config.max_bad_images
    if kind == "train_shards" or kind == "dataset_name" and getattr(config, "streaming", False):
        from .stream import open_stream

        stream = open_stream(config, kind, value, resolution, keep)
        if not config.max_train_samples:
            return stream
        samples, keep = stream.head(config.max_train_samples), None  # a small subset: read it, map-style
    elif kind == "train_data_dir":
        samples = _image_folder(value, config.caption_column)
    elif kind == "dataset_name":
        samples = _hf_dataset(value, config.image_column, config.caption_column)
    else:
        samples = [Sample(p) for p in read_prompts(value)]
    captions = samples.captions() if isinstance(samples, HFRows) else [s.caption for s in samples]
    chosen = [i for i, c in enumerate(captions) if keep is None or keep(c)]
    if not chosen:
        raise StepdistillError(f"--{kind} {value}: no samples" if keep is None else
                               "no sample of the data belongs to this part of the partition")
    if config.max_train_samples:
        chosen = chosen[: config.max_train_samples]
    if len(chosen) < len(captions):
        samples = samples.select(chosen) if isinstance(samples, HFRows) else [samples[i] for i in chosen]
        captions = [captions[i] for i in chosen]
    dataset = ImageCaptionDataset(samples, resolution, max_bad, captions)
    dataset.source = f"--{kind} {value}"
    if dataset.has_images:
        dataset.check_images()
    return dataset


def _as_is(batch):
    return batch


class _Loading(torch.utils.data.Dataset):
    """A map-style dataset seen by a DataLoader whose every index is a whole batch's index list. Bad input in a
    worker comes back as ``{"error": message}`` (the server raises it as one line)."""

    def __init__(self, dataset: ImageCaptionDataset):
        self.dataset = dataset

    def __getitem__(self, idx: list[int]) -> dict[str, Any]:
        try:
            return self.dataset.load_batch(idx)
        except StepdistillError as e:
            return {"error": str(e)}


class Prefetched:
    """Batches of consecutive iterations from a torch DataLoader (``workers`` processes decode ahead of training).
    The batches of the last ``window`` iterations are kept, so the phases and micro-batches of a step that ask
    for the same iteration get the same batch without loading it again; a request that is neither kept nor the
    next one (a resumed run, a jump) restarts the loader at that iteration."""

    def __init__(self, seed: int, workers: int = 0, window: int = 1):
        self.seed, self.workers, self.window = seed, workers, max(1, window)
        self._kept: dict[int, dict[str, Any]] = {}
        self._it, self._next = None, None

    def _loader(self, start: int):
        raise NotImplementedError

    def _dataloader(self, dataset, sampler=None):
        from torch.utils.data import DataLoader

        # its own generator: starting a DataLoader draws worker seeds, which must not move the global RNG
        return DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=self.workers, collate_fn=_as_is,
                          prefetch_factor=2 if self.workers else None, pin_memory=torch.cuda.is_available(),
                          generator=torch.Generator().manual_seed(self.seed))

    def batch(self, iteration: int) -> dict[str, Any]:
        if iteration in self._kept:
            return self._kept[iteration]
        if self._it is None or iteration != self._next:
            self._it = None  # shuts the old workers down
            self._it, self._next = iter(self._loader(iteration)), iteration
        out = next(self._it)
        if "error" in out:
            raise StepdistillError(out["error"])
        self._next += 1
        self._kept[iteration] = out
        while len(self._kept) > self.window:
            del self._kept[min(self._kept)]
        return out


class EpochOrder:
    """The samples of each iteration: the local slice of the global batch, without replacement within an epoch,
    from a permutation seeded by (seed, epoch). It depends on nothing but the iteration."""

    def __init__(self, n: int, local_batch: int, rank: int, world_size: int, seed: int):
        self.n, self.local_batch, self.rank, self.world_size, self.seed = n, local_batch, rank, world_size, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g)}
        return self._perms[epoch]

    def indices(self, iteration: int) -> list[int]:
        global_batch = self.local_batch * self.world_size
        out = []
        for j in range(self.rank * self.local_batch, (self.rank + 1) * self.local_batch):
            flat = iteration * global_batch + j
            out.append(int(self._perm(flat // self.n)[flat % self.n]))
        return out


class BatchServer(Prefetched):
    """Serves the local slice of the global batch of an iteration in ``EpochOrder``, so resuming needs no
    data-loader state; the images are loaded by a DataLoader in that order. ``latents`` (cached VAE posteriors,
    ``latent_cache``): served from them instead of the images.
    """

    def __init__(self, dataset: ImageCaptionDataset, local_batch: int, rank: int, world_size: int, seed: int,
                 latents=None, workers: int = 0, window: int = 1):
        super().__init__(seed, workers, window)
        self.dataset, self.latents = dataset, latents
        self.order = EpochOrder(len(dataset), local_batch, rank, world_size, seed)
        self.indices = self.order.indices

    def _loader(self, start: int):
        order = self.order  # (not self: the loader must not hold the server)
        return self._dataloader(_Loading(self.dataset), sampler=(order.indices(i) for i in itertools.count(start)))

    def batch(self, iteration: int) -> dict[str, Any]:
        if self.latents is None:
            return super().batch(iteration)
        idx = self.indices(iteration)
        out: dict[str, Any] = {"index": torch.tensor(idx)}
        out["latent_mean"], out["latent_std"] = self.latents.rows(idx)
        out["prompts"] = [self.dataset.captions[i] for i in idx]
        return out


def serve(config, dataset, rank: int, world_size: int, encode=None, main: bool = True, barrier=None):
    """The data object of a run, which the trainer asks for the batch of each iteration (``.batch(iteration)``).
    ``encode`` (images → VAE posterior mean, std on the CPU), given with --cache_latents: the latents are cached
    once (in memory, or on disk: ``latent_cache``; ``main`` writes, ``barrier()`` waits for it) and served
    instead of the images."""
    seed, local_batch = config.seed, config.train_batch_size
    workers, window = config.dataloader_num_workers, config.gradient_accumulation_steps
    if encode is not None and dataset.has_images:
        from .latent_cache import cache_latents

        dataset, latents = cache_latents(config, dataset, encode, main, barrier)
        return BatchServer(dataset, local_batch, rank, world_size, seed, latents)
    if dataset.streamed:
        from .stream import StreamServer

        return StreamServer(dataset, local_batch, rank, world_size, seed, workers, window)
    return BatchServer(dataset, local_batch, rank, world_size, seed, workers=workers, window=window)
