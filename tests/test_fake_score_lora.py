"""DMD2 / SiD with the fake score as a second LoRA on the frozen base (--fake_score_lora_rank): the generator's
adapter, the fake score's adapter and the teacher are one UNet. Each phase changes only its own adapter, the teacher
is the bare base, gradients through a checkpointed shared UNet are those without checkpointing, short runs train,
the output is the generator's LoRA alone, resume equals an uninterrupted run, and bad input is one line."""


import pytest
import torch
from conftest import build_method as _method
from conftest import dm_args as conftest_dm_args
from conftest import lora_before_after, read_logs
from safetensors.torch import load_file

from stepdistill.lora import ADAPTER_NAME, FAKE_SCORE_ADAPTER, LORA_WEIGHTS_NAME, active_adapter
from stepdistill.methods.dmd2 import DMD2
from stepdistill.methods.networks import SharedUNetAdapter
from stepdistill.methods.sid import SiD
from stepdistill.teacher import Teacher
from stepdistill.trainer import run



def dm_args(model, out, data=None, prompts=None, **overrides) -> list[str]:
    overrides.setdefault("fake_score_lora_rank", 4)
    return conftest_dm_args(model, out, data, prompts, **overrides)



def _kick(adapter_net, scale=0.05):
    """Move an adapter away from its zero-B start, so that it changes the UNet's output."""
    with torch.no_grad():
        for name, p in adapter_net.lora.named_parameters():
            if ".lora_B." in name:
                p.add_(scale * torch.randn_like(p))


def _inputs(method, b=2):
    teacher = method.teacher
    x = torch.randn(b, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([700, 300])[:b]
    return x, t, teacher.encode_prompt(["a digit", "the number one"][:b])


# ------------------------------------------------------------------------------------------ the networks
def test_one_unet_two_disjoint_adapters_and_the_bare_teacher(tiny_sd_path, digits_dir, tmp_path):
    method = _method(DMD2, dm_args(tiny_sd_path, tmp_path, digits_dir, gan="true"))
    unet = method.teacher.unet
    gen, fake = method.networks["generator"], method.networks["fake_score"]
    assert isinstance(gen, SharedUNetAdapter) and isinstance(fake, SharedUNetAdapter)
    assert gen.shared_unet is unet and fake.shared_unet is unet and method.student_unet() is unet
    # the networks' parameters (what the trainer's optimisers, DDP and checkpoints see) are their adapters alone
    lora_params = {n: p for n, p in unet.named_parameters() if "lora_" in n}
    own = {id(p) for n, p in lora_params.items() if f".{ADAPTER_NAME}." in n}
    theirs = {id(p) for n, p in lora_params.items() if f".{FAKE_SCORE_ADAPTER}." in n}
    g_params, f_params = method.trainable_parameters("generator"), method.trainable_parameters("fake_score")
    assert {id(p) for p in g_params} == own
    assert {id(p) for p in f_params} == theirs | {id(p) for p in fake.head.parameters()}
    assert len(g_params) == len(list(gen.parameters())) and len(f_params) == len(list(fake.parameters()))
    assert not any(p.requires_grad for n, p in unet.named_parameters() if "lora_" not in n)
    # the teacher (adapters off) is the base UNet as loaded, bit for bit, whatever the adapters hold
    _kick(gen)
    _kick(fake)
    base = Teacher.from_pretrained(str(tiny_sd_path)).unet
    x, t, cond = _inputs(method)
    with torch.no_grad():
        with method.teacher_mode() as real:
            y_teacher = real(x, t, **cond.unet_kwargs()).sample
        y_base = base(x, t, **cond.unet_kwargs()).sample
        y_gen = gen(x, t, **cond.unet_kwargs()).sample
        y_fake = fake(x, t, **cond.unet_kwargs()).sample
        y_rest = unet(x, t, **cond.unet_kwargs()).sample  # at rest the shared UNet runs G's adapter (sampling)
        logits = fake(x, t, **cond.unet_kwargs(), classify=True)
    assert torch.equal(y_teacher, y_base)
    assert torch.equal(y_gen, y_rest)
    assert (y_gen - y_base).abs().max() > 1e-3 and (y_fake - y_base).abs().max() > 1e-3
    assert (y_fake - y_gen).abs().max() > 1e-3
    assert logits.shape == (2,)
    # each forward put back what was active, and no switch changed what trains
    assert active_adapter(unet) == (ADAPTER_NAME,)
    assert all(p.requires_grad for p in g_params + f_params)


def test_adapter_switches_run_what_peft_runs(tiny_sd_path):
    """lora.set_active_adapter writes PEFT's own two fields: the UNet then computes what PEFT's API makes it."""
    from stepdistill.lora import add_lora, add_second_lora, set_active_adapter

    unet = Teacher.from_pretrained(str(tiny_sd_path)).unet
    add_lora(unet, 4, seed=0)
    add_second_lora(unet, FAKE_SCORE_ADAPTER, 4, seed=1)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 4, 8, 8)
    t, text = torch.tensor([700, 300]), torch.randn(2, 77, int(unet.config.cross_attention_dim))
    outputs = set()
    with torch.no_grad():
        for names in (FAKE_SCORE_ADAPTER, None, ADAPTER_NAME, (ADAPTER_NAME, FAKE_SCORE_ADAPTER)):
            set_active_adapter(unet, names)
            ours = unet(x, t, text).sample
            if names is None:
                unet.disable_adapters()
            else:
                unet.enable_adapters()
                unet.set_adapter(list(names) if isinstance(names, tuple) else names)
            assert torch.equal(ours, unet(x, t, text).sample), names
            outputs.add(float(ours.sum()))
    assert len(outputs) == 4


