"""Data at scale: map-style batches through a DataLoader equal today's; streamed WebDataset and Hugging Face sources
split among processes and workers, resume where they stopped, and skip bad input by name; latents cached on
disk equal the in-memory ones."""

import functools
import io
import logging
import tarfile
import types

import pytest
import torch
from conftest import read_logs, train_args

from stepdistill.api import main as run
from stepdistill.data import BatchServer, EpochOrder, build_dataset, load_image
from stepdistill.errors import StepdistillError
from stepdistill.latent_cache import cache_latents
from stepdistill.stream import StreamServer


@functools.lru_cache(maxsize=1)
def _all_digits():
    from stepdistill.toy.export import digit_samples

    return [(image, text) for image, text, _ in digit_samples()]


def _digits(n):
    return _all_digits()[:n]


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_shards(directory, n_shards, per_shard, members=None):
    """``n_shards`` tar shards of ``per_shard`` digits each (png + txt); ``members(i, png, txt)`` may change what
    sample i holds. Returns the brace pattern."""
    directory.mkdir(parents=True, exist_ok=True)
    samples = _digits(n_shards * per_shard)
    for s in range(n_shards):
        with tarfile.open(directory / f"{s:03d}.tar", "w") as tar:
            for i in range(s * per_shard, (s + 1) * per_shard):
                image, text = samples[i]
                parts = {"png": _png(image), "txt": text.encode()}
                parts = members(i, parts) if members else parts
                for ext, payload in parts.items():
                    info = tarfile.TarInfo(f"{i:05d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return str(directory / ("{000..%03d}.tar" % (n_shards - 1)))


def config(**kw):
    """The data options of a run (build_dataset, serve, cache_latents read these)."""
    values = dict(train_data_dir=None, dataset_name=None, train_shards=None, prompts_file=None, streaming=False,
                  caption_column="text", image_column="image", max_train_samples=None, max_bad_images=10, seed=3,
                  shuffle_buffer=8, dataloader_num_workers=0, train_batch_size=3, gradient_accumulation_steps=1,
                  latent_cache_max_bytes=4 << 30, latent_cache_dir=None, output_dir=None, resolution=16)
    values.update(kw)
    return types.SimpleNamespace(**values)


# ------------------------------------------------------------------------------------------------ map-style
@pytest.mark.parametrize("workers", [0, 2])
def test_map_style_batches_through_the_dataloader_are_todays(workers, digits_dir):
    """Today's batch of an iteration: the samples EpochOrder names, each loaded by dataset.get, stacked. Asked out
    of order and repeated (the phases of a step, a resume), with 0 or 2 workers decoding, it is the same."""
    dataset = build_dataset(config(train_data_dir=str(digits_dir), max_train_samples=40), 16, need_images=True)
    for rank in range(2):
        order = EpochOrder(len(dataset), 4, rank, 2, seed=3)
        server = BatchServer(dataset, 4, rank, 2, seed=3, workers=workers, window=2)
        for iteration in (0, 1, 1, 0, 7, 2, 30):
            idx = order.indices(iteration)
            batch = server.batch(iteration)
            assert batch["index"].tolist() == idx
            assert torch.equal(batch["pixel_values"], torch.stack([dataset.get(i)[0] for i in idx]))
            assert batch["prompts"] == [dataset.captions[i] for i in idx]
        assert server.batch(30) is server.batch(30)  # a step's phases get the batch without loading it again
    # the order itself is today's: a permutation per epoch seeded by (seed, epoch), one global batch per iteration
    g = torch.Generator().manual_seed(3 * 100_003)
    assert EpochOrder(40, 4, 1, 2, seed=3).indices(0) == torch.randperm(40, generator=g)[4:8].tolist()


def test_hugging_face_dataset_is_decoded_row_by_row_and_gives_the_same_samples(tmp_path, monkeypatch):
    import datasets

    samples = _digits(24)
    features = datasets.Features({"img": datasets.Image(), "caption": datasets.Value("string")})
    datasets.Dataset.from_dict({"img": [s[0] for s in samples], "caption": [s[1] for s in samples]},
                               features=features).save_to_disk(tmp_path / "hf")
    decoded, original = [], datasets.Image.decode_example

    def counted(self, value, **kwargs):
        decoded.append(1)
        return original(self, value, **kwargs)

    monkeypatch.setattr(datasets.Image, "decode_example", counted)
    dataset = build_dataset(config(dataset_name=str(tmp_path / "hf"), image_column="img", caption_column="caption"),
                            16, need_images=True)
    assert decoded == []  # nothing decoded up front
    before = [(load_image(row["img"], 16), row["caption"])  # what the data layer read before: every row, decoded
              for row in datasets.load_from_disk(str(tmp_path / "hf"))]
    assert dataset.captions == [c for _, c in before]
    for i in (0, 5, 23):
        image, caption = dataset.get(i)
        assert caption == before[i][1] and torch.equal(image, before[i][0])


# ------------------------------------------------------------------------------------------------ streamed
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"), 6, 10)


@pytest.mark.parametrize("n_shards", [6, 2])
def test_readers_split_each_epoch_disjointly_and_cover_it(n_shards, shards):
    """2 processes x 2 workers = 4 readers: each epoch's samples are dealt out once (by shard when there are enough
    shards, else by sample), every epoch in another order."""
    pattern = shards if n_shards == 6 else shards.replace("{000..005}", "{000..001}")
    stream = build_dataset(config(train_shards=pattern), 16, need_images=True)
    for epoch in (0, 1):
        parts = [[key for key, _, _ in stream.reader_epoch(epoch, reader, 4)] for reader in range(4)]
        keys = [k for part in parts for k in part]
        assert len(keys) == len(set(keys)) == n_shards * 10 and all(parts)
    assert [k for k, _, _ in stream.reader_epoch(0, 0, 4)] != [k for k, _, _ in stream.reader_epoch(1, 0, 4)]


def test_two_ranks_two_workers_disjoint_and_a_resume_draws_what_the_uninterrupted_run_draws(shards):
    stream = build_dataset(config(train_shards=shards), 16, need_images=True)
    straight, seen = {}, []
    for rank in range(2):
        server = StreamServer(stream, 3, rank, 2, seed=3, workers=2)
        straight[rank] = [server.batch(i) for i in range(6)]
        seen += [k for b in straight[rank][:4] for k in b["keys"]]  # within every reader's first epoch
        # in-process (no DataLoader) the same reader logic gives the same batches
        direct = [stream.batches(0, 3, rank, 2, worker=i % 2, workers=2) for i in range(2)]
        assert [next(direct[i % 2])["keys"] for i in range(4)] == [b["keys"] for b in straight[rank][:4]]
    assert len(seen) == len(set(seen)) == 24  # 2 ranks x 4 iterations x 3, no sample twice
    for rank in range(2):
        resumed = StreamServer(stream, 3, rank, 2, seed=3, workers=2)
        for i in (3, 4, 5):  # a run restarted at iteration 3 (odd: its first batch comes from the other worker)
            batch = resumed.batch(i)
            assert batch["keys"] == straight[rank][i]["keys"] and batch["prompts"] == straight[rank][i]["prompts"]
            assert torch.equal(batch["pixel_values"], straight[rank][i]["pixel_values"])


def test_a_corrupt_tar_member_is_skipped_counted_and_named(tmp_path, caplog):
    def corrupt(i, parts):
        return {**parts, "png": b"not a png"} if i == 4 else parts

    pattern = write_shards(tmp_path / "bad", 1, 8, corrupt)
    stream = build_dataset(config(train_shards=pattern, shuffle_buffer=1), 16, need_images=True)
    batches = list(zip(range(3), stream.batches(0, 4, 0, 1)))
    assert all(b["pixel_values"].shape == (4, 3, 16, 16) for _, b in batches)
    assert "00004" not in str([b["keys"] for _, b in batches])  # replaced by another image of its batch
    assert len(stream.bad) == 1 and any("000.tar:00004" in r.getMessage() for r in caplog.records)
    # a truncated shard (cut inside sample 6's image): the members before the cut are served, the break is named
    # and counted
    shard = tmp_path / "bad" / "000.tar"
    with tarfile.open(shard) as tar:
        cut = tar.getmember("00006.png").offset_data + 10
    shard.write_bytes(shard.read_bytes()[:cut])
    stream = build_dataset(config(train_shards=pattern, shuffle_buffer=1), 16, need_images=True)
    batches = list(zip(range(3), stream.batches(0, 4, 0, 1)))  # past the cut
    assert {k.rsplit(":", 1)[1] for _, b in batches for k in b["keys"]} == {"00000", "00001", "00002", "00003",
                                                                            "00005"}
    assert len(stream.bad) >= 1 and any("000.tar" in r.getMessage() and "unreadable" in r.getMessage()
                                        for r in caplog.records)
    # more than --max_bad_images: one line, also from a DataLoader worker
    stream = build_dataset(config(train_shards=pattern, max_bad_images=0), 16, need_images=True)
    with pytest.raises(StepdistillError, match=r"^more than 0 unreadable images \(last: .*000.tar[^\n]*$"):
        StreamServer(stream, 4, 0, 1, seed=3, workers=2).batch(0)


def test_streamed_sources_without_the_caption_column_are_one_line_errors(tmp_path):
    import datasets

    pattern = write_shards(tmp_path / "json", 1, 2, lambda i, p: {"png": p["png"], "json": b"{}"})
    with pytest.raises(StepdistillError, match=r"has no 'txt' or 'text' member \(it has \['json', 'png'\]\); "
                                               r"set --caption_column$"):
        build_dataset(config(train_shards=pattern), 16, need_images=True)
    samples = _digits(8)
    datasets.Dataset.from_dict({"image": [s[0] for s in samples], "prompt": [s[1] for s in samples]}).save_to_disk(
        tmp_path / "hf")
    with pytest.raises(StepdistillError, match=r"no column 'text' \(columns: \['image', 'prompt'\]\); set "
                                               r"--image_column / --caption_column$"):
        build_dataset(config(dataset_name=str(tmp_path / "hf"), streaming=True), 16, need_images=True)
    stream = build_dataset(config(dataset_name=str(tmp_path / "hf"), streaming=True, caption_column="prompt"), 16,
                           need_images=True)
    # 8 rows in 8 shards, 2 workers: each reader's first epoch (4 rows) lies within its first two batches of 3
    server = StreamServer(stream, 3, 0, 1, seed=3, workers=2)
    batches = [server.batch(i) for i in range(4)]
    assert all(b["pixel_values"].shape == (3, 3, 16, 16) for b in batches)
    assert len({k for b in batches[:2] for k in b["keys"]}) == 6 and len({k for b in batches for k in b["keys"]}) == 8


def test_a_missing_caption_column_stops_the_run_before_weights_load(tiny_sd_path, tmp_path, capsys, monkeypatch):
    import stepdistill.trainer as trainer

    def no_loading(*a, **k):
        raise AssertionError("weights loaded before the data was opened")

    monkeypatch.setattr(trainer.Teacher, "for_config", no_loading)
    pattern = write_shards(tmp_path / "json", 1, 2, lambda i, p: {"png": p["png"], "json": b"{}"})
    assert run("lcm", train_args(tiny_sd_path, None, tmp_path / "o", train_shards=pattern,
                                 max_train_samples=None)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "no 'txt' or 'text' member" in err[0] and "--caption_column" in err[0], err


def test_msd_parts_filter_the_stream_and_max_train_samples_reads_its_head(shards):
    is_three = lambda caption: "3" in caption or "three" in caption  # noqa: E731
    stream = build_dataset(config(train_shards=shards), 16, need_images=True, keep=is_three)
    part = [c for r in range(2) for _, c, _ in stream.reader_epoch(0, r, 2)]
    assert sorted(part) == sorted(c for _, c in _digits(60) if is_three(c)) and part
    assert stream.validation_captions(3) == list(dict.fromkeys(c for _, c in _digits(60) if is_three(c)))[:3]
    head = build_dataset(config(train_shards=shards, max_train_samples=7), 16, need_images=True)
    assert not head.streamed and head.captions == [c for _, c in _digits(7)]
    assert torch.equal(head.get(6)[0], load_image(_digits(7)[6][0], 16))


# ------------------------------------------------------------------------------------------------ latent cache
def _encode(images):  # a stand-in VAE: deterministic, a different shape than the images
    mean = torch.nn.functional.avg_pool2d(images, 4)
    return mean, mean.abs() + 0.1


def test_disk_latent_cache_equals_the_in_memory_one_and_an_interrupted_write_is_not_reused(digits_dir, tmp_path):
    dataset = build_dataset(config(train_data_dir=str(digits_dir), max_train_samples=150), 16, need_images=True)
    _, memory = cache_latents(config(output_dir=str(tmp_path)), dataset, _encode)
    assert type(memory).__name__ == "InMemoryLatents"
    calls = []

    def interrupted(images):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return _encode(images)

    small = config(output_dir=str(tmp_path), latent_cache_max_bytes=1000)
    with pytest.raises(KeyboardInterrupt):
        cache_latents(small, dataset, interrupted)
    assert (tmp_path / "latent_cache.partial").is_dir() and not (tmp_path / "latent_cache").exists()
    _, disk = cache_latents(small, dataset, _encode)
    assert type(disk).__name__ == "DiskLatents" and not (tmp_path / "latent_cache.partial").exists()
    idx = EpochOrder(150, 5, 0, 1, seed=3).indices(7) + [0, 149, 64]
    for a, b in zip(memory.rows(idx), disk.rows(idx)):
        assert torch.equal(a, b)
    # a complete cache is reused (only the first chunk is encoded, to size the cache); another data set is not
    calls.clear()
    cache_latents(small, dataset, interrupted)
    assert len(calls) == 1
    other = build_dataset(config(train_data_dir=str(digits_dir), max_train_samples=70), 16, need_images=True)
    _, latents = cache_latents(small, other, _encode)
    assert len(latents) == 70


def test_streamed_latents_are_cached_once_and_served_in_epoch_order(shards, tmp_path):
    stream = build_dataset(config(train_shards=shards), 16, need_images=True)
    dataset, latents = cache_latents(config(output_dir=str(tmp_path)), stream, _encode)
    assert len(dataset) == len(latents) == 60 and dataset.captions == [c for _, c in _digits(60)]
    mean, _ = latents.rows([0, 59])
    expected = _encode(torch.stack([load_image(_digits(60)[i][0], 16) for i in (0, 59)]))[0]
    assert torch.equal(mean, expected)


# ------------------------------------------------------------------------------------------------ training
def test_training_through_streamed_shards_with_workers_resumes_exactly(tiny_sd_path, tmp_path):
    """LCM-LoRA through WebDataset shards with 2 DataLoader workers: a run resumed at step 2 logs the losses of the
    uninterrupted run and ends with its weights."""
    from safetensors.torch import load_file

    pattern = write_shards(tmp_path / "shards", 4, 8)
    common = dict(train_shards=pattern, max_train_samples=None, dataloader_num_workers=2, max_train_steps=4,
                  learning_rate=1e-3, checkpointing_steps=2, train_batch_size=3)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run("lcm", train_args(tiny_sd_path, None, straight, **common)) == 0
    assert run("lcm", train_args(tiny_sd_path, None, resumed, **{**common, "max_train_steps": 2})) == 0
    (resumed / "pytorch_lora_weights.safetensors").unlink()
    assert run("lcm", train_args(tiny_sd_path, None, resumed, resume_from_checkpoint="latest", **common)) == 0
    assert [r["step"] for r in read_logs(resumed)] == [1, 2, 3, 4]
    assert [r["loss"] for r in read_logs(straight)] == pytest.approx([r["loss"] for r in read_logs(resumed)],
                                                                     rel=1e-6)
    a, b = (load_file(d / "pytorch_lora_weights.safetensors") for d in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-7) for k in a)


def test_map_style_training_with_workers_logs_the_losses_of_the_run_without(tiny_sd_path, digits_dir, tmp_path):
    logs = []
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        assert run("lcm", train_args(tiny_sd_path, digits_dir, out, max_train_steps=3, dataloader_num_workers=workers,
                                     gradient_accumulation_steps=2, learning_rate=1e-3)) == 0
        logs.append([r["loss"] for r in read_logs(out)])
    assert logs[0] == logs[1] and len(logs[0]) == 3


def test_training_on_latents_cached_on_disk_logs_the_losses_of_the_in_memory_cache(tiny_sd_path, digits_dir,
                                                                                   tmp_path):
    logs = []
    for max_bytes in (4 << 30, 1):
        out = tmp_path / f"cache{max_bytes}"
        assert run("lcm", train_args(tiny_sd_path, digits_dir, out, max_train_steps=2, cache_latents="true",
                                     latent_cache_max_bytes=max_bytes, learning_rate=1e-3)) == 0
        logs.append([r["loss"] for r in read_logs(out)])
    assert (out / "latent_cache" / "index.json").is_file()  # the second run went to disk
    assert logs[0] == logs[1]
