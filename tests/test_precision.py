"""Precision and memory (issue 13): under mixed precision the frozen networks are held in bf16 and every trainable
parameter stays float32 (LoRA on a shared bf16 base, full students and the fake score as float32 copies); the
precision Accelerate was launched with is the default and an explicit flag wins; SDXL's VAE stays float32 unless an
fp16-safe VAE is given; --variant / --cache_dir reach the hub-id path; --use_8bit_adam picks bitsandbytes; each bad
precision input is one line naming the option, before any weights load."""

import sys
import types

import pytest
import torch
from conftest import lora_before_after, read_logs, train_args
from safetensors.torch import load_file

from stepdistill.api import main as run
from stepdistill.config import parse_config
from stepdistill.methods import get_method
from stepdistill.teacher import Teacher
from stepdistill.testing import hub_cache_snapshot
from stepdistill.trainer import Trainer

BF16 = torch.bfloat16


def trainer(method, argv):
    cls = get_method(method)
    return Trainer(parse_config(cls.config_class, argv), cls)


def dtypes(module, trainable):
    return {p.dtype for p in module.parameters() if p.requires_grad == trainable}


@pytest.mark.parametrize("method,options", [
    ("lcm", {}),
    ("lcm", {"use_lora": "false"}),
    ("dmd2", {"use_lora": "false", "gan": "true", "generator_ema_decay": 0.9}),
    ("dmd2", {"use_lora": "true", "gan": "true"}),
], ids=["lcm-lora", "lcm-full", "dmd2-full", "dmd2-lora"])
def test_bf16_holds_frozen_networks_in_bf16_and_trainable_ones_in_float32(tiny_sd_path, digits_dir, tmp_path,
                                                                            method, options):
    t = trainer(method, train_args(tiny_sd_path, digits_dir, tmp_path, mixed_precision="bf16", **options))
    teacher, networks = t.teacher, t.method.networks
    assert t.accelerator.mixed_precision == "bf16" and teacher.weight_dtype == BF16
    for frozen in (teacher.unet, teacher.vae, teacher.pipe.text_encoder):
        assert dtypes(frozen, trainable=False) == {BF16}
    for name, net in networks.items():
        assert dtypes(net, trainable=True) == {torch.float32}, name
        assert {p.dtype for p in t.params[name]} == {torch.float32}  # what the optimiser steps
    for ema in t.method.ema_copies().values():  # the consistency target, the generator EMA
        assert {p.dtype for p in ema.parameters()} == {torch.float32}
    student = networks[t.method.student_name]
    if options.get("use_lora", "true") == "true":  # the LoRA shares the frozen bf16 base: no second UNet
        assert student is teacher.unet and dtypes(student, trainable=False) == {BF16}
    else:
        assert student is not teacher.unet
    if "fake_score" in networks:
        assert networks["fake_score"].unet is not teacher.unet and networks["fake_score"].head is not None


