"""The output-contract registry: one entry per adapter kind that saving, the model card, ``stepdistill.load`` and
``Recipe`` go through; a new kind is one registration."""

import json
import types

import pytest

import stepdistill
from stepdistill import outputs
from stepdistill.errors import StepdistillError
from stepdistill.outputs import OutputKind, model_card, output_kind, register_output, save_output
from stepdistill.recipe import RECIPE_NAME, Recipe

LORA_RECIPE = Recipe("lcm_lora", "assets/tiny-digits-sd", "lora", "LCMScheduler",
                     {"original_inference_steps": 50, "timestep_scaling": 10.0}, 4, None, 1.0, None)
FULL_RECIPE = Recipe("dmd2", "org/model", "full_unet", "LCMScheduler", {}, 1, [625], 1.0, None)

# the card: Hub metadata (no base_model for a local folder), the recipe in words, the stock code
LORA_CARD = """---
library_name: diffusers
pipeline_tag: text-to-image
tags:
- lora
- diffusers
- text-to-image
- stable-diffusion
- lcm_lora
- stepdistill
---
# lcm_lora student of `assets/tiny-digits-sd`

Trained with stepdistill (lcm_lora). Sampling recipe
(`stepdistill.json`):

- scheduler: `LCMScheduler` (original_inference_steps=50, timestep_scaling=10.0)
- 4 steps
- guidance scale 1.0 (guidance is distilled in: no CFG pass)

```python
import torch
from diffusers import StableDiffusionPipeline, LCMScheduler, UNet2DConditionModel

student_dir = "path/to/this/folder"
pipe = StableDiffusionPipeline.from_pretrained("assets/tiny-digits-sd")
pipe.load_lora_weights(student_dir)
pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, original_inference_steps=50, timestep_scaling=10.0)
image = pipe("a prompt", guidance_scale=1.0, num_inference_steps=4).images[0]
```

or, with stepdistill installed: `pipe = stepdistill.load(pipe, student_dir)`.
"""


def test_model_cards():
    assert model_card(LORA_RECIPE, "StableDiffusionPipeline") == LORA_CARD
    card = model_card(FULL_RECIPE, "StableDiffusionXLPipeline")
    assert "pipe.unet = UNet2DConditionModel.from_pretrained(student_dir, subfolder='unet')\n" in card
    assert 'image = pipe("a prompt", guidance_scale=1.0, timesteps=[625]).images[0]' in card
    assert 'pipe = StableDiffusionXLPipeline.from_pretrained("org/model")\n' in card


def test_builtin_kinds_and_unknown_ones():
    assert {"lora", "full_unet", "agd"} <= set(outputs.known_kinds())
    for name in ("lora", "full_unet", "agd"):
        assert output_kind(name).name == name and output_kind(name).unet_evals_per_step(LORA_RECIPE) == 1
    with pytest.raises(StepdistillError, match="unknown adapter 'dmd3'; expected one of lora, full_unet, agd, msd"):
        output_kind("dmd3")
    assert LORA_RECIPE.call_kwargs() == {"guidance_scale": 1.0, "num_inference_steps": 4}
    assert FULL_RECIPE.call_kwargs() == {"guidance_scale": 1.0, "timesteps": [625]}


def test_recipe_with_an_unregistered_adapter_is_refused(tmp_path):
    raw = {**json.loads(json.dumps(LORA_RECIPE.__dict__)), "adapter": "dmd3"}
    (tmp_path / RECIPE_NAME).write_text(json.dumps(raw))
    with pytest.raises(StepdistillError, match=r"stepdistill\.json: unknown adapter 'dmd3'; expected one of lora"):
        Recipe.load(tmp_path)


class NoteKind(OutputKind):
    """A stand-in for a later kind (AGD, MSD): one file, one attribute on the pipeline, its own call arguments."""

    name = "note"

    def save(self, student, output_dir, pipeline_class):
        (output_dir / "note.txt").write_text(f"{student} for {pipeline_class.__name__}")

    def load(self, pipe, output_dir, recipe, adapter_name):
        pipe.note = ((output_dir / "note.txt").read_text(), adapter_name)
        return pipe

    def card_load_lines(self, recipe):
        return "pipe.note = open(student_dir + '/note.txt').read()"

    def call_kwargs(self, recipe):
        return {**super().call_kwargs(recipe), "guidance_scale": 0.0}

    def unet_evals_per_step(self, recipe):
        return 3


def test_a_registered_kind_is_saved_carded_loaded_and_called_through_the_registry(tmp_path, monkeypatch):
    from diffusers import DDIMScheduler

    monkeypatch.setitem(outputs._KINDS, "note", None)  # removed again after the test
    register_output(NoteKind())
    recipe = Recipe("toy", "base", "note", "LCMScheduler", {}, 2)
    save_output("the student", tmp_path / "out", recipe, types.SimpleNamespace(__name__="SomePipeline"))
    out = tmp_path / "out"
    assert (out / "note.txt").read_text() == "the student for SomePipeline"
    assert Recipe.load(out) == recipe
    card = (out / "README.md").read_text()
    assert "pipe.note = open(student_dir + '/note.txt').read()\n" in card
    assert 'pipe("a prompt", guidance_scale=0.0, num_inference_steps=2)' in card
    assert recipe.call_kwargs() == {"guidance_scale": 0.0, "num_inference_steps": 2}

    pipe = stepdistill.load(types.SimpleNamespace(scheduler=DDIMScheduler()), out, adapter_name="x")
    assert pipe.note == ("the student for SomePipeline", "x")
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    assert output_kind("note").unet_evals_per_step(recipe) == 3
