"""Issue 13, faithful defaults: options that must not crash, defaults that follow the official recipes per method
and per student kind, learning-rate schedules that never ignore an option silently, SiD's empty-prompt placement
and SDXL's micro-conditioning at a non-native resolution."""

from pathlib import Path

import pytest
import torch
from conftest import read_logs, train_args

from stepdistill.api import main as run
from stepdistill.config import build_parser, parse_config
from stepdistill.errors import StepdistillError
from stepdistill.methods import get_method
from stepdistill.methods.base import PhaseContext
from stepdistill.preflight import check_resolution
from stepdistill.randomness import StepRandom
from stepdistill.teacher import Teacher

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "train_scripts" / "configs" / "tiny_digits"


def _method(name, argv):
    cls = get_method(name)
    config = parse_config(cls.config_class, argv)
    check_resolution(config)
    return cls(config, Teacher.from_pretrained(config.pretrained_model_name_or_path))


# ------------------------------------------------------------------------------ 1. TSCD adversarial + checkpointing
def test_tscd_adversarial_term_with_gradient_checkpointing(tiny_sd_path, digits_dir, tmp_path):
    """The discriminator's trunk is the shared UNet with its adapters off: checkpointing would recompute it in
    backward with the adapters back on."""
    out = tmp_path / "adv"
    assert run("tscd", train_args(tiny_sd_path, digits_dir, out, max_train_steps=2, segments="2,1",
                                  adversarial_weight=0.1, gradient_checkpointing="true")) == 0
    logs = read_logs(out)
    assert all("loss_adv" in r and "loss_disc" in r for r in logs)


# ------------------------------------------------------------------------------ 2. full LCM: lr and recipe guidance
def test_lcm_learning_rate_and_recipe_guidance_follow_the_student_kind(tiny_sd_path):
    lcm = get_method("lcm").config_class
    lora = parse_config(lcm, [])
    full = parse_config(lcm, ["--use_lora", "false"])
    assert lora.learning_rate == 1e-4 and full.learning_rate == 1e-6  # LCM-LoRA / full LCM (Diffusers examples)
    assert parse_config(lcm, ["--use_lora", "false", "--learning_rate", "3e-5"]).learning_rate == 3e-5
    assert lora.inference_guidance_scale == 1.0  # LCM-LoRA bakes guidance in
    # a full LCM samples with its guidance embedding: a w it was trained on
    assert full.guidance_scale_min <= full.inference_guidance_scale <= full.guidance_scale_max
    narrow = parse_config(lcm, ["--use_lora", "false", "--guidance_scale_min", "2", "--guidance_scale_max", "4"])
    assert narrow.inference_guidance_scale == 3.0
    method = _method("lcm", ["--pretrained_model_name_or_path", str(tiny_sd_path), "--use_lora", "false"])
    assert method.recipe().guidance_scale == full.inference_guidance_scale
    assert "method default" in build_parser(lcm).format_help().replace("\n", " ").replace("  ", " ")


# ------------------------------------------------------------------------------ 3. learning-rate schedules
def test_every_diffusers_schedule_is_a_choice_and_builds():
    from diffusers.optimization import SchedulerType

    from stepdistill.config import LR_SCHEDULERS, TrainConfig
    from stepdistill.trainer import _lr_scheduler

    assert set(LR_SCHEDULERS) == {s.value for s in SchedulerType}
    for name in LR_SCHEDULERS:
        config = TrainConfig(lr_scheduler=name, lr_warmup_steps=0 if name in ("constant", "piecewise_constant") else 2,
                             lr_step_rules="1:3,0.1" if name == "piecewise_constant" else None)
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = _lr_scheduler(config, opt, 10)
        lrs = []
        for _ in range(10):
            lrs.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        if config.lr_warmup_steps:
            assert lrs[0] == 0 and lrs[1] == 0.5, (name, lrs)  # the warm-up is honoured
        if name == "piecewise_constant":
            assert lrs[:3] == [1.0] * 3 and lrs[3] == pytest.approx(0.1)