def test_a_full_generator_with_the_fake_score_lora_on_the_teachers_unet(tiny_sd_path, prompts_file, tmp_path):
    method = _method(SiD, dm_args(tiny_sd_path, tmp_path, prompts=prompts_file, use_lora="false"))
    unet, gen, fake = method.teacher.unet, method.networks["generator"], method.networks["fake_score"]
    assert fake.shared_unet is unet and gen is not unet and not hasattr(gen, "peft_config")
    assert active_adapter(unet) is None  # at rest the teacher's UNet is the teacher
    _kick(fake)
    base = Teacher.from_pretrained(str(tiny_sd_path)).unet
    x, t, cond = _inputs(method)
    with torch.no_grad():
        assert torch.equal(method.real_x0(x, t, cond), method.teacher.to_x0(
            method.teacher.guided_predict(x, t, cond, method.guidance.real, uncond=method.uncond(2), unet=base), x, t))
        assert (fake(x, t, **cond.unet_kwargs()).sample - base(x, t, **cond.unet_kwargs()).sample).abs().max() > 1e-3


def test_gradients_through_the_checkpointed_shared_unet_are_those_without_checkpointing(tiny_sd_path, prompts_file,
                                                                                      tmp_path):
    """Non-reentrant checkpointing recomputes a forward in backward; with adapters switched per forward the
    recomputation must run the adapters of the forward (lora.adapter_checkpointing), not those active by then."""
    method = _method(SiD, dm_args(tiny_sd_path, tmp_path, prompts=prompts_file))
    gen, fake = method.networks["generator"], method.networks["fake_score"]
    _kick(gen)
    _kick(fake)
    x, t, cond = _inputs(method)
    params = list(gen.parameters()) + list(fake.parameters())

    def grads():
        x_g = x.clone().requires_grad_(True)
        # G's turn's graph: the teacher and F at a point that depends on x_g, then F's own loss on a detached one
        loss = (method.real_x0(x_g, t, cond) - method.fake_x0(x_g, t, cond)).square().sum()
        loss = loss + method.networks["fake_score"](x.detach(), t, **cond.unet_kwargs()).sample.square().sum()
        loss = loss + gen(x_g, t, **cond.unet_kwargs()).sample.square().sum()
        g = torch.autograd.grad(loss, [x_g] + params)
        return g, active_adapter(method.teacher.unet)

    plain, rest = grads()
    for net in method.networks.values():
        net.enable_gradient_checkpointing()
    assert method.teacher.unet.is_gradient_checkpointing
    checkpointed, rest_after = grads()
    assert rest == rest_after == (ADAPTER_NAME,)
    for a, b in zip(plain, checkpointed):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ training
def _snapshot(unet, head):
    state = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    state.update({f"head.{k}": v.detach().clone() for k, v in head.state_dict().items()})
    return state


def _check_output(out, base):
    """The output is the generator's LoRA alone, it changes a stock pipeline's images, and the fake score's
    checkpoint holds its adapter (and head) alone."""
    from diffusers import StableDiffusionPipeline

    saved = load_file(str(out / LORA_WEIGHTS_NAME))
    assert saved and not any(FAKE_SCORE_ADAPTER in k for k in saved)
    last = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    fake = load_file(str(last / "fake_score.safetensors"))
    assert fake and all(k.startswith(("lora.", "head.")) and f".{ADAPTER_NAME}." not in k for k in fake)
    before, after = lora_before_after(StableDiffusionPipeline, base, out)
    assert torch.isfinite(after).all() and (after - before).abs().max() > 1e-3