def test_the_accelerate_launch_precision_is_the_default_and_an_explicit_flag_wins(monkeypatch, tiny_sd_path,
                                                                                 digits_dir, tmp_path):
    cls = get_method("lcm")
    assert parse_config(cls.config_class, train_args(tiny_sd_path, digits_dir, tmp_path)).mixed_precision is None
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    t = trainer("lcm", train_args(tiny_sd_path, digits_dir, tmp_path / "a"))  # nothing set anywhere: float32
    assert t.accelerator.mixed_precision == "no" and dtypes(t.teacher.unet, trainable=False) == {torch.float32}
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision bf16` sets
    t = trainer("lcm", train_args(tiny_sd_path, digits_dir, tmp_path / "b"))
    assert t.accelerator.mixed_precision == "bf16" and dtypes(t.teacher.unet, trainable=False) == {BF16}
    t = trainer("lcm", train_args(tiny_sd_path, digits_dir, tmp_path / "c", mixed_precision="no"))
    assert t.accelerator.mixed_precision == "no" and dtypes(t.teacher.unet, trainable=False) == {torch.float32}


def test_bf16_training_runs_and_changes_the_output(tiny_sd_path, tiny_sdxl_path, digits_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "lcm"
    assert run("lcm", train_args(tiny_sd_path, digits_dir, out, mixed_precision="bf16", max_train_steps=3,
                                 learning_rate=1e-2)) == 0
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in read_logs(out))
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    assert {v.dtype for v in lora.values()} == {torch.float32}
    before, after = lora_before_after(StableDiffusionPipeline, tiny_sd_path, out)
    assert (before - after).abs().max() > 1e-3  # the stock pipeline's images change with the LoRA
    # SDXL, a full generator and the GAN (real images through SDXL's float32 VAE beside the bf16 UNet)
    out = tmp_path / "dmd2"
    assert run("dmd2", train_args(tiny_sdxl_path, digits_dir, out, mixed_precision="bf16", use_lora="false",
                                  gan="true", max_train_steps=2, learning_rate=1e-3)) == 0
    trained = load_file(next((out / "unet").glob("*.safetensors")))
    base = load_file(next((tiny_sdxl_path / "unet").glob("*.safetensors")))
    assert {v.dtype for v in trained.values()} == {torch.float32}
    assert any((trained[k] - base[k]).abs().max() > 0 for k in base)


def test_sdxl_vae_stays_float32_unless_an_fp16_safe_vae_is_given(tiny_sdxl_path, digits_dir, tmp_path):
    from diffusers import AutoencoderKL

    t = trainer("lcm", train_args(tiny_sdxl_path, digits_dir, tmp_path / "a", mixed_precision="bf16"))
    assert t.teacher.weight_dtype == BF16 and t.teacher.vae.dtype == torch.float32  # stock: force_upcast true
    mean, _ = t.teacher.latent_dist(torch.zeros(1, 3, 16, 16))
    assert mean.dtype == torch.float32
    fix = AutoencoderKL.from_pretrained(tiny_sdxl_path / "vae")
    fix.register_to_config(force_upcast=False)  # as madebyollin/sdxl-vae-fp16-fix says
    with torch.no_grad():
        fix.decoder.conv_out.bias.fill_(0.25)
    fix.save_pretrained(tmp_path / "fix-vae")
    t = trainer("lcm", train_args(tiny_sdxl_path, digits_dir, tmp_path / "b", mixed_precision="bf16",
                                  pretrained_vae_model_name_or_path=tmp_path / "fix-vae"))
    assert t.teacher.vae.dtype == BF16 and bool((t.teacher.vae.decoder.conv_out.bias == 0.25).all())


def test_variant_and_cache_dir_reach_the_hub_id_path(tiny_sd_path, digits_dir, tmp_path):
    from diffusers import DiffusionPipeline

    half = tmp_path / "fp16"
    DiffusionPipeline.from_pretrained(tiny_sd_path).save_pretrained(half, variant="fp16")
    assert list((half / "unet").glob("*.fp16.safetensors"))
    t = trainer("lcm", train_args(half, digits_dir, tmp_path / "a", variant="fp16"))
    assert t.teacher.weight_dtype == torch.float32  # the variant is what is read, not the dtype it is held in
    cache = tmp_path / "cache"  # not the default hub cache: only --cache_dir finds these
    hub_cache_snapshot(half, cache, "org/tiny-fp16")
    t = trainer("lcm", train_args("org/tiny-fp16", digits_dir, tmp_path / "b", variant="fp16", cache_dir=cache))
    assert t.teacher.kind == "sd"


def test_8bit_adam_uses_bitsandbytes(monkeypatch, tiny_sd_path, digits_dir, tmp_path):
    fake = types.ModuleType("bitsandbytes")
    fake.optim = types.SimpleNamespace(AdamW8bit=type("AdamW8bit", (torch.optim.AdamW,), {}))
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        t = trainer("lcm", train_args(tiny_sd_path, digits_dir, tmp_path, use_8bit_adam="true", allow_tf32="true"))
        assert torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    assert type(t.optimizers["student"].optimizer).__name__ == "AdamW8bit"


@pytest.fixture
def no_weights(monkeypatch):
    """Any weight loading fails the test: every bad input must be caught before."""
    monkeypatch.setattr(Teacher, "from_pretrained", lambda *a, **k: pytest.fail("weights were loaded"))


def _vae(tmp_path, **changes):
    import json

    from conftest import REPO

    config = json.loads((REPO / "assets" / "tiny-digits-sd" / "vae" / "config.json").read_text())
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({**config, **changes}))
    return tmp_path / "vae"


@pytest.mark.parametrize("case", ["fp16_cpu", "fp16_env", "8bit", "vae_channels", "vae_scaling", "vae_missing",
                                  "variant_local", "variant_hub"])
def test_bad_precision_input_is_one_line_before_any_weights_load(case, no_weights, monkeypatch, capsys,
                                                                 tiny_sd_path, toy_path, digits_dir, tmp_path):
    import stepdistill.precision

    monkeypatch.setattr(stepdistill.precision, "has_accelerator", lambda: False)  # a CPU-only machine
    model, options, expect = toy_path, {}, ()
    if case == "fp16_cpu":
        options, expect = {"mixed_precision": "fp16"}, ("--mixed_precision fp16", "bf16 or no")
    elif case == "fp16_env":
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
        expect = ("ACCELERATE_MIXED_PRECISION=fp16", "--mixed_precision bf16 or no")
    elif case == "8bit":
        monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes raises ImportError
        options, expect = {"use_8bit_adam": "true"}, ("--use_8bit_adam", "pip install")
    elif case == "vae_channels":
        options = {"pretrained_vae_model_name_or_path": _vae(tmp_path, latent_channels=16)}
        expect = ("--pretrained_vae_model_name_or_path", "latent_channels is 16")
    elif case == "vae_scaling":
        options = {"pretrained_vae_model_name_or_path": _vae(tmp_path, scaling_factor=0.13025)}
        expect = ("--pretrained_vae_model_name_or_path", "scaling_factor is 0.13025")
    elif case == "vae_missing":
        options, expect = {"pretrained_vae_model_name_or_path": tmp_path / "nowhere"}, ("no config.json",)
    elif case == "variant_local":
        options, expect = {"variant": "fp16"}, ("--variant fp16", "no fp16 weights")
    elif case == "variant_hub":  # offline: the cached snapshot decides
        hub_cache_snapshot(tiny_sd_path, tmp_path / "cache", "org/tiny")
        model, options = "org/tiny", {"variant": "fp16", "cache_dir": tmp_path / "cache"}
        expect = ("--variant fp16", "in the local hub cache")
    assert run("lcm", train_args(model, digits_dir, tmp_path / "out", **options)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and all(e in err[0] for e in expect), err


def test_real_configs_build_the_published_networks_and_the_builder_reads_configs(tiny_sd_path, tiny_sdxl_path,
                                                                                tmp_path):
    """assets/real_configs are the public SD 1.5 / SDXL configs (their networks have the published parameter
    counts); build_pipeline_from_configs builds a loadable pipeline from a configs folder (here tiny ones)."""
    import json

    from accelerate import init_empty_weights
    from conftest import REPO
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from stepdistill.testing import build_pipeline_from_configs

    published = {"sd15": (859_520_964, 83_653_863), "sdxl": (2_567_463_684, 83_653_863)}
    for model, counts in published.items():
        def config(sub):
            path = REPO / "assets" / "real_configs" / model / sub / "config.json"
            return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}

        with init_empty_weights():
            nets = UNet2DConditionModel.from_config(config("unet")), AutoencoderKL.from_config(config("vae"))
        assert tuple(sum(p.numel() for p in n.parameters()) for n in nets) == counts
    for source, kind in ((tiny_sd_path, "sd"), (tiny_sdxl_path, "sdxl")):
        for text_encoder in ("tiny", "real"):
            built = build_pipeline_from_configs(tmp_path / f"{kind}-{text_encoder}", source, text_encoder=text_encoder)
            teacher = Teacher.from_pretrained(built)
            assert teacher.kind == kind
            assert json.loads((built / "unet" / "config.json").read_text())["block_out_channels"] == \
                json.loads((source / "unet" / "config.json").read_text())["block_out_channels"]
