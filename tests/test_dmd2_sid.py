"""DMD2 and SiD: the generator losses on fixed tensors, the two time-scale schedule, backward simulation's fresh
noise, the depth shared by all processes, the GAN head, outputs that load into stock pipelines, and bad input
caught before training."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, dm_args, lora_before_after, read_logs
from conftest import build_method as _method

import stepdistill
from stepdistill.config import parse_config
from stepdistill.methods.distribution_matching import DistributionMatching
from stepdistill.methods.losses import (DenoisingLoss, DMDLoss, ScorePair, gan_discriminator_loss,
                                        gan_generator_loss, sid_loss)
from stepdistill.methods.networks import FakeScore, GANHead
from stepdistill.methods.dmd2 import DMD2
from stepdistill.methods.sid import SiD, SiDConfig, sid_timesteps
from stepdistill.randomness import StepRandom
from stepdistill.recipe import Recipe
from stepdistill.teacher import Teacher
from stepdistill.trainer import run





# ------------------------------------------------------------------------------------------ losses, fixed tensors
def test_dmd_gradient_is_the_normalised_score_difference_per_sample():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g).requires_grad_(True)
    p_real, p_fake = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    p_real[1] *= 10  # a sample far from the teacher gets a smaller step
    t = torch.zeros(3, dtype=torch.long)
    loss, _ = DMDLoss()(ScorePair(x, x, t, x, p_real, p_fake))
    loss.backward()
    expected = (p_fake - p_real) / (x.detach() - p_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(x.grad * x.numel(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_sid_loss_is_its_formula(alpha):
    g = torch.Generator().manual_seed(1)
    x, y_real, y_fake = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    x.requires_grad_(True)
    loss, dropped = sid_loss(x, y_real, y_fake, alpha)
    omega = (x.detach() - y_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    expected = ((y_real - y_fake) * ((y_real - x.detach()) - alpha * (y_real - y_fake)) / omega).sum() / 3
    assert dropped == 0 and torch.allclose(loss, expected, rtol=1e-5)
    if alpha == 1.0:  # the official loop's α = 1 form
        assert torch.allclose(loss, ((y_real - y_fake) * (y_fake - x.detach()) / omega).sum() / 3, rtol=1e-5)
    loss.backward()  # ω is a constant: d/dx = -(y_r - y_f) / ω / batch
    assert torch.allclose(x.grad, -(y_real - y_fake) / omega / 3, rtol=1e-5, atol=1e-7)


def test_sid_loss_drops_nan_samples():
    x, y_real, y_fake = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    y_real[1, 0, 0, 0] = float("nan")
    loss, dropped = sid_loss(x, y_real, y_fake, 1.0)
    keep = [0, 2]
    alone, _ = sid_loss(x[keep], y_real[keep], y_fake[keep], 1.0)
    assert dropped == 1 and torch.isfinite(loss) and torch.allclose(loss, alone * 2 / 3)


# ------------------------------------------------------------------------------------------ randomness
def test_simulated_depth_is_the_same_on_every_process():
    depths = []
    for it in range(40):
        per_rank = [StepRandom(0, it, rank, 2).stream("sample").shared_randint(0, 4) for rank in (0, 1)]
        assert per_rank[0] == per_rank[1]
        depths.append(per_rank[0])
        noise = [StepRandom(0, it, rank, 2).stream("sample").randn(2, 4) for rank in (0, 1)]
        assert not torch.allclose(noise[0], noise[1])  # per-sample draws stay per sample
    assert set(depths) == {0, 1, 2, 3}


def test_backward_simulation_renoises_with_fresh_noise(tiny_sd_path, prompts_file, tmp_path):
    method = _method(DMD2, dm_args(tiny_sd_path, tmp_path, prompts=prompts_file, use_lora="false",
                                   denoising_timesteps="999,749,499,249"))
    teacher, calls = method.teacher, []

    class Spy(torch.nn.Module):  # predicts ε = x / s_t, i.e. x0 = 0: its next input is s_next · (the new noise)
        def forward(self, x, t, **kwargs):
            calls.append((x.clone(), int(t[0])))
            return (x / teacher.alpha_sigma(t, x)[1],)

    method.networks["generator"] = Spy()
    cond = method.conditioning(["a digit"] * 2)
    x0, depth = method.generate(cond, StepRandom(0, 5).stream("sample"), depth=3)
    assert depth == 3 and [t for _, t in calls] == [999, 749, 499, 249]
    assert torch.allclose(x0, torch.zeros_like(x0), atol=1e-5)
    noises = [x / teacher.alpha_sigma(torch.tensor([t]), x)[1] if i else x for i, (x, t) in enumerate(calls)]
    for i in range(4):
        assert abs(float(noises[i].std()) - 1) < 0.2
        for j in range(i):
            corr = torch.corrcoef(torch.stack([noises[i].flatten(), noises[j].flatten()]))[0, 1]
            assert abs(float(corr)) < 0.2, (i, j, corr)


@pytest.mark.parametrize("method, data, draws_per_iteration", [(DMD2, True, 1), (SiD, False, 2)])
def test_dmd2_fake_score_trains_on_the_generators_sample_sid_draws_anew(method, data, draws_per_iteration,
                                                                         tiny_sd_path, digits_dir, prompts_file,
                                                                         tmp_path, monkeypatch):
    """DMD2's generator hands its sample to the fake score's turn (one draw per iteration); SiD's two turns each
    draw their own, from different noise."""
    draws = []
    generate = DistributionMatching.generate

    def spy(self, cond, rng, trained=None, depth=None):
        x0, d = generate(self, cond, rng, trained, depth)
        draws.append(x0.detach().clone())
        return x0, d

    monkeypatch.setattr(DistributionMatching, "generate", spy)
    argv = dm_args(tiny_sd_path, tmp_path / "out", digits_dir if data else None,
                   prompts=None if data else prompts_file, max_train_steps=2, dfake_gen_update_ratio=1)
    assert run(method, argv) == 0
    assert len(draws) == 2 * draws_per_iteration
    if draws_per_iteration == 2:
        assert not torch.allclose(draws[0], draws[1])


def test_the_family_losses_by_hand():
    """The denoising loss's two reductions (NaN samples dropped) and the GAN's softplus losses."""
    eps, noise = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    eps[1, 0, 0, 0] = float("nan")
    assert DenoisingLoss("mean")(eps, noise).item() == 1.0  # the NaN sample is dropped, the rest averaged
    assert DenoisingLoss("sum")(eps, noise).item() == 4 / 2  # Σ over C·H·W of the kept sample / whole batch
    real, fake = torch.tensor([2.0, 0.0]), torch.tensor([-1.0, 1.0])
    softplus = lambda v: torch.log1p(torch.exp(v))  # noqa: E731
    assert torch.allclose(gan_discriminator_loss(real, fake), softplus(fake).mean() + softplus(-real).mean())
    assert torch.allclose(gan_generator_loss(fake), softplus(-fake).mean())


# ------------------------------------------------------------------------------------------ GAN head
@pytest.mark.parametrize("size, stride2", [(2, 0), (4, 0), (8, 1), (32, 3)])
def test_gan_head_keeps_dmd2s_structure_where_the_map_allows(size, stride2):
    head = GANHead(64, size)
    convs = [m for m in head if isinstance(m, torch.nn.Conv2d)]
    assert sum(c.kernel_size == (4, 4) and c.stride == (2, 2) for c in convs) == stride2
    assert convs[-2].kernel_size == (min(size, 4),) * 2 and convs[-1].out_channels == 1
    assert head(torch.randn(3, 64, size, size)).shape == (3,)


def test_fake_score_classifies_from_the_mid_block_without_the_up_blocks(tiny_sd_path):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    head = GANHead(unet.config.block_out_channels[-1], 4)
    fake = FakeScore(unet, head)
    ups = []
    unet.up_blocks[0].register_forward_hook(lambda *a: ups.append(1))
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 77, 32)
    logits = fake(x, t, encoder_hidden_states=text, classify=True)
    assert logits.shape == (2,) and not ups and logits[0] != logits[1]
    assert fake(x, t, encoder_hidden_states=text, return_dict=False)[0].shape == x.shape and ups


# ------------------------------------------------------------------------------------------ schedule, end to end
def test_generator_updates_every_ratio_th_iteration_and_gan_starts_late(tiny_sd_path, digits_dir, tmp_path):
    out = tmp_path / "run"
    assert run(DMD2, dm_args(tiny_sd_path, out, digits_dir, max_train_steps=7, dfake_gen_update_ratio=3, gan="true",
                             gan_start_step=2, denoising_timesteps="999,499")) == 0
    logs = read_logs(out)
    assert [r["step"] for r in logs if "lr_generator" in r] == [1, 4, 7]
    assert [r["step"] for r in logs if "loss_dm" in r] == [1, 4, 7]
    assert all("lr_fake_score" in r and "loss_fake" in r for r in logs)
    assert [r["step"] for r in logs if "loss_gan_disc" in r] == [3, 4, 5, 6, 7]
    assert [r["step"] for r in logs if "loss_gan_gen" in r] == [4, 7]
    assert {r["depth"] for r in logs if "depth" in r} <= {0.0, 1.0}


def test_a_gan_stage_starts_from_the_dm_stages_weights_with_fresh_optimizers(tiny_sd_path, digits_dir, prompts_file,
                                                                             tmp_path, capsys):
    """DMD2 SD 1.5's recipe: a DM stage, then a GAN stage from its weights at a lower learning rate (official
    ckpt_only_path): --init_from_checkpoint loads the generator and fake score, the new GAN head starts fresh, the
    optimizers take the new learning rate and the iteration count starts at 0."""
    from stepdistill.checkpoint import load_checkpoint_weights
    from stepdistill.lora import trainable_state_dict
    from stepdistill.trainer import Trainer

    stage1 = tmp_path / "dm"
    assert run(DMD2, dm_args(tiny_sd_path, stage1, digits_dir, use_lora="false", checkpointing_steps=2,
                             dfake_gen_update_ratio=1)) == 0
    ckpt = stage1 / "checkpoint-2"
    saved = load_checkpoint_weights(ckpt)
    argv = dm_args(tiny_sd_path, tmp_path / "gan", digits_dir, use_lora="false", gan="true", learning_rate=5e-7,
                   fake_score_learning_rate=5e-7) + ["--init_from_checkpoint", str(ckpt)]
    trainer = Trainer(parse_config(DMD2.config_class, argv), DMD2)
    nets = trainer.method.networks
    for name in ("generator", "fake_score"):
        own = trainable_state_dict(nets[name])
        assert all(torch.equal(own[k], v) for k, v in saved[name].items())
    head = [k for k in trainable_state_dict(nets["fake_score"]) if k not in saved["fake_score"]]
    assert head and all(k.startswith("head.") for k in head)  # only the new GAN head is fresh
    assert trainer.step == 0
    assert {g["lr"] for o in trainer.optimizers.values() for g in o.param_groups} == {5e-7}
    assert all(not o.state for o in trainer.optimizers.values())  # no Adam moments carried over

    # a checkpoint of another method, or of another shape, is a one-line error before training
    for extra, message in ((["--init_from_checkpoint", str(tmp_path)], "not a stepdistill checkpoint"),
                           (["--init_from_checkpoint", str(ckpt), "--use_lora", "true"], "do not fit this run")):
        argv = dm_args(tiny_sd_path, tmp_path / "bad", digits_dir) + extra
        assert run(DMD2, argv) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(err) == 1 and message in err[0], err
    assert run(SiD, dm_args(tiny_sd_path, tmp_path / "bad", prompts=prompts_file) + ["--init_from_checkpoint",
                                                                                  str(ckpt)]) == 2
    assert "written by method 'dmd2', not 'sid'" in capsys.readouterr().err


def test_sid_updates_both_networks_every_iteration_unless_given_a_ratio(tiny_sd_path, prompts_file, tmp_path):
    for ratio, expected in ((1, [1, 2, 3, 4, 5]), (2, [1, 3, 5])):
        out = tmp_path / f"ratio{ratio}"
        assert run(SiD, dm_args(tiny_sd_path, out, prompts=prompts_file, max_train_steps=5,
                                dfake_gen_update_ratio=ratio)) == 0
        logs = read_logs(out)
        assert [r["step"] for r in logs if "loss_sid" in r] == expected
        assert all("loss_fake" in r for r in logs) and len(logs) == 5


def _stock_pipeline(path, out):
    from diffusers import StableDiffusionPipeline

    return stepdistill.load(StableDiffusionPipeline.from_pretrained(path), out)


@pytest.mark.parametrize("method, extra, timesteps", [
    (DMD2, {}, [999]),
    (SiD, {"init_noise": "unit"}, [625]),
])
def test_one_step_full_generator_is_reproduced_by_the_stock_pipeline(method, extra, timesteps, tiny_sd_path,
                                                                     prompts_file, tmp_path):
    """The recipe (LCMScheduler at the training timestep, unit noise) gives exactly the generator's x0."""
    out = tmp_path / method.name
    assert run(method, dm_args(tiny_sd_path, out, prompts=prompts_file, use_lora="false", learning_rate=1e-3,
                               **extra)) == 0
    recipe = Recipe.load(out)
    assert recipe.adapter == "full_unet" and recipe.scheduler == "LCMScheduler" and recipe.timesteps == timesteps
    pipe = _stock_pipeline(tiny_sd_path, out)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    latents = pipe(["a digit"] * 2, latents=z.clone(), output_type="latent", **recipe.call_kwargs()).images
    teacher = Teacher(pipe)
    t = torch.full((2,), timesteps[0])
    cond = teacher.encode_prompt(["a digit"] * 2)
    with torch.no_grad():
        x0 = teacher.to_x0(teacher.predict(z, t, cond), z, t)
    assert torch.allclose(latents, x0, atol=1e-4)