@pytest.mark.parametrize("argv, message", [
    (["--lr_warmup_steps", "5"], "constant_with_warmup"),
    (["--lr_scheduler", "piecewise_constant"], "--lr_step_rules"),
    (["--lr_scheduler", "cosine", "--lr_step_rules", "1:3,0.1"], "--lr_step_rules"),
    (["--lr_scheduler", "piecewise_constant", "--lr_step_rules", "1:x,0.1"], "multiplier:update"),
    (["--lr_scheduler", "cosine", "--lr_num_cycles", "3"], "cosine_with_restarts"),
    (["--lr_scheduler", "linear", "--lr_power", "2"], "polynomial"),
])
def test_schedule_options_that_would_be_ignored_are_errors(argv, message, tiny_sd_path, digits_dir, tmp_path, capsys):
    assert run("lcm", train_args(tiny_sd_path, digits_dir, tmp_path / "out") + argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out" / "logs.jsonl").exists()


def test_shipped_configs_train_without_warm_up_where_it_was_ignored():
    """The DMD2 tiny-digits figures were made with lr_warmup_steps 100 under `constant`, i.e. without warm-up."""
    for name in ("dmd2", "dmd2_4step"):
        config = parse_config(get_method("dmd2").config_class, ["--config", str(CONFIGS / f"{name}.yaml")])
        assert config.lr_scheduler == "constant" and config.lr_warmup_steps == 0


# ------------------------------------------------------------------------------ 4. LoRA scale
def test_every_methods_help_renders():
    """argparse %-formats help texts: "10 % warm-up" in a help text broke --help."""
    from stepdistill.methods import METHODS

    for name, cls in METHODS.items():
        assert "--learning_rate" in build_parser(cls.config_class).format_help(), name


def test_lora_alpha_help_says_what_it_does_to_the_learning_rate():
    for name in ("lcm", "tscd", "dmd2", "sid"):
        text = " ".join(build_parser(get_method(name).config_class).format_help().split())
        assert "alpha/rank" in text and "learning rate" in text
    dmd2 = " ".join(build_parser(get_method("dmd2").config_class).format_help().split())
    assert "rank 64, alpha 8" in dmd2  # the official SDXL LoRA
    tscd = " ".join(build_parser(get_method("tscd").config_class).format_help().split())
    assert "rank 64, alpha 8" in tscd  # PCM (PEFT's default alpha)
    lcm = " ".join(build_parser(get_method("lcm").config_class).format_help().split())
    assert "rank 64, alpha 64" in lcm


# ------------------------------------------------------------------------------ 5. SiD's empty prompts
@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a digit\nthe number one\na red digit\na small blue number\n")
    return path


@pytest.mark.parametrize("placement", ["generator", "fake_score"])
def test_sid_empty_prompts_placement(placement, tiny_sd_path, prompts_file, monkeypatch):
    """generator (SiD-LSG's sid_training_loop.py, use_context_dropout_train_fake): the fake score's turn empties
    10 % of the prompts before the generator samples, so each sample and the fake score's text agree; fake_score:
    the generator samples from every prompt and only the fake score's text is emptied."""
    sid = _method("sid", ["--pretrained_model_name_or_path", str(tiny_sd_path), "--prompts_file", str(prompts_file),
                          "--guidance_scale", "2", "--text_dropout_placement", placement])
    seen = {}
    generate, guided = sid.generate, sid.teacher.guided_predict
    monkeypatch.setattr(sid, "generate", lambda cond, *a, **k: (seen.setdefault("generator", cond),
                                                               generate(cond, *a, **k))[1])
    monkeypatch.setattr(sid.teacher, "guided_predict", lambda x, t, cond, *a, **k: (
        seen.setdefault("fake_score", cond), guided(x, t, cond, *a, **k))[1])
    b = 64
    batch = {"prompts": ["a digit"] * b}
    root = StepRandom(0, 0)
    ctx = PhaseContext("fake_score", 0, batch, root.stream("fake_score"), root, sid.networks["fake_score"])
    with torch.no_grad():
        sid.loss(ctx)
    empty = sid.uncond(1).prompt_embeds[0]
    rows = lambda cond: torch.tensor([torch.equal(e, empty) for e in cond.prompt_embeds])  # noqa: E731
    dropped_g, dropped_f = rows(seen["generator"]), rows(seen["fake_score"])
    assert 0 < int(dropped_f.sum()) < b // 3  # about 10 %
    if placement == "generator":
        assert torch.equal(dropped_g, dropped_f)
    else:
        assert not dropped_g.any()


def test_sid_defaults_to_the_official_placement_and_the_shipped_configs_keep_theirs():
    sid = get_method("sid").config_class
    assert parse_config(sid, ["--prompts_file", "p.txt"]).text_dropout_placement == "generator"
    for name in ("sid", "sid_4step"):
        config = parse_config(sid, ["--config", str(CONFIGS / f"{name}.yaml")])
        assert config.text_dropout_placement == "fake_score"


# ------------------------------------------------------------------------------ 6. SDXL at a non-native resolution
@pytest.mark.parametrize("method", ["lcm", "tscd"])
def test_sdxl_unconditional_half_gets_the_training_resolution(method, tiny_sdxl_path, digits_dir, monkeypatch):
    m = _method(method, train_args(tiny_sdxl_path, digits_dir, "unused", resolution=32)
                + ["--guidance_scale_min", "2", "--guidance_scale_max", "3"])
    assert m.teacher.default_resolution != 32
    time_ids = []
    forward = type(m.teacher.unet).forward

    def spy(self, *args, added_cond_kwargs=None, **kwargs):
        time_ids.append(added_cond_kwargs["time_ids"])
        return forward(self, *args, added_cond_kwargs=added_cond_kwargs, **kwargs)

    monkeypatch.setattr(type(m.teacher.unet), "forward", spy)
    latents = torch.randn(2, 4, 16, 16)
    batch = {"prompts": ["a digit", "a seven"], "latent_mean": latents, "latent_std": torch.zeros_like(latents)}
    root = StepRandom(0, 0)
    with torch.no_grad():
        m.consistency_terms(PhaseContext("student", 0, batch, root, root, m.networks["student"]))
    ids = torch.cat(time_ids)
    assert len(ids) >= 4  # the student, the guided teacher (both halves), the target
    assert (ids == torch.tensor([32.0, 32, 0, 0, 32, 32])).all()


def test_teacher_guidance_without_an_explicit_uncond_matches_the_conds_resolution(tiny_sdxl_path):
    teacher = Teacher.from_pretrained(str(tiny_sdxl_path))
    cond = teacher.encode_prompt(["a digit"], 32)
    seen = []
    predict = teacher.predict
    teacher.predict = lambda x, t, c, *a, **k: (seen.append(c.add_time_ids), predict(x, t, c, *a, **k))[1]
    with torch.no_grad():
        teacher.guided_predict(torch.randn(1, 4, 16, 16), torch.tensor([500]), cond, 3.0)
    assert (seen[0] == torch.tensor([32.0, 32, 0, 0, 32, 32])).all()
