"""Sharded evaluation: ``torchrun --nproc_per_node 2 eval/evaluate.py`` splits the batches between the processes,
gives the images and numbers of one process, and resumes a run made with another number of processes."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO
from PIL import Image

from stepdistill.evaluation import build_tiny_clip

NUM_IMAGES, BATCH = 18, 4  # 5 batches, the last one short: 3 for rank 0, 2 for rank 1


@pytest.fixture(scope="module")
def scoring(tmp_path_factory):
    """What the FID and CLIP metrics need: 40 real digits as a reference folder and a tiny CLIP."""
    from stepdistill.toy import data

    root = tmp_path_factory.mktemp("scoring")
    (root / "reference").mkdir()
    for i, image in enumerate(data.to_uint8(data.load_digits_images()[0][:40])):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(root / "reference" / f"{i}.png")
    return ["--metrics", "digits", "fid", "kid", "clip", "--fid_extractor", "digits", "--reference_dir",
            str(root / "reference"), "--kid_subset_size", "10", "--clip_model", str(build_tiny_clip(root / "clip"))]


def evaluate(model, out, nproc, scoring):
    argv = [str(REPO / "eval/evaluate.py"), "--pretrained_model_name_or_path", str(model), *scoring,
            "--num_images", str(NUM_IMAGES), "--batch_size", str(BATCH), "--num_inference_steps", "2",
            "--guidance_scale", "3", "--output_dir", str(out), "--no_progress"]
    launcher = [sys.executable] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    # one thread per process in both runs: CPU kernels may round differently with another thread count
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(launcher + argv, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1, proc.stdout  # printed by the main process only
    return json.loads((out / "metrics.json").read_text()), json.loads((out / "generation.json").read_text())


def images(out):
    return {p.name: p.read_bytes() for p in sorted((out / "images").iterdir())}


def test_two_processes_give_the_images_and_numbers_of_one_and_resume(toy_path, scoring, tmp_path):
    one, one_state = evaluate(toy_path, tmp_path / "one", 1, scoring)
    two, two_state = evaluate(toy_path, tmp_path / "two", 2, scoring)

    scores = ("digits_fid", "prompt_agreement", "fid", "kid", "kid_std", "clip_score")
    # the features are gathered and added in the order of one process: the same numbers to the last bit
    assert {k: two[k] for k in scores} == {k: one[k] for k in scores}
    expected = images(tmp_path / "one")
    assert sorted(expected) == [f"{i:05d}.png" for i in range(NUM_IMAGES)]
    assert images(tmp_path / "two") == expected  # every file, byte for byte, and nothing else (no .tmp left)
    # each image was generated once, by one of the two processes
    assert one_state["generated_images"] == two_state["generated_images"] == NUM_IMAGES
    assert two_state["unet_samples"] == one_state["unet_samples"] == NUM_IMAGES * 2 * 2  # 2 steps x CFG
    assert (one["protocol"]["num_processes"], two["protocol"]["num_processes"]) == (1, 2)
    assert two["protocol"]["nfe_per_image"] == 4 and two["protocol"]["num_images"] == NUM_IMAGES
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == \
        sorted(p.name for p in (tmp_path / "one").iterdir())

    # resume the one-process run with two processes: one image missing in batch 0 (dealt to rank 0), batch 1
    # (rank 1) and the short last batch (rank 0)
    for i in (1, 6, 17):
        (tmp_path / "one" / "images" / f"{i:05d}.png").unlink()
    again, state = evaluate(toy_path, tmp_path / "one", 2, scoring)
    assert images(tmp_path / "one") == expected
    assert state["generated_images"] == NUM_IMAGES + 4 + 4 + 2  # the three batches redone whole, nothing else
    assert {k: again[k] for k in scores} == {k: one[k] for k in scores}
    assert again["protocol"]["num_processes"] == 2


def test_paper_clip_and_kid_of_two_processes_are_those_of_one(toy_path, scoring, tmp_path):
    paper = [*scoring, "--clip_protocol", "paper"]
    one, _ = evaluate(toy_path, tmp_path / "one", 1, paper)
    two, _ = evaluate(toy_path, tmp_path / "two", 2, paper)
    assert one["protocol"]["clip"]["protocol"] == "paper" and one["protocol"]["kid"]["subset_size"] == 10
    assert {k: two[k] for k in ("fid", "kid", "kid_std", "clip_score")} == \
        {k: one[k] for k in ("fid", "kid", "kid_std", "clip_score")}
