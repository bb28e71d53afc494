"""Streamed training data: WebDataset shards (``--train_shards``) and Hugging Face datasets read with
``streaming=True`` (``--dataset_name ... --streaming``), never held in memory.

Epoch-based and infinite. The *readers* are the processes × DataLoader workers (``--dataloader_num_workers``; a
process without workers is one reader). In epoch e every reader takes the shards in an order seeded by (seed, e):
reader k of R gets shards k, k + R, ... of it; with fewer shards than readers, every reader reads all shards and
keeps samples k, k + R, .... Each reader shuffles its samples through a buffer of ``--shuffle_buffer`` undecoded
samples seeded by (seed, e, k), decodes them a batch at a time, and goes on to its next epoch when its shards end.

Resume: the batch of iteration i comes from worker i mod W of each process, so a run restarted at iteration k
skips, in each reader, the samples of its batches before k (read, not decoded): with the same number of processes
and workers a resumed run draws exactly what the uninterrupted run draws. Another number of processes or workers
draws a different, equally valid order.

Bad data: an image that does not decode is replaced by another image of its batch, a tar member or shard that
cannot be read is skipped (webdataset's handler); both are logged by name and counted per reader, and more than
``--max_bad_images`` is an error.
"""

from __future__ import annotations

import collections
import itertools
import random
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .data import Prefetched, Sample, SkipsBadImages, load_image
from .errors import StepdistillError

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
Raw = tuple[str, str, Any]  # (key naming the sample, caption, undecoded image)


class TarShards:
    """WebDataset shards read by webdataset itself (tar parsing, grouping members into samples, URLs and pipe:
    sources, the error handler). A sample is its image member (jpg, jpeg, png or webp) and its ``txt`` (else
    ``--caption_column``) member."""

    def __init__(self, pattern: str, caption_column: str):
        from braceexpand import braceexpand  # webdataset's own pattern expansion

        self.pattern, self.caption_column = pattern, caption_column
        self.shards = list(braceexpand(pattern))
        self.decode = None  # load_image reads the image bytes

    def rows(self, shard: str, on_error: Callable[[Any, str], None]) -> Iterator[dict]:
        from webdataset.tariterators import tarfile_samples

        def handler(exn: Exception) -> bool:
            why = str(exn.args[0]) if exn.args else repr(exn)  # webdataset appends the stream and url to args
            on_error((shard, why), f"{shard}: {why}")
            return True  # skip it and go on

        return tarfile_samples([{"url": shard}], handler=handler)

    def sample(self, row: dict) -> Raw | None:
        image = next((row[k] for k in IMAGE_KEYS if k in row), None)
        caption = row.get("txt", row.get(self.caption_column))
        if image is None or caption is None:
            return None
        caption = caption.decode() if isinstance(caption, (bytes, bytearray)) else str(caption)
        return f"{row['__url__']}:{row['__key__']}", caption, bytes(image)

    def __call__(self, shard: str, on_error) -> Iterator[Raw]:
        for row in self.rows(shard, on_error):
            raw = self.sample(row)
            if raw is not None:
                yield raw

    def check(self) -> None:
        """The first sample has an image and a caption: the wrong --caption_column is one line, before weights."""
        row = next(iter(self.rows(self.shards[0], lambda *_: None)), None)
        if row is None:
            raise StepdistillError(f"--train_shards {self.pattern}: no sample in {self.shards[0]}")
        members = sorted(k for k in row if not k.startswith("__"))
        if not any(k in row for k in IMAGE_KEYS):
            raise StepdistillError(f"--train_shards {self.pattern}: sample {row['__key__']} of {self.shards[0]} has "
                                   f"no image member ({', '.join(IMAGE_KEYS)}; it has {members})")
        if "txt" not in row and self.caption_column not in row:
            raise StepdistillError(f"--train_shards {self.pattern}: sample {row['__key__']} of {self.shards[0]} has "
                                   f"no 'txt' or {self.caption_column!r} member (it has {members}); set "
                                   "--caption_column")