def test_multistep_dmd2_lora_with_gan_loads_and_changes_output(tiny_sd_path, digits_dir, tmp_path):
    out = tmp_path / "dmd2"
    assert run(DMD2, dm_args(tiny_sd_path, out, digits_dir, gan="true", dfake_gen_update_ratio=1,
                             denoising_timesteps="999,749,499,249", learning_rate=1e-2)) == 0
    recipe = Recipe.load(out)
    assert recipe.timesteps == [999, 749, 499, 249] and recipe.adapter == "lora"
    assert (out / "checkpoint-2" / "fake_score.safetensors").is_file()
    from diffusers import StableDiffusionPipeline

    before, after = lora_before_after(StableDiffusionPipeline, tiny_sd_path, out)
    assert (after - before).abs().max() > 1e-3


@pytest.mark.parametrize("extra", [
    {"guidance_preset": "zero_cfg", "num_steps": 4},
    {"guidance_preset": "anti_cfg", "num_steps": 2, "use_lora": "false", "generator_ema_decay": 0.9},
    {"guidance_scale": 2.0, "init_timestep": 999, "num_steps": 2, "gan": "true"},
])
def test_sid_variants_train(extra, tiny_sd_path, digits_dir, prompts_file, tmp_path):
    out = tmp_path / "sid"
    data = digits_dir if extra.get("gan") else None  # real images only for the GAN; prompts from the file
    assert run(SiD, dm_args(tiny_sd_path, out, data, prompts=prompts_file, max_train_steps=3, learning_rate=1e-3,
                            **extra)) == 0
    logs = read_logs(out)
    assert all(torch.isfinite(torch.tensor([r["loss_sid"], r["loss_fake"]])).all() for r in logs)
    assert all("lr_generator" in r and "lr_fake_score" in r for r in logs)
    recipe = Recipe.load(out)
    assert recipe.timesteps == sid_timesteps(extra.get("init_timestep", 625), extra["num_steps"])
    if "gan" in extra:
        assert all("loss_gan_disc" in r and "loss_gan_gen" in r for r in logs)
    if "generator_ema_decay" in extra:
        assert (out / "checkpoint-3" / "generator_ema.safetensors").is_file()
        images = _stock_pipeline(tiny_sd_path, out)("a digit", output_type="pt", **recipe.call_kwargs()).images
        assert torch.isfinite(images).all()


