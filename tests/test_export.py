"""Outputs the ecosystem loads: kohya single-file LoRAs (checked through Diffusers' own kohya loader), Hub model
cards, trackers that really receive the logs, and the bad input around them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, train_args
from safetensors import safe_open

import stepdistill
from stepdistill.api import main as run
from stepdistill.cli import main as cli
from stepdistill.errors import StepdistillError
from stepdistill.export import to_kohya
from stepdistill.lora import add_lora
from stepdistill.outputs import card_metadata, hub_id, model_card, save_output
from stepdistill.recipe import Recipe

CALL = dict(prompt=["a cat", "a dog on a hill"], num_inference_steps=2, output_type="pt", height=16, width=16)


def _lora_output(base: Path, out: Path, rank=4, alpha=8.0) -> Path:
    """A LoRA output of ``base`` with random (non-zero) B matrices and alpha != rank, written by the library's
    own save path."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(base)
    add_lora(pipe.unet, rank, alpha=alpha, seed=0)
    g = torch.Generator().manual_seed(1)
    for name, p in pipe.unet.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.05
    save_output(pipe.unet, out, Recipe("lcm_lora", str(base), "lora", "DDIMScheduler", {}, 2), type(pipe))
    return out


def _images(pipe):
    return pipe(**CALL, generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("base", ["tiny_sd_path", "tiny_sdxl_path"])
def test_kohya_file_loads_completely_through_diffusers_and_gives_the_same_images(base, request, tmp_path):
    from diffusers import DiffusionPipeline
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    base = request.getfixturevalue(base)
    out = _lora_output(base, tmp_path / "out")
    path = to_kohya(out, tmp_path / "lora.safetensors")
    kohya = load_file(str(path))
    peft_file = load_file(str(out / "pytorch_lora_weights.safetensors"))
    modules = {k.rsplit(".lora_", 1)[0] for k in peft_file}
    assert all(k.startswith("lora_unet_") for k in kohya)
    assert len(kohya) == len(peft_file) + len(modules)  # down + up per module, and one .alpha each
    assert {float(v) for k, v in kohya.items() if k.endswith(".alpha")} == {8.0}  # the trained alpha, not the rank
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "8.0")
    assert meta["ss_base_model_version"] == ("sdxl_base_v1-0" if "sdxl" in str(base) else "sd_v1")

    stock = DiffusionPipeline.from_pretrained(base)  # Diffusers' kohya path, nothing of ours
    stock.load_lora_weights(str(path), adapter_name="k")
    ours = DiffusionPipeline.from_pretrained(base)
    ours.load_lora_weights(out, adapter_name="p")
    loaded = get_peft_model_state_dict(stock.unet, adapter_name="k")
    reference = get_peft_model_state_dict(ours.unet, adapter_name="p")
    assert loaded.keys() == reference.keys()  # every tensor, no missing or unexpected key
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)
    assert stock.unet.peft_config["k"].lora_alpha == 8.0 and stock.unet.peft_config["k"].r == 4

    a, b = _images(stock), _images(ours)
    assert (a - b).abs().max() <= 1e-4
    plain = _images(DiffusionPipeline.from_pretrained(base))
    assert (a - plain).abs().max() > 1e-2  # the LoRA does something

    # stepdistill.load takes the file too: family checked, the recipe's scheduler restored
    pipe = stepdistill.load(DiffusionPipeline.from_pretrained(base), path)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert (_images(pipe) - _images(stepdistill.load(ours, out))).abs().max() <= 1e-4


def test_export_cli_and_its_bad_input(tiny_sd_path, tiny_sdxl_path, tmp_path, capsys):
    from diffusers import DiffusionPipeline

    out = _lora_output(tiny_sd_path, tmp_path / "out")
    assert cli(["export", str(out), "--format", "kohya", "--output", str(tmp_path / "a.safetensors")]) == 0
    assert (tmp_path / "a.safetensors").is_file() and not list(tmp_path.glob("*.partial"))

    full = tmp_path / "full"
    save_output(DiffusionPipeline.from_pretrained(tiny_sd_path).unet, full,
                Recipe("dmd2", str(tiny_sd_path), "full_unet", "LCMScheduler", {}, 1), type(None))
    cases = {
        "full UNet": ([str(full), "--output", str(tmp_path / "b.safetensors")],
                      "cannot export a full UNet (unet/)"),
        "family": ([str(out), "--output", str(tmp_path / "c.safetensors"), "--base_family", "sdxl"],
                   "is a LoRA of " + str(tiny_sd_path) + ", an SD 1.x model; drop --base_family or pass sd1"),
        "suffix": ([str(out), "--output", str(tmp_path / "d.pt")], "name it FILE.safetensors"),
        "not an output": ([str(tmp_path), "--output", str(tmp_path / "e.safetensors")], "is not a stepdistill output"),
    }
    for name, (argv, message) in cases.items():
        capsys.readouterr()
        assert cli(["export", *argv]) == 2, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, (name, err)

    # a kohya file for another base family: refused before Diffusers half-loads it
    xl = to_kohya(_lora_output(tiny_sdxl_path, tmp_path / "xl"), tmp_path / "xl.safetensors")
    with pytest.raises(StepdistillError, match="is a LoRA for SDXL but this is an SD 1.x pipeline"):
        stepdistill.load(DiffusionPipeline.from_pretrained(tiny_sd_path), xl)