def test_dmd2_each_phase_changes_only_its_own_adapter(tiny_sd_path, digits_dir, tmp_path, monkeypatch):
    changed = []
    original = DMD2.after_update

    def spy(self, phase, step):
        now = _snapshot(self.teacher.unet, self.networks["fake_score"].head)
        before = getattr(self, "_spy", None)
        if before is not None:
            changed.append((phase, {k for k in now if not torch.equal(now[k], before[k])}))
        self._spy = now
        return original(self, phase, step)

    monkeypatch.setattr(DMD2, "after_update", spy)
    # ratio 1: G then F on every iteration; the first phase only takes the first snapshot
    out = tmp_path / "out"
    assert run(DMD2, dm_args(tiny_sd_path, out, digits_dir, gan="true", dfake_gen_update_ratio=1,
                             max_train_steps=3, learning_rate=1e-2)) == 0
    assert [p for p, _ in changed] == ["fake_score", "generator", "fake_score", "generator", "fake_score"]
    for phase, keys in changed:
        assert keys, phase
        if phase == "generator":
            assert all(f".{ADAPTER_NAME}." in k for k in keys), keys
        else:
            assert all(f".{FAKE_SCORE_ADAPTER}." in k or k.startswith("head.") for k in keys), keys
            assert any(k.startswith("head.") for k in keys)
    assert all(torch.isfinite(torch.tensor(r["loss_fake"])) for r in read_logs(out))
    _check_output(out, tiny_sd_path)


def test_sid_with_gradient_checkpointing_trains(tiny_sd_path, prompts_file, tmp_path):
    out = tmp_path / "sid"
    assert run(SiD, dm_args(tiny_sd_path, out, prompts=prompts_file, learning_rate=1e-2,
                            gradient_checkpointing="true")) == 0
    logs = read_logs(out)
    assert all(torch.isfinite(torch.tensor([r["loss_fake"], r["loss_sid"]])).all() for r in logs)
    _check_output(out, tiny_sd_path)


def test_resume_equals_an_uninterrupted_run(tiny_sd_path, digits_dir, tmp_path):
    common = dict(max_train_steps=4, learning_rate=1e-3, checkpointing_steps=2, gan="true",
                  dfake_gen_update_ratio=2, gradient_checkpointing="true")
    assert run(DMD2, dm_args(tiny_sd_path, tmp_path / "straight", digits_dir, **common)) == 0
    partial = tmp_path / "resumed"
    assert run(DMD2, dm_args(tiny_sd_path, partial, digits_dir, **{**common, "max_train_steps": 2})) == 0
    for leftover in (LORA_WEIGHTS_NAME, "stepdistill.json"):
        (partial / leftover).unlink()
    assert run(DMD2, dm_args(tiny_sd_path, partial, digits_dir, resume_from_checkpoint="latest", **common)) == 0
    for name in ("generator", "fake_score", "optimizer-generator", "optimizer-fake_score"):
        a = load_file(str(tmp_path / "straight" / "checkpoint-4" / f"{name}.safetensors"))
        b = load_file(str(partial / "checkpoint-4" / f"{name}.safetensors"))
        assert a.keys() == b.keys() and a, name
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    def logs(out):
        return [{k: v for k, v in r.items() if k != "sec_per_step"} for r in read_logs(out)]

    assert [r["step"] for r in logs(partial)] == [1, 2, 3, 4] and logs(partial) == logs(tmp_path / "straight")


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("argv, message", [
    (["--fake_score_lora_rank", "-1"], "--fake_score_lora_rank -1: must be >= 0"),
    (["--fake_score_lora_rank", "0", "--fake_score_lora_alpha", "8"], "--fake_score_lora_alpha needs "
                                                                      "--fake_score_lora_rank"),
    (["--fake_score_lora_alpha", "0"], "--fake_score_lora_alpha 0.0: must be > 0"),
])
def test_bad_input_is_one_line_before_training(argv, message, tiny_sd_path, prompts_file, tmp_path, capsys):
    assert run(SiD, dm_args(tiny_sd_path, tmp_path / "out", prompts=prompts_file) + argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out" / "logs.jsonl").exists()


def test_two_processes_train_both_adapters_under_ddp(tiny_sd_path, digits_dir, tmp_path):
    """torchrun --nproc_per_node 2: the two SharedUNetAdapter networks share one UNet under two DDP wrappers; the
    losses equal one process with the doubled batch and the generator's adapter ends the same."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    single, multi = tmp_path / "single", tmp_path / "multi"
    base = dict(max_train_steps=2, dfake_gen_update_ratio=1, gan="true", gan_start_step=1,
                gradient_checkpointing="true", checkpointing_steps=0)
    assert run(DMD2, dm_args(tiny_sd_path, single, digits_dir, train_batch_size=4, **base)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547",
           str(REPO / "train_scripts/train_dmd2.py"), *dm_args(tiny_sd_path, multi, digits_dir, train_batch_size=2,
                                                               **base)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "distributed: MULTI_CPU, 2 processes" in proc.stderr
    one, two = read_logs(single), read_logs(multi)
    for key in ("loss_dm", "loss_fake"):
        assert all(abs(a[key] - b[key]) <= 1e-4 * abs(a[key]) for a, b in zip(one, two)), key
    a, b = load_file(str(single / LORA_WEIGHTS_NAME)), load_file(str(multi / LORA_WEIGHTS_NAME))
    assert a.keys() == b.keys()
    assert torch.cat([(a[k] - b[k]).abs().flatten() < 1e-5 for k in a]).float().mean() > 0.99
