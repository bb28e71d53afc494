"""Pipelines of stages (stepdistill/stages.py): a TSCD stage then a DMD2 stage on one LoRA, run by
``stepdistill train --config FILE --output_dir DIR``. The DM stage starts from the TSCD output (its student, right
after loading, holds the TSCD LoRA's tensors), the output is the last stage's (its recipe, byte for byte), a rerun
skips the finished stages, and --init_from_output alone refuses an output of another kind. The bad inputs of a
pipeline (two base models, LoRA then full UNet) are rows of tests/test_bad_input.py."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from stepdistill.cli import main as cli_main
from stepdistill.lora import LORA_WEIGHTS_NAME


def pipeline_file(path, model, data, **dm):
    """tscd (2 steps, segments 4 -> 2) then dmd2 (2 steps, one step at t = 625), rank-4 LoRA, tiny SD."""
    path.write_text(yaml.safe_dump({
        "pretrained_model_name_or_path": str(model), "train_data_dir": str(data), "max_train_samples": 64,
        "train_batch_size": 4, "lora_rank": 4, "checkpointing_steps": 0,
        "stages": [{"name": "tscd", "method": "tscd", "max_train_steps": 2, "segments": [4, 2]},
                   {"name": "dm", "method": "dmd2", "max_train_steps": 2, "conditioning_timestep": 625,
                    "dfake_gen_update_ratio": 1, **dm}]}))
    return path


def peft_state(path):
    return {k.removeprefix("unet."): v for k, v in load_file(str(path / LORA_WEIGHTS_NAME)).items()}


@pytest.fixture(scope="module")
def pipeline(tiny_sd_path, digits_dir, tmp_path_factory):
    """The pipeline run once, with the DM stage's student captured right after it loaded its start."""
    from peft.utils import get_peft_model_state_dict

    import stepdistill.students as students

    root = tmp_path_factory.mktemp("stages")
    config = pipeline_file(root / "pipeline.yaml", tiny_sd_path, digits_dir)
    starts = []
    original = students.load_init_output

    def spy(unet, cfg):
        original(unet, cfg)
        starts.append((cfg.init_from_output, {k: v.detach().clone() for k, v in
                                              get_peft_model_state_dict(unet, adapter_name="default").items()}))

    students.load_init_output = spy
    try:
        assert cli_main(["train", "--config", str(config), "--output_dir", str(root / "out")]) == 0
    finally:
        students.load_init_output = original
    return root / "out", config, starts


def test_the_dm_stage_starts_from_the_tscd_output(pipeline):
    out, _, starts = pipeline
    tscd, dm = out / "stages" / "0-tscd", out / "stages" / "1-dm"
    assert [s[0] for s in starts] == [str(tscd)]  # only the second stage starts from an output
    start, saved = starts[0][1], peft_state(tscd)
    assert set(start) == set(saved) and len(saved) > 0
    for key, value in saved.items():
        assert torch.equal(start[key].float(), value), key
    # the TSCD LoRA trained (its B matrices left zero), and the DM stage trained on from it
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)
    final = peft_state(dm)
    assert any(not torch.equal(final[k], saved[k]) for k in saved)


def test_the_output_is_the_last_stage(pipeline):
    out, config, _ = pipeline
    dm = out / "stages" / "1-dm"
    assert (out / "stepdistill.json").read_bytes() == (dm / "stepdistill.json").read_bytes()
    recipe = json.loads((out / "stepdistill.json").read_text())
    assert recipe["method"] == "dmd2" and recipe["adapter"] == "lora" and recipe["timesteps"] == [625]
    assert (out / LORA_WEIGHTS_NAME).read_bytes() == (dm / LORA_WEIGHTS_NAME).read_bytes()
    assert not list(out.glob("checkpoint-*")) and (out / "README.md").is_file()
    record = json.loads((out / "stages.json").read_text())
    assert record["final"] == str(dm) and record["config"] == str(config)
    assert [(s["name"], s["method"], s["student"], s["finished"]) for s in record["stages"]] == [
        ("tscd", "tscd", "lora", True), ("dm", "dmd2", "lora", True)]
    assert record["stages"][0]["recipe"]["method"] == "tscd" and record["stages"][1]["init_from_output"] == str(
        out / "stages" / "0-tscd")