class HFShards:
    """A Hugging Face ``IterableDataset`` (``streaming=True``) read shard by shard (``ds.shard``), its images left
    undecoded until served and then decoded by ``datasets.Image`` itself."""

    def __init__(self, ds, name: str, image_column: str, caption_column: str):
        import datasets

        ds = ds.select_columns([image_column, caption_column])
        self.decode = None
        if isinstance((ds.features or {}).get(image_column), datasets.Image):
            ds = ds.cast_column(image_column, datasets.Image(decode=False))
            self.decode = datasets.Image().decode_example
        self.ds, self.name, self.image_column, self.caption_column = ds, name, image_column, caption_column
        self.shards = list(range(ds.num_shards))

    def __call__(self, shard: int, on_error) -> Iterator[Raw]:
        part = self.ds.shard(num_shards=len(self.shards), index=shard, contiguous=True)
        # .iter, not iter(): inside a DataLoader worker iter() would split the shard among the workers again
        rows = (row for batch in part.iter(batch_size=64)
                for row in zip(batch[self.caption_column], batch[self.image_column]))
        for j, (caption, image) in enumerate(rows):
            yield f"{self.name}[shard {shard}]:{j}", str(caption), image

    def check(self) -> None:
        pass  # the columns were checked when the dataset was opened


def open_stream(config, kind: str, value: str, resolution: int, keep=None) -> "Stream":
    """The stream of --train_shards or --dataset_name --streaming, checked (its first sample, its columns)."""
    if kind == "train_shards":
        try:
            import webdataset  # noqa: F401
        except ImportError as e:
            raise StepdistillError("--train_shards needs the `webdataset` package: pip install webdataset") from e
        source = TarShards(value, config.caption_column)
    else:
        from .data import _hf_check_columns, _hf_load

        ds = _hf_check_columns(_hf_load(value, streaming=True), value, config.image_column, config.caption_column)
        source = HFShards(ds, value, config.image_column, config.caption_column)
    source.check()
    return Stream(f"--{kind} {value}", source, resolution, config.seed, keep, config.max_bad_images,
                  getattr(config, "shuffle_buffer", 1000))


