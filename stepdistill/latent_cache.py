"""--cache_latents: every image VAE-encoded once (posterior mean and std), before training.

Small sets stay in memory (as always). A set whose latents exceed ``--latent_cache_max_bytes``, and every streamed
set, is written by the main process to safetensors files (``--latent_cache_dir``, default
``OUTPUT_DIR/latent_cache``): into ``latent_cache.partial/`` first, renamed when complete, so an interrupted write
is never reused; a complete cache of the same data, resolution and model is reused by later runs. Batches then read
their rows memory-mapped (``safe_open`` + ``get_slice``), in the order the in-memory cache would serve them: the
same numbers. A streamed set is read once in its listed shard order; its cached rows (and their captions) are then
served like a map-style set, with (seed, epoch) permutations, so resumed and N-process runs draw what one
uninterrupted run draws.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import shutil
from pathlib import Path
from typing import Callable, Iterator

import torch

from .data import ImageCaptionDataset, Sample, _as_is, _Loading
from .errors import StepdistillError

logger = logging.getLogger(__name__)
CHUNK = 64  # images per VAE call
ROWS_PER_FILE = 1024
INDEX = "index.json"


class InMemoryLatents:
    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        self.mean, self.std = mean, std

    def rows(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean[idx], self.std[idx]


class DiskLatents:
    """A complete cache folder, its rows read memory-mapped."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        self.directory = Path(directory)
        self.index = json.loads((self.directory / INDEX).read_text())
        self.files = [safe_open(str(self.directory / f), framework="pt") for f in self.index["files"]]
        # the encoder's memory layout (a VAE may return channels-last latents): kept, so that the numbers downstream
        # are those of the in-memory cache
        self.memory_format = torch.channels_last if self.index.get("channels_last") else torch.contiguous_format

    def __len__(self) -> int:
        return self.index["rows"]

    def captions(self) -> list[str]:
        return json.loads((self.directory / "captions.json").read_text())

    def rows(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        out = {"mean": [], "std": []}
        for i in idx:
            f, r = self.files[i // ROWS_PER_FILE], i % ROWS_PER_FILE
            for name in out:
                out[name].append(f.get_slice(name)[r:r + 1])
        return tuple(torch.cat(out[k]).contiguous(memory_format=self.memory_format) for k in ("mean", "std"))


def _fingerprint(config, dataset) -> str:
    """What the cached latents depend on: the data (source, columns, selection, captions), resolution and model."""
    keys = ("train_data_dir", "dataset_name", "train_shards", "streaming", "image_column", "caption_column",
            "max_train_samples", "resolution", "pretrained_model_name_or_path", "revision", "variant",
            "pretrained_vae_model_name_or_path", "mixed_precision")
    what = {k: str(getattr(config, k, None)) for k in keys}
    if not dataset.streamed:
        what["captions"] = hashlib.sha256("\n".join(dataset.captions).encode()).hexdigest()
        what["rows"] = len(dataset)
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def _map_chunks(dataset: ImageCaptionDataset, workers: int) -> Iterator[tuple[list[str], torch.Tensor]]:
    """(captions, images) of rows 0..n-1 in chunks of CHUNK, decoded by a DataLoader."""
    from torch.utils.data import DataLoader

    n = len(dataset)
    chunks = [list(range(s, min(n, s + CHUNK))) for s in range(0, n, CHUNK)]
    loader = DataLoader(_Loading(dataset), batch_size=None, sampler=chunks, num_workers=workers, collate_fn=_as_is,
                        generator=torch.Generator().manual_seed(0))
    for batch in loader:
        if "error" in batch:
            raise StepdistillError(batch["error"])
        yield batch["prompts"], batch["pixel_values"]


def _stream_chunks(stream) -> Iterator[tuple[list[str], torch.Tensor]]:
    """(captions, images) of a stream in its listed shard order (bad images skipped), in chunks of CHUNK."""
    items = stream.listed_images()
    while chunk := list(itertools.islice(items, CHUNK)):
        yield [c for c, _ in chunk], torch.stack([im for _, im in chunk])


def _write(directory: Path, fingerprint: str, chunks, encode: Callable, first=None) -> None:
    """Encode every chunk (``first``: the first chunk's latents, already encoded) into ``directory``, ROWS_PER_FILE
    rows a file, atomically: into a .partial folder renamed when complete."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    tmp = directory.with_name(directory.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    captions, files, pending, rows = [], [], [], 0

    def flush():
        name = f"latents-{len(files):05d}.safetensors"
        save_file({"mean": torch.cat([m for m, _ in pending]).contiguous(),
                   "std": torch.cat([s for _, s in pending]).contiguous()},
                  str(tmp / name))
        files.append(name)
        pending.clear()

    channels_last = None
    for chunk_captions, images in tqdm(chunks, desc=f"caching latents in {directory}", unit="chunk"):
        mean, std = encode(images) if first is None else first
        first = None
        if channels_last is None:
            channels_last = mean.dim() == 4 and not mean.is_contiguous() and mean.is_contiguous(
                memory_format=torch.channels_last)
        captions += chunk_captions
        pending.append((mean, std))
        rows += len(mean)
        if len(pending) * CHUNK == ROWS_PER_FILE:  # every chunk but the last holds CHUNK rows
            flush()
    if pending:
        flush()
    (tmp / "captions.json").write_text(json.dumps(captions))
    (tmp / INDEX).write_text(json.dumps({"fingerprint": fingerprint, "rows": rows, "files": files,
                                          "channels_last": bool(channels_last)}))
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)


def cache_latents(config, dataset, encode: Callable, main: bool = True, barrier: Callable | None = None):
    """(dataset, latents) to serve: the latents of every sample of ``dataset``, in memory or on disk. A streamed
    ``dataset`` comes back as the map-style set of its cached rows' captions."""
    workers = config.dataloader_num_workers
    if not dataset.streamed:
        chunks = _map_chunks(dataset, workers)
        captions, images = next(chunks)
        first = encode(images)
        row_bytes = sum(t[0].numel() * t.element_size() for t in first)
        if row_bytes * len(dataset) <= config.latent_cache_max_bytes:
            from tqdm.auto import tqdm

            means, stds = [first[0]], [first[1]]
            for _, images in tqdm(chunks, desc="caching latents", total=-(-len(dataset) // CHUNK) - 1,
                                  disable=not main):
                mean, std = encode(images)
                means.append(mean)
                stds.append(std)
            return dataset, InMemoryLatents(torch.cat(means), torch.cat(stds))
        logger.info("latents of %d samples (%.1f GB) exceed --latent_cache_max_bytes: caching them on disk",
                    len(dataset), row_bytes * len(dataset) / 1e9)
        all_chunks = itertools.chain([(captions, images)], chunks)
    else:
        first, all_chunks = None, _stream_chunks(dataset)
    directory = Path(config.latent_cache_dir or Path(config.output_dir) / "latent_cache")
    fingerprint = _fingerprint(config, dataset)
    index = directory / INDEX
    if main:
        if index.is_file() and json.loads(index.read_text()).get("fingerprint") == fingerprint:
            logger.info("reusing the latent cache %s", directory)
        else:
            _write(directory, fingerprint, all_chunks, encode, first)
    if barrier is not None:
        barrier()
    latents = DiskLatents(directory)
    if dataset.streamed:
        captions = latents.captions()
        dataset = ImageCaptionDataset([Sample(c) for c in captions], dataset.resolution, dataset.max_bad, captions)
    return dataset, latents
