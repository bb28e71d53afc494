"""Loading refuses pickle weights (they can run code) everywhere a model is read, unless --allow_pickle."""

import shutil

import pytest
import torch
from conftest import train_args

import stepdistill
from stepdistill.api import main as run
from stepdistill.cli import main as cli
from stepdistill.errors import StepdistillError
from stepdistill.recipe import Recipe


@pytest.fixture(scope="module")
def pickle_sd(tiny_sd_path, tmp_path_factory):
    """The tiny SD pipeline with its UNet and VAE saved as pickles (.bin; transformers 5 writes the text encoder as
    safetensors whatever it is asked)."""
    from diffusers import StableDiffusionPipeline

    out = tmp_path_factory.mktemp("pickle") / "pipeline"
    StableDiffusionPipeline.from_pretrained(tiny_sd_path).save_pretrained(out, safe_serialization=False)
    assert (out / "unet" / "diffusion_pytorch_model.bin").is_file()
    assert not list((out / "unet").glob("*.safetensors"))
    return out


def test_training_refuses_a_pickle_base_model_before_loading_and_allow_pickle_trains(pickle_sd, digits_dir, tmp_path,
                                                                                    capsys):
    assert run("lcm", train_args(pickle_sd, digits_dir, tmp_path / "a", max_train_steps=1)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a pickle file, which can run code when loaded" in err
    assert "--allow_pickle" in err and "safe_serialization=True" in err
    assert not (tmp_path / "a" / "logs.jsonl").exists()
    assert run("lcm", train_args(pickle_sd, digits_dir, tmp_path / "b", max_train_steps=1) + ["--allow_pickle"]) == 0
    assert Recipe.load(tmp_path / "b").adapter == "lora"


def test_evaluation_and_loading_refuse_pickles(pickle_sd, tiny_sd_path, toy_path, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    assert cli(["eval", "--pretrained_model_name_or_path", str(pickle_sd), "--num_images", "2", "--metrics",
                "digits", "--digits_classifier", str(toy_path), "--output_dir", str(tmp_path / "e")]) == 2
    assert "is a pickle file" in capsys.readouterr().err

    # a full-UNet output whose unet/ is a pickle is not ours: stepdistill.load does not unpickle it
    out = tmp_path / "full"
    shutil.copytree(pickle_sd / "unet", out / "unet")
    Recipe("dmd2", str(tiny_sd_path), "full_unet", "LCMScheduler", {}, 1).save(out)
    with pytest.raises(OSError):
        stepdistill.load(StableDiffusionPipeline.from_pretrained(tiny_sd_path), out)

    from stepdistill.safe_weights import check_no_pickle

    with pytest.raises(StepdistillError, match="--student_init .*unet: .*is a pickle file"):
        check_no_pickle(pickle_sd / "unet", False, "--student_init")
    check_no_pickle(pickle_sd / "unet", True, "--student_init")  # allowed


def test_nothing_trusts_remote_code():
    from pathlib import Path

    root = Path(stepdistill.__file__).parent
    offenders = [p for p in root.rglob("*.py") if "trust_remote_code=True" in p.read_text()]
    assert offenders == []
    assert torch  # the suite's torch import (keeps linters quiet)