def _shuffled(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """A shuffle buffer of ``size`` items: each arriving item takes the place of one drawn at random."""
    buffer = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = rng.randrange(size)
        yield buffer[j]
        buffer[j] = item
    rng.shuffle(buffer)
    yield from buffer


class Stream(SkipsBadImages):
    """Streamed samples (see the module docstring). ``source(shard, on_error)`` yields the raw samples of one
    shard; ``source.shards`` lists them; ``source.decode`` (or None) turns a raw image into what ``load_image``
    reads."""

    streamed = True
    has_images = True

    def __init__(self, name: str, source, resolution: int, seed: int, keep=None, max_bad: int = 10,
                 shuffle_buffer: int = 1000):
        self.name, self.source, self.resolution, self.seed, self.keep = name, source, resolution, seed, keep
        self.max_bad, self.shuffle_buffer = max_bad, shuffle_buffer
        self.bad: set = set()

    # ---------------------------------------------------------------- reading
    def _raw(self, shards) -> Iterator[Raw]:
        for shard in shards:
            for raw in self.source(shard, self._mark_bad):
                if self.keep is None or self.keep(raw[1]):
                    yield raw

    def head(self, n: int) -> list[Sample]:
        """The first ``n`` samples in the listed shard order (--max_train_samples): a tar's image bytes, a
        dataset's image as datasets decodes it."""
        return [Sample(c, self.source.decode(im) if self.source.decode else im)
                for _, c, im in itertools.islice(self._raw(self.source.shards), n)]

    def listed_images(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(caption, image) of every sample in the listed shard order, bad images skipped (--cache_latents)."""
        for key, caption, image in self._raw(self.source.shards):
            try:
                yield caption, self.decode_image(image)
            except Exception as e:  # PIL raises many types for broken files
                self._mark_bad(key, f"{key}: {e}")

    def all_captions(self) -> list[str]:
        """Every caption, in the listed order: one pass over the data that decodes no image (MSD's router)."""
        return [c for _, c, _ in self._raw(self.source.shards)]

    def validation_captions(self, n: int = 8) -> list[str]:
        """The first ``n`` distinct captions in the listed order (the same for every run and resume)."""
        seen: dict[str, None] = {}
        for _, caption, _ in self._raw(self.source.shards):
            seen.setdefault(caption)
            if len(seen) == n:
                break
        return list(seen)

    def shard_order(self, epoch: int) -> list:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)  # as BatchServer's epochs
        return [self.source.shards[i] for i in torch.randperm(len(self.source.shards), generator=g).tolist()]

    def reader_epoch(self, epoch: int, reader: int, readers: int) -> Iterator[Raw]:
        """What reader ``reader`` of ``readers`` reads in ``epoch``, shuffled, undecoded."""
        shards = self.shard_order(epoch)
        if len(shards) >= readers:
            raw = self._raw(shards[reader::readers])
        else:  # fewer shards than readers: every reader reads them all and keeps its share of the samples
            raw = itertools.islice(self._raw(shards), reader, None, readers)
        return _shuffled(raw, self.shuffle_buffer, random.Random(f"{self.seed}/{epoch}/{reader}"))

    def reader_stream(self, reader: int, readers: int) -> Iterator[Raw]:
        for epoch in itertools.count():
            n = 0
            for raw in self.reader_epoch(epoch, reader, readers):
                n += 1
                yield raw
            if n == 0:
                raise StepdistillError(f"{self.name}: reader {reader} of {readers} (processes x "
                                       f"--dataloader_num_workers) got no sample in epoch {epoch}; use fewer "
                                       "workers or more data")

    # ---------------------------------------------------------------- batches
    def batches(self, start: int, local_batch: int, rank: int, world_size: int, worker: int = 0,
                workers: int = 1) -> Iterator[dict[str, Any]]:
        """The batches of this process's iterations start, start + 1, ... that DataLoader worker ``worker`` of
        ``workers`` serves (the DataLoader takes its workers' batches in turn, from worker 0)."""
        logical = (worker + start) % workers  # this worker serves iterations i with i % workers == logical
        done = max(0, -(-(start - logical) // workers))  # its batches before ``start``
        samples = self.reader_stream(rank * workers + logical, world_size * workers)
        collections.deque(itertools.islice(samples, done * local_batch), maxlen=0)  # skipped, not decoded
        while True:
            batch = None
            while batch is None:
                batch = self._decode(list(itertools.islice(samples, local_batch)))
            yield batch

    def decode_image(self, image) -> torch.Tensor:
        return load_image(self.source.decode(image) if self.source.decode else image, self.resolution)

    def _decode(self, raw: list[Raw]) -> dict[str, Any] | None:
        """The batch of these samples; an image that does not decode is replaced by the next good one of the
        batch (None: no good one)."""
        images = []
        for key, _, image in raw:
            try:
                images.append(self.decode_image(image))
            except Exception as e:  # PIL raises many types for broken files
                self._mark_bad(key, f"{key}: {e}")
                images.append(None)
        good = [i for i, im in enumerate(images) if im is not None]
        if not good:
            return None
        pick = [i if images[i] is not None else next((j for j in good if j > i), good[0]) for i in range(len(raw))]
        return {"prompts": [raw[i][1] for i in pick], "keys": [raw[i][0] for i in pick],
                "pixel_values": torch.stack([images[i] for i in pick])}


class _StreamFrom(torch.utils.data.IterableDataset):
    """The stream's batches from iteration ``start`` on, as a DataLoader's IterableDataset (one per worker)."""

    def __init__(self, stream: Stream, start: int, local_batch: int, rank: int, world_size: int):
        self.stream, self.start, self.local_batch, self.rank, self.world_size = (
            stream, start, local_batch, rank, world_size)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        try:
            yield from self.stream.batches(self.start, self.local_batch, self.rank, self.world_size, worker, workers)
        except StepdistillError as e:  # comes back to the training process as one line
            yield {"error": str(e)}


class StreamServer(Prefetched):
    """Serves this process's batch of an iteration from a stream (the trainer's ``data.batch(iteration)``)."""

    def __init__(self, stream: Stream, local_batch: int, rank: int, world_size: int, seed: int, workers: int = 0,
                 window: int = 1):
        super().__init__(seed, workers, window)
        self.stream, self.local_batch, self.rank, self.world_size = stream, local_batch, rank, world_size

    def _loader(self, start: int):
        return self._dataloader(_StreamFrom(self.stream, start, self.local_batch, self.rank, self.world_size))
