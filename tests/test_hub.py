"""Hub ids, for real and offline: the tiny-digits world laid out as a hub cache snapshot under a temporary
HF_HUB_CACHE, then trained on (preflight reads the component configs from the cache, --revision honoured),
evaluated and loaded by its id; an id that is not cached is one line and exit status 2."""

import json
import os
import subprocess
import sys

from conftest import REPO

from stepdistill.testing import hub_cache_snapshot

REPO_ID = "org/tiny-digits"
COMMIT = "0123456789abcdef0123456789abcdef01234567"

# run in a fresh interpreter: huggingface_hub and diffusers read HF_HUB_CACHE / HF_HUB_OFFLINE when imported
SCRIPT = r"""
import contextlib, io, json, sys
import torch
import stepdistill
from stepdistill.cli import main as cli

toy, out, evaluation = sys.argv[1:4]
common = dict(train_data_dir="builtin:tiny-digits", max_train_steps=2, train_batch_size=4, lora_rank=4,
              checkpointing_steps=0, max_train_samples=16)
trained = stepdistill.train("lcm", pretrained_model_name_or_path="org/tiny-digits", output_dir=out,
                            revision="%(commit)s", **common)
eval_rc = cli(["eval", "--student", out, "--num_images", "4", "--batch_size", "4", "--metrics", "digits",
               "--digits_classifier", toy, "--output_dir", evaluation, "--no_progress"])

from diffusers import StableDiffusionPipeline

pipe = stepdistill.load(StableDiffusionPipeline.from_pretrained("org/tiny-digits"), out)
images = pipe("a handwritten digit seven", output_type="pt", **stepdistill.Recipe.load(out).call_kwargs()).images

errors = {}
for name, argv in {
    "train": ["train", "lcm", "--pretrained_model_name_or_path", "org/not-cached", "--output_dir", out + "-x"],
    "revision": ["train", "lcm", "--pretrained_model_name_or_path", "org/tiny-digits", "--revision", "v9",
                 "--output_dir", out + "-y"],
    "eval": ["eval", "--pretrained_model_name_or_path", "org/not-cached", "--num_images", "2", "--metrics",
             "digits", "--digits_classifier", toy, "--output_dir", evaluation + "-x"],
}.items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli(argv)
    errors[name] = [rc, err.getvalue().strip().splitlines()]
print(json.dumps({"trained": str(trained), "eval_rc": eval_rc, "finite": bool(torch.isfinite(images).all()),
                  "shape": list(images.shape), "errors": errors}))
""" % {"commit": COMMIT}


def test_a_cached_hub_id_trains_evaluates_and_loads_offline(toy_path, tmp_path):
    cache = tmp_path / "hub"
    hub_cache_snapshot(toy_path, cache, REPO_ID, COMMIT)
    out, evaluation = tmp_path / "out", tmp_path / "eval"
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    env.pop("HF_HOME", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(toy_path), str(out), str(evaluation)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])

    assert result["trained"] == str(out)
    recipe = json.loads((out / "stepdistill.json").read_text())
    assert recipe["base_model"] == REPO_ID and 'from_pretrained("org/tiny-digits")' in (out / "README.md").read_text()
    assert result["eval_rc"] == 0
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert metrics["protocol"]["num_images"] == 4 and metrics["digits_fid"] > 0
    assert result["finite"] and result["shape"] == [1, 3, 16, 16]

    errors = result["errors"]
    rc, lines = errors["train"]
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: org/not-cached: ") and "not in the local hub cache" in lines[0]
    assert "hf download org/not-cached" in lines[0] and "HF_HUB_OFFLINE" in lines[0] and "folder" in lines[0]
    rc, lines = errors["revision"]
    assert rc == 2 and len(lines) == 1 and "at revision v9" in lines[0] and "--revision v9`" in lines[0], lines
    rc, lines = errors["eval"]
    assert rc == 2 and len(lines) == 1 and "hf download org/not-cached" in lines[0], lines
    assert not (tmp_path / "out-x" / "logs.jsonl").exists()