def test_sid_guidance_presets():
    def kappas(*argv):
        return parse_config(SiDConfig, ["--prompts_file", "p.txt", *argv]).kappas()

    assert kappas() == (1.5, 1.5, 1.5, 1.5)
    assert kappas("--guidance_scale", "3", "--kappa4", "4.5") == (3.0, 3.0, 3.0, 4.5)
    assert kappas("--guidance_preset", "zero_cfg") == (1.0, 1.0, 1.0, 1.0)
    assert kappas("--guidance_preset", "anti_cfg", "--kappa2", "-1") == (1.0, -1.0, -1.0, 1.0)


def test_dmd2_on_a_v_prediction_teacher(tiny_sd2_v_path, prompts_file, tmp_path):
    out = tmp_path / "v"
    assert run(DMD2, dm_args(tiny_sd2_v_path, out, prompts=prompts_file, dfake_gen_update_ratio=1)) == 0
    assert all(torch.isfinite(torch.tensor(r["loss_fake"])) for r in read_logs(out))


@pytest.mark.parametrize("method", [DMD2, SiD])
def test_sdxl_lora_loads_into_stock_pipeline_and_changes_output(method, tiny_sdxl_path, digits_dir, prompts_file,
                                                                tmp_path):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "xl"
    extra = (dict(data=digits_dir, gan="true", dfake_gen_update_ratio=1, denoising_timesteps="999,499")
             if method is DMD2 else dict(prompts=prompts_file, num_steps=2))
    assert run(method, dm_args(tiny_sdxl_path, out, learning_rate=1e-2, **extra)) == 0
    before, after = lora_before_after(StableDiffusionXLPipeline, tiny_sdxl_path, out, height=16, width=16)
    assert torch.isfinite(after).all() and (after - before).abs().max() > 1e-4


