"""AGD: adapters that are exactly the conditional model at initialisation, one UNet evaluation per step in a stock
pipeline, save -> load identical, a LoRA of the same base beside them, and the errors for bad input."""

import warnings

import pytest
import torch
from conftest import train_args

import stepdistill
from stepdistill.agd.adapters import AGDAdapters, cross_attention_paths, decode_guidance
from stepdistill.errors import StepdistillError
from stepdistill.evaluation.sampler import ForwardMeter
from stepdistill.trainer import run


def _pipe(path, kind="sd"):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe, w, **kwargs):
    return pipe(["a digit", "the number one"], guidance_scale=w, num_inference_steps=3, output_type="pt",
                generator=[torch.Generator().manual_seed(i) for i in range(2)], **kwargs).images


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a digit\nthe number one\na red digit\na small blue number\n")
    return path


def agd_args(model, out, prompts, **overrides):
    overrides = {"hidden_dim": 16, "guidance_range": "1,5", "trajectory_steps": 3, "num_trajectories": 8,
                 "trajectory_batch_size": 4, "trajectory_dir": str(out) + "-trajectories", "max_train_steps": 3,
                 "learning_rate": 1e-2, "lr_scheduler": "constant", **overrides}
    return train_args(model, None, out, prompts_file=prompts, **overrides)


def test_every_cross_attention_is_adapted_and_zero_adapters_are_the_conditional_model(tiny_sd_path):
    pipe = _pipe(tiny_sd_path)
    unet = pipe.unet
    paths = cross_attention_paths(unet)
    # every attn2, the last attention of each up block included (the official list misses those)
    assert paths == [n for n, m in unet.named_modules() if n.endswith("attn2")] and any("up_blocks" in p for p in paths)
    adapters = AGDAdapters(unet, hidden_dim=16)
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([900, 50]), torch.randn(2, 77, 32)
    base = unet(x, t, encoder_hidden_states=text).sample
    assert torch.equal(adapters(x, t, torch.tensor([3.0, 7.0]), encoder_hidden_states=text), base)
    torch.nn.init.normal_(next(iter(adapters.adapters.values())).out_proj.weight)
    assert not torch.equal(adapters(x, t, torch.tensor([3.0, 7.0]), encoder_hidden_states=text), base)


def test_guidance_scale_read_back_from_the_pipelines_embedding(tiny_sd_path):
    pipe = _pipe(tiny_sd_path)
    w = torch.tensor([1.0, 2.5, 7.0, 12.0, 25.0])
    decoded = decode_guidance(pipe.get_guidance_scale_embedding(w - 1, embedding_dim=256))
    assert torch.allclose(decoded, w, atol=1e-4)


def test_trains_loads_into_a_stock_pipeline_one_evaluation_per_step(tiny_sd_path, prompts_file, tmp_path):
    out = tmp_path / "agd"
    assert run("agd", agd_args(tiny_sd_path, out, prompts_file, num_inference_steps=2)) == 0
    recipe = stepdistill.Recipe.load(out)
    assert recipe.adapter == "agd" and recipe.extra["guidance_range"] == [1.0, 5.0]
    assert recipe.num_inference_steps == 2  # trajectories of 3 steps, sampled at the steps asked for
    base = _pipe(tiny_sd_path)
    cfg = {w: _images(base, w) for w in (2.0, 4.0)}
    pipe = stepdistill.load(_pipe(tiny_sd_path), out)
    meter = ForwardMeter(pipe.unet)
    with meter.counting():
        agd = {w: _images(pipe, w) for w in (2.0, 4.0)}
    assert meter.samples == 2 * 2 * 3  # two calls, two images, three steps: one UNet evaluation each
    assert not torch.equal(agd[2.0], agd[4.0])  # the adapters follow w
    # save -> load -> identical images
    again = stepdistill.load(_pipe(tiny_sd_path), out)
    assert torch.equal(_images(again, 4.0), agd[4.0])
    # switched off: the base pipeline (real CFG) bit for bit
    stepdistill.agd.disable(again)
    assert torch.equal(_images(again, 4.0), cfg[4.0])
    with pytest.warns(UserWarning, match=r"outside the range .*\[1, 5\]"):
        _images(pipe, 9.0)


