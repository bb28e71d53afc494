"""MSD outputs at inference: every prompt reaches its student's LoRA, images come back in the input order as the
stock output object, a batch mixing all parts costs at most K UNet passes per step, and the bad outputs are refused."""

import json

import pytest
import torch
from conftest import train_args

import stepdistill
from stepdistill.errors import StepdistillError
from stepdistill.msd.partition import explicit
from stepdistill.msd.routed import MSDStudents
from stepdistill.outputs import save_output
from stepdistill.recipe import Recipe
from stepdistill.trainer import run

PROMPTS = ["a digit one", "a digit seven", "the number one", "a red digit", "one more digit"]


@pytest.fixture(scope="module")
def msd_dir(tiny_sd_path, digits_dir, tmp_path_factory):
    """Two LCM-LoRA students of the tiny SD (different seeds and learning rates) under one explicit router:
    prompts with "one" go to student 0, the rest to student 1."""
    from diffusers import StableDiffusionPipeline

    out = tmp_path_factory.mktemp("msd")
    dirs = [out / "students" / str(k) for k in range(2)]
    for k, d in enumerate(dirs):
        assert run("lcm", train_args(tiny_sd_path, digits_dir, d, seed=k, learning_rate=1e-2 * (k + 1))) == 0
    router = explicit([(r"\bone\b", 0), (r".", 1)], 2, PROMPTS)
    recipe = Recipe(**{**json.loads((dirs[0] / "stepdistill.json").read_text()), "method": "msd", "adapter": "msd"})
    save_output(MSDStudents(dirs, router), out, recipe, StableDiffusionPipeline)
    return out


def _stock(path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call(pipe, prompts, seeds):
    return pipe(prompts, generator=[torch.Generator().manual_seed(s) for s in seeds], num_inference_steps=2,
                guidance_scale=1.0, output_type="pt")


def test_every_prompt_reaches_its_student_in_input_order(msd_dir, tiny_sd_path):
    routed = stepdistill.load(_stock(tiny_sd_path), msd_dir)
    calls = []
    handle = routed.unet.register_forward_hook(lambda *a: calls.append(1))
    out = _call(routed, PROMPTS, range(len(PROMPTS)))
    handle.remove()
    assert type(out).__name__ == "StableDiffusionPipelineOutput" and out.images.shape[0] == len(PROMPTS)
    assert len(calls) <= 2 * 2  # at most K passes per step (2 students, 2 steps)
    for k, rows in ((0, [0, 2, 4]), (1, [1, 3])):  # each student alone (its LoRA, its recipe's scheduler)
        alone = stepdistill.load(_stock(tiny_sd_path), msd_dir / "students" / str(k))
        expected = _call(alone, [PROMPTS[i] for i in rows], rows).images
        assert torch.allclose(out.images[rows], expected, atol=1e-6)
    assert not torch.allclose(out.images[0], out.images[1])


def test_a_router_that_does_not_match_the_students_is_refused(msd_dir, tiny_sd_path, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(msd_dir, broken)
    (broken / "msd.json").write_text(json.dumps({"students": ["students/0"]}))
    with pytest.raises(StepdistillError, match="routes to 2 students but 1 are on disk"):
        stepdistill.load(_stock(tiny_sd_path), broken)
    shutil.rmtree(broken)
    shutil.copytree(msd_dir, broken)
    recipe = json.loads((broken / "students/1/stepdistill.json").read_text())
    (broken / "students/1/stepdistill.json").write_text(json.dumps({**recipe, "base_model": "other/base"}))
    with pytest.raises(StepdistillError, match="student 1 was trained from other/base"):
        stepdistill.load(_stock(tiny_sd_path), broken)
