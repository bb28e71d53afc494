"""On the tiny-digits world the students learn within 50 CPU steps: the training loss falls, and (LCM-LoRA) the
few-step samples, drawn the stock way from the recipe, move measurably closer to the real digits."""

import pytest
from conftest import read_logs, train_args

from stepdistill.config import parse_config
from stepdistill.methods import get_method
from stepdistill.toy.evaluate import DigitsJudge, score_pipeline
from stepdistill.trainer import Trainer


def _few_step_fid(trainer, judge, steps: int, n: int = 300) -> float:
    kwargs = {**trainer.method.recipe().call_kwargs(), "num_inference_steps": steps}
    return score_pipeline(trainer.method.sampling_pipeline(), judge, kwargs, num_images=n)[0]["digits_fid"]


@pytest.mark.parametrize("name, extra", [("lcm", {"guidance_scale_min": 3, "guidance_scale_max": 3}),
                                         ("tscd", {"segments": "4"})])
def test_student_learns_within_50_steps_on_tiny_digits(name, extra, toy_path, tmp_path):
    method = get_method(name)
    out = tmp_path / "run"
    options = dict(max_train_steps=50, train_batch_size=32, lora_rank=8, learning_rate=3e-3, cache_latents="true",
                   max_train_samples=None)
    trainer = Trainer(parse_config(method.config_class, train_args(toy_path, "builtin:tiny-digits", out,
                                                                   **{**options, **extra})), method)
    judge = DigitsJudge.from_world(toy_path)
    before = _few_step_fid(trainer, judge, 2) if name == "lcm" else None  # LoRA at zero: the teacher
    trainer.train()
    losses = [r["loss"] for r in read_logs(out)]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.95 * first, (first, last)
    if name == "lcm":
        # the teacher sampled with LCMScheduler at 2 steps is poor; 50 LCM steps already improve it by > 20 %
        after = _few_step_fid(trainer, judge, 2)
        assert after < 0.8 * before, (before, after)