def test_two_processes_draw_the_same_depth_as_one(tiny_sd_path, digits_dir, tmp_path):
    """torchrun --nproc_per_node 2: the depth is drawn identically on both processes (the logged mean is the
    single-process value), and the fake score with its GAN head trains under DDP before and after the GAN starts."""
    single, multi = tmp_path / "single", tmp_path / "multi"
    base = dict(max_train_steps=3, dfake_gen_update_ratio=1, gan="true", gan_start_step=1,
                denoising_timesteps="999,749,499,249")
    assert run(DMD2, dm_args(tiny_sd_path, single, digits_dir, train_batch_size=4, **base)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
           str(REPO / "train_scripts/train_dmd2.py"), *dm_args(tiny_sd_path, multi, digits_dir, train_batch_size=2,
                                                               **base)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = read_logs(single), read_logs(multi)
    assert [r["depth"] for r in one] == [r["depth"] for r in two]
    assert abs(one[0]["loss_fake"] - two[0]["loss_fake"]) <= 1e-4 * abs(one[0]["loss_fake"])


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("method, argv, message", [
    (DMD2, ["--gan"], "--gan needs real images"),
    (SiD, ["--train_data_dir", "DIGITS"], "SiD is data-free"),
    (DMD2, ["--dfake_gen_update_ratio", "0"], "must be at least 1"),
    (DMD2, ["--denoising_timesteps", "999,1000"], "outside 1..999"),
    (DMD2, ["--denoising_timesteps", "249,499"], "strictly decreasing"),
    (DMD2, ["--real_guidance_scale", "-2"], "must be >= 0"),
    (SiD, ["--kappa4", "-1"], "only as --guidance_preset anti_cfg"),
    (SiD, ["--guidance_preset", "anti_cfg", "--kappa2", "0.5"], "must be negative"),
    (SiD, ["--guidance_preset", "zero_cfg", "--guidance_scale", "2"], "sets every scale to 1"),
    (SiD, ["--init_timestep", "3", "--num_steps", "4"], "outside 1..999"),
])
def test_bad_input_is_one_line_before_training(method, argv, message, tiny_sd_path, digits_dir, prompts_file,
                                               tmp_path, capsys):
    argv = [str(digits_dir) if a == "DIGITS" else a for a in argv]
    has_data = "--train_data_dir" in argv
    prompts = None if (has_data or "--gan" in argv) else prompts_file
    full = dm_args(tiny_sd_path, tmp_path / "out", prompts=prompts) + argv
    assert run(method, full) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out" / "logs.jsonl").exists()