def test_a_rerun_skips_the_finished_stages(pipeline, monkeypatch):
    out, config, _ = pipeline
    import stepdistill.trainer

    def no_training(*args, **kwargs):
        raise AssertionError("a finished stage trained again")

    monkeypatch.setattr(stepdistill.trainer.Trainer, "__init__", no_training)
    before = {p: p.stat().st_mtime_ns for p in (out / "stages").rglob(LORA_WEIGHTS_NAME)}
    assert cli_main(["train", "--config", str(config), "--output_dir", str(out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "stages").rglob(LORA_WEIGHTS_NAME)} == before
    assert (out / "stepdistill.json").read_bytes() == (out / "stages/1-dm/stepdistill.json").read_bytes()


def test_a_finished_stage_with_other_options_is_refused(pipeline, capsys):
    out, config, _ = pipeline
    assert cli_main(["train", "--config", str(config), "--output_dir", str(out), "--seed", "7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stage 0 (tscd) finished" in err[0] and "with seed 0" in err[0] and "remove" in err[0]


def test_an_interrupted_pipeline_trains_only_what_is_missing(pipeline, tmp_path, monkeypatch):
    """The DM stage's output removed (as if killed in it): the rerun trains it alone, from the TSCD output."""
    import shutil

    out, config, _ = pipeline
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "stages" / "1-dm")
    for name in ("stepdistill.json", LORA_WEIGHTS_NAME):
        (copy / name).unlink()
    import stepdistill.trainer

    trained = []
    real = stepdistill.trainer.Trainer.__init__

    def counting(self, config, method_cls, *args, **kwargs):
        trained.append(method_cls.name)
        real(self, config, method_cls, *args, **kwargs)

    monkeypatch.setattr(stepdistill.trainer.Trainer, "__init__", counting)
    assert cli_main(["train", "--config", str(config), "--output_dir", str(copy)]) == 0
    assert trained == ["dmd2"]
    assert json.loads((copy / "stepdistill.json").read_text())["method"] == "dmd2"


def test_init_from_output_alone_checks_the_student_kind(tiny_sd_path, digits_dir, pipeline, capsys):
    """--init_from_output outside a pipeline: a LoRA output cannot start a full-UNet student (one line, exit 2)."""
    from conftest import train_args

    out, _, _ = pipeline
    argv = train_args(tiny_sd_path, digits_dir, out.parent / "x", use_lora="false",
                      init_from_output=out / "stages" / "0-tscd")
    assert cli_main(["train", "dmd2", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --init_from_output") and "holds a LoRA student (--use_lora true) (tscd)" in err
    assert "this run trains a full-UNet student" in err


def test_a_config_names_its_method(tiny_sd_path, digits_dir, tmp_path, capsys):
    """`stepdistill train --config FILE` runs the method the file names; naming another on the command line, or
    none anywhere, is one line."""
    from conftest import train_args

    named = tmp_path / "tscd.yaml"
    named.write_text("method: tscd\nsegments: [4, 2]\n")
    argv = train_args(tiny_sd_path, digits_dir, tmp_path / "out", max_train_steps=1)
    assert cli_main(["train", "--config", str(named), *argv]) == 0
    assert json.loads((tmp_path / "out" / "stepdistill.json").read_text())["method"] == "tscd"
    assert cli_main(["train", "lcm", "--config", str(named), *argv]) == 2
    assert "names method 'tscd', but this run trains lcm" in capsys.readouterr().err
    bare = tmp_path / "bare.yaml"
    bare.write_text("segments: [4, 2]\n")
    assert cli_main(["train", "--config", str(bare), *argv]) == 2
    assert "names no method: add a line `method: METHOD`" in capsys.readouterr().err