def test_model_card_parses_on_the_hub_side(tiny_sd_path, tmp_path, caplog):
    from huggingface_hub import ModelCard
    from huggingface_hub.utils import validate_repo_id

    recipe = Recipe("sid", "org/sd15", "lora", "LCMScheduler", {"original_inference_steps": 1000}, 1, [999], 1.0,
                    extra={"note": "pass latents = init_noise_scale * randn"})
    card = ModelCard(model_card(recipe, "StableDiffusionPipeline", sample_grid="samples/step-000004.png"))
    assert card.data.base_model == "org/sd15" and validate_repo_id(card.data.base_model) is None
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-image"
    assert card.data.tags[:5] == ["lora", "diffusers", "text-to-image", "stable-diffusion", "sid"]
    assert "![validation samples](samples/step-000004.png)" in card.text
    assert "- note: pass latents = init_noise_scale * randn" in card.text and "- timesteps [999]" in card.text
    xl = card_metadata(Recipe("dmd2", "org/sdxl", "full_unet", "LCMScheduler"), "StableDiffusionXLPipeline")
    assert "lora" not in xl["tags"] and "stable-diffusion-xl" in xl["tags"]

    # a hub-cache snapshot folder is its repository id; a plain local folder has none (left out, with a warning)
    snapshot = tmp_path / "models--org--tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert hub_id(str(snapshot)) == "org/tiny" and hub_id("org/name") == "org/name"
    assert hub_id(str(tiny_sd_path)) is None and hub_id("not a/valid id") is None
    with caplog.at_level("WARNING", logger="stepdistill"):
        local = ModelCard(model_card(Recipe("lcm_lora", str(tiny_sd_path), "lora", "LCMScheduler"),
                                     "StableDiffusionPipeline"))
    assert local.data.base_model is None and "is a local folder without a hub id" in caplog.text


def test_tensorboard_receives_scalars_grad_norms_and_grids_and_kohya_export_at_the_end(tiny_sd_path, digits_dir,
                                                                                      tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    args = train_args(tiny_sd_path, digits_dir, out, max_train_steps=2, validation_steps=1, report_to="tensorboard",
                      tracker_project_name="tb-test", export="kohya")
    assert run("lcm", args + ["--validation_prompts", "a digit, small", "a seven"]) == 0
    events = EventAccumulator(str(next((out / "tb-test").rglob("events.out.tfevents.*")).parent),
                              size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"loss", "grad_norm_student"} <= set(scalars), scalars
    norms = [e.value for e in events.Scalars("grad_norm_student")]
    assert [e.step for e in events.Scalars("grad_norm_student")] == [1, 2] and all(n > 0 for n in norms)
    logged = [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines()]
    assert [round(n, 4) for n in norms] == [round(r["grad_norm_student"], 4) for r in logged]
    images = events.Images("validation")
    from PIL import Image

    grid = Image.open(out / "samples" / "step-000001.png")
    assert [e.step for e in images] == [1, 2] and (images[0].width, images[0].height) == grid.size
    assert grid.width > 1.8 * grid.height  # two prompts in a row: the comma did not split the first
    card = (out / "README.md").read_text()
    assert "![validation samples](samples/step-000002.png)" in card
    assert (out / "kohya_lora.safetensors").is_file()


def test_output_options_bad_input_before_any_weights_load(tmp_path, capsys):
    """Each one line, exit status 2, naming the option and the fix; the model path does not even exist, so any
    attempt to load weights would fail differently."""
    base = ["--pretrained_model_name_or_path", str(REPO / "assets" / "tiny-digits-sd"), "--train_data_dir",
            "builtin:tiny-digits", "--output_dir", str(tmp_path / "o")]
    cases = {
        "tracker": (["--report_to", "mlflow"], "argument --report_to: invalid choice: 'mlflow'"),
        "hub id": (["--push_to_hub"], "--push_to_hub needs --hub_model_id USER/NAME"),
        "offline push": (["--push_to_hub", "--hub_model_id", "me/model"], "HF_HUB_OFFLINE is set"),
        "export full": (["--use_lora", "false", "--export", "kohya"], "output is full_unet, not a LoRA"),
        "export format": (["--export", "ckpt"], "--export ckpt: expected one of kohya"),
    }
    for name, (extra, message) in cases.items():
        capsys.readouterr()
        assert run("lcm", base + extra) == 2, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, (name, err)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a digit\n")
    agd = [a for a in base if a not in ("--train_data_dir", "builtin:tiny-digits")] + ["--prompts_file", str(prompts)]
    assert run("agd", agd + ["--export", "kohya"]) == 2
    assert "output is agd, not a LoRA" in capsys.readouterr().err


def test_help_shows_every_default_and_prompts_keep_their_commas():
    from stepdistill.config import TrainConfig, parse_config

    proc = subprocess.run([sys.executable, str(REPO / "train_scripts" / "train_lcm.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for option, default in (("--learning_rate", "method default"), ("--train_batch_size", "(default: 16)"),
                            ("--report_to", "(default: unset)"), ("--use_lora", "(default: true)"),
                            ("--validation_prompts", "(default: none)")):
        assert default in text.split(option + " ", 2)[-1][:2000], option
    assert text.count("(default:") >= 60
    config = parse_config(TrainConfig, ["--validation_prompts", "a cat, asleep", "a dog"])
    assert config.validation_prompts == ["a cat, asleep", "a dog"]
    assert parse_config(TrainConfig, ["--validation_prompts", "one, two"]).validation_prompts == ["one, two"]
