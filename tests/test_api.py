"""Training from Python (``stepdistill.train``) and ``stepdistill train METHOD``: the same parsing, checks, errors
and output as ``train_scripts/train_<method>.py``."""

import pytest
from conftest import read_logs

import stepdistill
from stepdistill.api import main as script_main
from stepdistill.cli import main as cli
from stepdistill.errors import StepdistillError
from stepdistill.recipe import RECIPE_NAME, Recipe


@pytest.fixture
def tiny_config(tiny_sd_path, digits_dir, tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(f"pretrained_model_name_or_path: {tiny_sd_path}\ntrain_data_dir: {digits_dir}\n"
                    "max_train_steps: 4\ntrain_batch_size: 4\nlora_rank: 4\ncheckpointing_steps: 0\n"
                    "max_train_samples: 16\n")
    return path


def test_train_returns_the_output_directory(tiny_config, tmp_path):
    out = stepdistill.train("tscd", config=tiny_config, output_dir=tmp_path / "run", max_train_steps=2,
                            segments=[2, 1], validation_prompts=["a digit, small", "a cat"], resolution=None)
    assert out == tmp_path / "run" and (out / RECIPE_NAME).is_file()
    assert [r["step"] for r in read_logs(out)] == [1, 2]  # the option overrides the YAML's 4
    assert Recipe.load(out).extra["trained_segments"] == [2, 1]


@pytest.mark.parametrize("options, flag", [
    ({"segments": "8,3"}, ["--segments", "8,3"]),
    ({"max_train_steps": "many"}, ["--max_train_steps", "many"]),
    ({"no_such_option": 1}, ["--no_such_option", "1"]),
])
def test_a_bad_option_is_the_error_the_command_line_prints(options, flag, tiny_config, tmp_path, capsys):
    with pytest.raises(StepdistillError) as e:
        stepdistill.train("tscd", config=tiny_config, output_dir=tmp_path / "a", **options)
    assert script_main("tscd", ["--config", str(tiny_config), "--output_dir", str(tmp_path / "b"), *flag]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {e.value}"
    assert not (tmp_path / "a" / "logs.jsonl").exists()


def test_unknown_method_from_python():
    with pytest.raises(StepdistillError, match="unknown method 'nosuch'; expected one of lcm, tscd, dmd2, sid"):
        stepdistill.train("nosuch")


def test_train_subcommand_trains_like_the_script(tiny_config, tmp_path):
    assert cli(["train", "lcm", "--config", str(tiny_config), "--output_dir", str(tmp_path / "o"),
                "--max_train_steps", "1"]) == 0
    assert Recipe.load(tmp_path / "o").method == "lcm_lora"


def test_train_subcommand_help_lists_the_methods_options(capsys):
    with pytest.raises(SystemExit) as e:
        cli(["train", "lcm", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: stepdistill train lcm")
    assert "--guidance_scale_min" in out and "--timestep_scaling_factor" in out and "--segments" not in out
    assert cli(["train", "--help"]) == 0
    assert "lcm, tscd, dmd2, sid" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["train", "nosuch"], "error: unknown method 'nosuch'; expected one of lcm, tscd, dmd2, sid"),
    (["train"], "error: name a method first"),
    (["train", "--max_train_steps", "3"], "error: name a method first"),
    (["train", "lcm", "--learnin_rate", "1"], "error: unrecognized arguments: --learnin_rate 1 (see --help)"),
])
def test_train_subcommand_errors_are_one_line_and_exit_2(argv, message, capsys):
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message), err
