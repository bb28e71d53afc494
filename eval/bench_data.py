"""Data benchmark: images per second that each source delivers through the trainer's own data objects
(``stepdistill.data.build_dataset`` and ``serve``, batch by batch as ``Trainer`` asks), with 0 and 2 DataLoader
workers, and peak memory as the data set grows 10x; with ``--rss``, the peak RSS of LCM-LoRA training runs on the
tiny-digits teacher on N and 10N images instead.

    OMP_NUM_THREADS=1 python eval/bench_data.py --root scratch/bench --sizes 2000,20000
    OMP_NUM_THREADS=1 python eval/bench_data.py --root scratch/bench --sizes 2000,20000 --rss --steps 200

The images are the digits upscaled to --resolution with mild noise (PNG, ~31 kB each at 128 px), written once under
--root as an image folder, a Hugging Face dataset (save_to_disk) and WebDataset shards of 1000 samples. Every
measurement is a fresh process; memory is the peak PSS of the process and its DataLoader workers together
(sampled every 0.1 s), or with --rss the training process's peak RSS (``wait4``'s ru_maxrss, as /usr/bin/time);
beside it the peak of its anonymous part (RssAnon: what the process allocated) and, for --rss, of its file-backed
part (RssFile: pages of mapped files, e.g. the memory-mapped Arrow files of a Hugging Face dataset, which grow with
the rows read and which the kernel can drop at will).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SOURCES = ("folder", "hf", "hf-stream", "wds")
PER_SHARD = 1000


# ------------------------------------------------------------------------------------------------ the data sets
def _pngs(resolution: int, count: int = 1797) -> list[tuple[bytes, str]]:
    """``count`` distinct PNGs: each digit upscaled to ``resolution`` with noise, and its caption."""
    import numpy as np
    from PIL import Image

    from stepdistill.toy.export import digit_samples

    rng = np.random.default_rng(0)
    out = []
    for image, caption, _ in digit_samples()[:count]:
        big = np.asarray(image.resize((resolution, resolution), Image.BICUBIC), dtype=np.int16)
        big = np.clip(big + rng.integers(-12, 13, big.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(big).save(buf, format="PNG")
        out.append((buf.getvalue(), caption))
    return out


def make_data(root: Path, n: int, resolution: int) -> dict[str, dict]:
    """The data options of each source for ``n`` images (written once)."""
    folder, hf, shards = root / f"folder-{n}", root / f"hf-{n}", root / f"wds-{n}"
    done = (folder / "metadata.jsonl").is_file(), (hf / "state.json").is_file(), (shards / "done").is_file()
    pngs = None if all(done) else _pngs(resolution)
    if not done[0]:
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(n):
            data, caption = pngs[i % len(pngs)]
            (folder / f"{i:06d}.png").write_bytes(data)
            rows.append(json.dumps({"file_name": f"{i:06d}.png", "text": caption}))
        (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    if not done[1]:
        import datasets

        features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
        rows = {"image": [{"bytes": pngs[i % len(pngs)][0], "path": None} for i in range(n)],
                "text": [pngs[i % len(pngs)][1] for i in range(n)]}
        datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(hf))
    if not done[2]:
        shards.mkdir(parents=True, exist_ok=True)
        for s in range(-(-n // PER_SHARD)):
            with tarfile.open(shards / f"{s:05d}.tar", "w") as tar:
                for i in range(s * PER_SHARD, min(n, (s + 1) * PER_SHARD)):
                    data, caption = pngs[i % len(pngs)]
                    for ext, payload in (("png", data), ("txt", caption.encode())):
                        info = tarfile.TarInfo(f"{i:06d}.{ext}")
                        info.size = len(payload)
                        tar.addfile(info, io.BytesIO(payload))
        (shards / "done").write_text("")
    last = -(-n // PER_SHARD) - 1
    return {"folder": {"train_data_dir": str(folder)},
            "hf": {"dataset_name": str(hf)},
            "hf-stream": {"dataset_name": str(hf), "streaming": "true"},
            "wds": {"train_shards": str(shards / f"{{00000..{last:05d}}}.tar")}}


# ------------------------------------------------------------------------------------------------ measuring
def _run_measured(cmd: list[str], env: dict, pss: bool) -> tuple[str, dict]:
    """Run ``cmd``; its stdout and peak memory in MB: ``pss`` (of it and its children, polled) or ``rss`` (its
    ru_maxrss) with the peaks of its anonymous and file-backed parts (/proc/PID/status RssAnon, RssFile, polled)."""
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True)
        peak, done = {"pss": 0.0, "anon": 0.0, "file": 0.0}, threading.Event()

        def poll():
            import psutil

            parent = psutil.Process(proc.pid)
            while not done.is_set():
                try:
                    tree = [parent, *parent.children(recursive=True)] if pss else [parent]
                    if pss:
                        peak["pss"] = max(peak["pss"], sum(p.memory_full_info().pss for p in tree) / 2**20)
                    kb = {"RssAnon": 0, "RssFile": 0}
                    for p in tree:
                        for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                            if line.split(":")[0] in kb:
                                kb[line.split(":")[0]] += int(line.split()[1])
                    peak["anon"] = max(peak["anon"], kb["RssAnon"] / 1024)
                    peak["file"] = max(peak["file"], kb["RssFile"] / 1024)
                except (psutil.Error, OSError, ValueError):
                    pass
                time.sleep(0.1 if pss else 0.5)

        threading.Thread(target=poll, daemon=True).start()
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own rusage
        proc.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{err.read()[-3000:]}")
        peak["rss"] = usage.ru_maxrss / 1024
        return out.read(), peak


def serve_images(options: dict, workers: int, batches: int, batch_size: int, resolution: int) -> dict:
    """Images per second through the trainer's data objects: build_dataset, serve, .batch(iteration)."""
    from stepdistill.config import TrainConfig, options_to_argv, parse_config
    from stepdistill.data import build_dataset

    try:
        from stepdistill.data import serve
    except ImportError:  # the data layer before streaming (a before/after comparison from an older checkout)
        from stepdistill.data import BatchServer

        def serve(c, dataset, rank, world):
            return BatchServer(dataset, c.train_batch_size, rank, world, c.seed)

    config = parse_config(TrainConfig, options_to_argv({**options, "resolution": resolution, "seed": 0,
                                                        "train_batch_size": batch_size,
                                                        "dataloader_num_workers": workers}))
    start = time.perf_counter()
    dataset = build_dataset(config, resolution, need_images=True)
    server = serve(config, dataset, 0, 1)
    server.batch(0)  # workers started, first batch in
    ready = time.perf_counter()
    for i in range(1, batches + 1):
        assert server.batch(i)["pixel_values"].shape == (batch_size, 3, resolution, resolution)
    end = time.perf_counter()
    return {"images_per_s": batches * batch_size / (end - ready), "first_batch_s": ready - start}


