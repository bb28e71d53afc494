"""On the tiny-digits world, the students actually learn (loss falls) within a few dozen CPU steps."""

import json

import pytest
from conftest import train_args

from stepdistill.methods.lcm import LCM
from stepdistill.methods.tscd import TSCD
from stepdistill.trainer import run


@pytest.mark.parametrize("method, extra", [(LCM, {"guidance_scale_min": 3, "guidance_scale_max": 3}),
                                           (TSCD, {"segments": "4"})])
def test_loss_falls_over_50_steps_on_tiny_digits(method, extra, toy_path, tmp_path):
    out = tmp_path / "run"
    assert run(method, train_args(toy_path, "builtin:tiny-digits", out, max_train_steps=50, train_batch_size=32,
                                  lora_rank=8, learning_rate=2e-3, cache_latents="true", max_train_samples=None,
                                  **extra)) == 0
    losses = [json.loads(line)["loss"] for line in (out / "logs.jsonl").read_text().splitlines()]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first, (first, last)