def test_a_lora_of_the_same_base_loads_beside_the_adapters(tiny_sd_path, digits_dir, prompts_file, tmp_path):
    agd_out, lora_out = tmp_path / "agd", tmp_path / "lora"
    assert run("agd", agd_args(tiny_sd_path, agd_out, prompts_file)) == 0
    assert run("lcm", train_args(tiny_sd_path, digits_dir, lora_out, learning_rate=1e-2)) == 0
    agd_only = _images(stepdistill.load(_pipe(tiny_sd_path), agd_out), 3.0)
    pipe = stepdistill.load(_pipe(tiny_sd_path), agd_out)
    pipe.load_lora_weights(lora_out)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no skipped keys
        both = _images(pipe, 3.0)
    assert torch.isfinite(both).all() and (both - agd_only).abs().max() > 1e-4


@pytest.mark.parametrize("kind", ["sd2_v", "sdxl"])
def test_v_prediction_and_sdxl_train_and_load(kind, tiny_sd2_v_path, tiny_sdxl_path, prompts_file, tmp_path):
    path = tiny_sdxl_path if kind == "sdxl" else tiny_sd2_v_path
    out = tmp_path / kind
    extra = {"resolution": 16} if kind == "sdxl" else {}
    assert run("agd", agd_args(path, out, prompts_file, **extra)) == 0
    pipe = stepdistill.load(_pipe(path, "sdxl" if kind == "sdxl" else "sd"), out)
    meter = ForwardMeter(pipe.unet)
    size = {"height": 16, "width": 16} if kind == "sdxl" else {}
    with meter.counting():
        images = _images(pipe, 3.0, **size)
    assert meter.samples == 2 * 3 and torch.isfinite(images).all()


def test_adapters_of_another_architecture_are_refused(tiny_sd_path, tiny_sdxl_path, prompts_file, tmp_path):
    out = tmp_path / "agd"
    assert run("agd", agd_args(tiny_sd_path, out, prompts_file)) == 0
    with pytest.raises(StepdistillError, match=f"trained for {tiny_sd_path} do not fit the UNet of {tiny_sdxl_path}"):
        stepdistill.load(_pipe(tiny_sdxl_path, "sdxl"), out)


def test_trajectories_of_another_base_model_are_refused(tiny_sd_path, tiny_sd2_v_path, prompts_file, tmp_path,
                                                        capsys):
    shared = tmp_path / "trajectories"
    assert run("agd", agd_args(tiny_sd_path, tmp_path / "a", prompts_file, trajectory_dir=shared)) == 0
    assert run("agd", agd_args(tiny_sd2_v_path, tmp_path / "b", prompts_file, trajectory_dir=shared)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and str(tiny_sd_path) in err[0] and str(tiny_sd2_v_path) in err[0], err


@pytest.mark.parametrize("argv, message", [
    (["--guidance_range", "0.5,4"], "1 <= lo <= hi"),
    (["--guidance_range", "5,2"], "1 <= lo <= hi"),
    (["--hidden_dim", "15"], "must be even"),
    (["--prompts_file", ""], "--prompts_file"),
])
def test_bad_input_is_one_line(argv, message, tiny_sd_path, prompts_file, tmp_path, capsys):
    assert run("agd", agd_args(tiny_sd_path, tmp_path / "out", prompts_file) + argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and message in err[0], err


def test_two_processes_equal_one_with_the_doubled_batch(tiny_sd_path, prompts_file, tmp_path):
    """torchrun --nproc_per_node 2 (MULTI_CPU): rank 0 makes the trajectories, both draw their slice of the global
    batch of states; the losses and the adapters equal a single process with the doubled batch."""
    import os
    import subprocess
    import sys

    from conftest import REPO, read_logs
    from safetensors.torch import load_file

    shared = dict(trajectory_dir=str(tmp_path / "trajectories"), max_train_steps=3)
    assert run("agd", agd_args(tiny_sd_path, tmp_path / "one", prompts_file, train_batch_size=8, **shared)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29563",
           str(REPO / "train_scripts/train_agd.py"),
           *agd_args(tiny_sd_path, tmp_path / "two", prompts_file, train_batch_size=4, **shared)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["loss"] for r in read_logs(tmp_path / "one")] == pytest.approx(
        [r["loss"] for r in read_logs(tmp_path / "two")], rel=1e-5)
    one, two = (load_file(str(tmp_path / d / "agd_adapters.safetensors")) for d in ("one", "two"))
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-4  # all-reduce rounding, lr 1e-2