def bench_table(root: Path, sizes: list[int], workers: list[int], batches: int, batch_size: int,
                resolution: int, sources: list[str]) -> list[dict]:
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    for source in sources:
        for w in workers:
            row = {"source": source, "workers": w}
            for n in sizes:
                options = make_data(root, n, resolution)[source]
                cmd = [sys.executable, __file__, "--one", json.dumps(options), "--workers", str(w), "--batches",
                       str(batches), "--batch_size", str(batch_size), "--resolution", str(resolution)]
                stdout, peak = _run_measured(cmd, env, pss=True)
                speed = json.loads(stdout.strip().splitlines()[-1])
                row[f"peak_mb_{n}"], row[f"peak_anon_mb_{n}"] = peak["pss"], peak["anon"]
                row.setdefault("images_per_s", speed["images_per_s"])
                row.setdefault("first_batch_s", speed["first_batch_s"])
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def rss_table(root: Path, sizes: list[int], steps: int, batch_size: int, resolution: int, workers: int,
              sources: list[str], jobs: int = 1) -> list[dict]:
    """Peak memory of ``train_scripts/train_lcm.py`` runs, ``jobs`` of them at a time (each its own process)."""
    from concurrent.futures import ThreadPoolExecutor

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    options = {n: make_data(root, n, resolution) for n in sizes}

    def train(source: str, n: int) -> dict:
        argv = ["--pretrained_model_name_or_path", str(REPO / "assets" / "tiny-digits-sd"), "--output_dir",
                str(root / "runs" / f"{source}-{n}"), "--resolution", str(resolution), "--max_train_steps",
                str(steps), "--train_batch_size", str(batch_size), "--checkpointing_steps", "0",
                "--dataloader_num_workers", str(workers)]
        for k, v in options[n][source].items():
            argv += [f"--{k}", v]
        start = time.perf_counter()
        _, peak = _run_measured([sys.executable, str(REPO / "train_scripts" / "train_lcm.py"), *argv], env,
                                pss=False)
        print(json.dumps({"source": source, "images": n, **peak, "minutes": (time.perf_counter() - start) / 60}),
              flush=True)
        return peak

    runs = [(source, n) for source in sources for n in sizes]
    with ThreadPoolExecutor(jobs) as pool:
        peaks = dict(zip(runs, pool.map(lambda run: train(*run), runs)))
    rows = []
    for source in sources:
        row = {"source": source, "steps": steps, "workers": workers}
        for n in sizes:
            peak = peaks[source, n]
            row[f"peak_rss_mb_{n}"], row[f"peak_anon_mb_{n}"], row[f"peak_file_mb_{n}"] = (
                peak["rss"], peak["anon"], peak["file"])
        a, b = (row[f"peak_rss_mb_{n}"] for n in sizes[:2])
        row["change"] = (b - a) / a
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="scratch/bench", help="where the data sets (and --rss runs) go")
    parser.add_argument("--sizes", default="2000,20000", help="N and 10N images")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--workers", default="0,2")
    parser.add_argument("--batches", type=int, default=40, help="timed batches per measurement")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--rss", action="store_true", help="peak RSS of LCM-LoRA runs instead")
    parser.add_argument("--steps", type=int, default=200, help="--rss: training steps")
    parser.add_argument("--jobs", type=int, default=1, help="--rss: training runs at a time")
    parser.add_argument("--sources", default=None, help=f"of {','.join(SOURCES)} (default: all; --rss: wds,hf)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a single measurement (the child process)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(serve_images(json.loads(args.one), int(args.workers), args.batches, args.batch_size,
                                      args.resolution)))
        return
    root, sizes = Path(args.root), [int(s) for s in args.sizes.split(",")]
    if args.rss:
        rows = rss_table(root, sizes, args.steps, args.batch_size, args.resolution, int(args.workers.split(",")[0]),
                         (args.sources or "wds,hf").split(","), args.jobs)
        print(f"\nLCM-LoRA, tiny-digits teacher, {args.resolution} px, batch {args.batch_size}, {args.steps} steps, "
              f"--dataloader_num_workers {rows[0]['workers']}: peak RSS of the training process\n")
        print(f"| source | {' | '.join(f'{n} images' for n in sizes)} | change | of which anonymous / file-backed |"
              "\n|---|" + "---|" * (len(sizes) + 2))
        for r in rows:
            print(f"| {r['source']} | " + " | ".join(f"{r[f'peak_rss_mb_{n}']:.0f} MB" for n in sizes)
                  + f" | {r['change']:+.1%} | "
                  + ", ".join(f"{r[f'peak_anon_mb_{n}']:.0f} / {r[f'peak_file_mb_{n}']:.0f} MB" for n in sizes) + " |")
        return
    rows = bench_table(root, sizes, [int(w) for w in args.workers.split(",")], args.batches, args.batch_size,
                       args.resolution, args.sources.split(",") if args.sources else list(SOURCES))
    print(f"\n{args.resolution}-px PNGs, batches of {args.batch_size}, {args.batches} timed batches after the "
          f"first, {os.cpu_count()} CPUs: images/s at {sizes[0]} images; peak PSS of the process and its workers "
          "(their peak anonymous RSS)\n")
    print(f"| source | workers | images/s | first batch (s) | "
          f"{' | '.join(f'peak MB, {n} images (anonymous)' for n in sizes)} |\n|---|---|---|---|" + "---|" * len(sizes))
    for r in rows:
        print(f"| {r['source']} | {r['workers']} | {r['images_per_s']:.0f} | {r['first_batch_s']:.1f} | "
              + " | ".join(f"{r[f'peak_mb_{n}']:.0f} ({r[f'peak_anon_mb_{n}']:.0f})" for n in sizes) + " |")


if __name__ == "__main__":
    main()
