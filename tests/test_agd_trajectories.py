"""AGD's trajectory store: the stored states are what the stock pipeline did, resumable, checked against its spec."""

import argparse
import json

import pytest
import torch

from stepdistill.agd import trajectories as traj
from stepdistill.agd.cli import register
from stepdistill.agd.trajectories import TrajectorySpec, estimate_bytes, load_states, make_trajectories
from stepdistill.errors import StepdistillError

PROMPTS = ["a red digit", "a blue cat", "a dog on the moon"]


def load_pipe(path):
    from stepdistill.teacher import Teacher

    return Teacher.from_pretrained(str(path)).pipe


def make_spec(pipe, base, **overrides):
    settings = {**dict(num_trajectories=3, guidance_range=(1.5, 6.0), steps=3, batch_size=2, seed=5), **overrides}
    return TrajectorySpec.for_pipeline(pipe, str(base), PROMPTS, **settings)


@pytest.fixture(scope="module")
def sd(tiny_sd_path):
    return tiny_sd_path, load_pipe(tiny_sd_path)


def guided_output(pipe, states, index, prompts):
    """uncond + w (cond - uncond), recomputed with the UNet on the stored x_t, t and conditioning and the empty
    prompt's conditioning (what the pipeline batches as [uncond; cond])."""
    s = states.get(index)
    n = len(index)
    if "pooled_prompt_embeds" in s:
        _, negative, _, negative_pooled = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=True)
        added = {"text_embeds": torch.cat([negative_pooled, s["pooled_prompt_embeds"]]),
                 "time_ids": s["add_time_ids"].repeat(2, 1)}  # the uncond half has the same time ids
    else:
        _, negative = pipe.encode_prompt(prompts, "cpu", 1, True)
        added = None
    assert torch.unique(s["t"]).numel() == 1  # one step at a time, as the pipeline calls the UNet
    hidden = torch.cat([negative, s["prompt_embeds"]])
    x = s["x_t"].repeat(2, 1, 1, 1)
    out = pipe.unet(x, s["t"][0], encoder_hidden_states=hidden, added_cond_kwargs=added).sample
    uncond, cond = out[:n], out[n:]
    return uncond + s["w"].view(-1, 1, 1, 1) * (cond - uncond), s


def stored_tensor_bytes(out_dir):
    total = 0
    for path in sorted(out_dir.glob("shard-*.safetensors")):
        header, _ = traj._read_header(path)
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")
    return total


@pytest.mark.parametrize("which", ["tiny_sd_path", "tiny_sd2_v_path", "tiny_sdxl_path"])
def test_targets_are_the_cfg_outputs_the_sampler_used(which, request, tmp_path):
    base = request.getfixturevalue(which)
    pipe = load_pipe(base)
    spec = make_spec(pipe, base)
    out = make_trajectories(pipe, PROMPTS, tmp_path / "t", spec, progress=False)
    assert "step" not in vars(pipe.scheduler) and not pipe.unet._forward_hooks  # hooks removed
    states = load_states(out, spec)
    assert len(states) == 3 * 3 and states.spec == spec
    for shard, rows in ((0, [0, 1]), (1, [2])):
        prompts = [PROMPTS[r % len(PROMPTS)] for r in rows]
        w = spec.guidance_scale(shard)
        assert 1.5 <= w <= 6.0
        for step in range(3):
            index = torch.tensor([r * 3 + step for r in rows])
            expected, s = guided_output(pipe, states, index, prompts)
            torch.testing.assert_close(s["target"], expected, atol=1e-5, rtol=1e-5)
            assert s["w"].tolist() == [w] * len(rows) and s["t"].dtype == torch.long
            assert s["x_t"].shape == s["target"].shape == (len(rows), 4, 8, 8)
    if which == "tiny_sdxl_path":
        s = states.get(torch.arange(len(states)))
        assert s["pooled_prompt_embeds"].shape == (9, 32) and s["add_time_ids"].shape == (9, 6)
        assert s["add_time_ids"][0].tolist() == [16.0, 16.0, 0.0, 0.0, 16.0, 16.0]
    else:
        # trajectory i starts from the noise of seed + i (DDIM: no input scaling, init sigma 1), and each stored
        # state is the DDIM step of the one before with its stored target
        noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(spec.seed + 2))
        torch.testing.assert_close(states.get(torch.tensor([2 * 3]))["x_t"], noise, atol=0, rtol=0)
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        scheduler.set_timesteps(3)
        chain = states.get(torch.arange(3, 6))
        for step in range(2):
            following = scheduler.step(chain["target"][step], chain["t"][step], chain["x_t"][step]).prev_sample
            torch.testing.assert_close(chain["x_t"][step + 1], following, atol=1e-6, rtol=1e-6)
    meta = [json.loads(traj._read_header(p)[0]["__metadata__"]["trajectories"])["prompts"]
            for p in sorted(out.glob("shard-*"))]
    assert meta == [PROMPTS[:2], PROMPTS[2:]]
    assert abs(stored_tensor_bytes(out) - estimate_bytes(pipe, spec)) <= 0.03 * stored_tensor_bytes(out)
    assert json.loads((out / "manifest.json").read_text())["estimated_bytes"] == estimate_bytes(pipe, spec)


def test_guidance_is_drawn_per_shard_and_prompts_cycle(sd, tmp_path):
    base, pipe = sd
    spec = make_spec(pipe, base, num_trajectories=5, batch_size=1, guidance_range=(1, 12))
    ws = [spec.guidance_scale(k) for k in range(5)]
    assert len(set(ws)) == 5 and all(1 <= w <= 12 for w in ws)
    assert make_spec(pipe, base, num_trajectories=50, batch_size=1, guidance_range=(1, 12)).guidance_scale(3) == ws[3]
    assert make_spec(pipe, base, guidance_range=(2, 2)).guidance_scale(0) == 2.0
    states = load_states(make_trajectories(pipe, PROMPTS, tmp_path / "t", spec, progress=False))
    assert states.get(torch.arange(15))["w"].tolist() == [w for w in ws for _ in range(3)]
    ordered = states.get(torch.arange(15))
    shuffled = torch.randperm(15)
    for name, value in states.get(shuffled).items():
        assert torch.equal(value, ordered[name][shuffled]), name


def test_guidance_1_stores_the_conditional_output(sd, tmp_path):
    base, pipe = sd  # w = 1: the pipeline skips CFG and the UNet sees the prompts alone
    spec = make_spec(pipe, base, num_trajectories=2, steps=2, guidance_range=(1, 1))
    s = load_states(make_trajectories(pipe, PROMPTS, tmp_path / "t", spec, progress=False)).get(torch.tensor([1, 3]))
    assert s["w"].tolist() == [1.0, 1.0]
    cond = pipe.unet(s["x_t"], s["t"], encoder_hidden_states=s["prompt_embeds"]).sample
    torch.testing.assert_close(s["target"], cond, atol=1e-5, rtol=1e-5)


def test_resume_makes_only_the_missing_shard_and_equals_an_uninterrupted_run(sd, tmp_path, monkeypatch, caplog):
    base, pipe = sd
    spec = make_spec(pipe, base, batch_size=1)
    whole = make_trajectories(pipe, PROMPTS, tmp_path / "whole", spec, progress=False)
    resumed = make_trajectories(pipe, PROMPTS, tmp_path / "resumed", spec, progress=False)
    (resumed / "shard-00001.safetensors").unlink()  # killed before shard 1 was renamed into place:
    (resumed / "shard-00001.safetensors.tmp").write_bytes(b"half a shard")  # its temp file is left behind
    with pytest.raises(StepdistillError, match="1 of 3 shards are missing .*shard-00001.*rerun"):
        load_states(resumed, spec)
    made = []
    real = traj._make_shard
    monkeypatch.setattr(traj, "_make_shard", lambda *a: made.append(a[3]) or real(*a))
    with caplog.at_level("INFO", logger=traj.__name__):
        make_trajectories(pipe, PROMPTS, resumed, spec, progress=False)
    assert made == [1] and "reusing 2 of 3 shards" in caplog.text
    assert "3 trajectories x 3 steps -> about" in caplog.text
    for path in sorted(whole.iterdir()):
        assert (resumed / path.name).read_bytes() == path.read_bytes(), path.name
    assert sorted(p.name for p in resumed.iterdir()) == sorted(p.name for p in whole.iterdir())

    made.clear()  # a shard damaged after writing: load_states names it, the generation makes it again
    damaged = resumed / "shard-00002.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-10])
    with pytest.raises(StepdistillError, match="shard-00002.safetensors does not parse"):
        load_states(resumed)
    make_trajectories(pipe, PROMPTS, resumed, spec, progress=False)
    assert made == [2] and damaged.read_bytes() == (whole / damaged.name).read_bytes()


def test_another_spec_in_the_same_folder_is_refused(sd, tiny_sd2_v_path, tmp_path):
    base, pipe = sd
    spec = make_spec(pipe, base, num_trajectories=1, steps=2)
    out = make_trajectories(pipe, PROMPTS, tmp_path / "t", spec, progress=False)
    other = load_pipe(tiny_sd2_v_path)
    other_spec = make_spec(other, tiny_sd2_v_path, num_trajectories=1, steps=2)
    with pytest.raises(StepdistillError) as e:
        make_trajectories(other, PROMPTS, out, other_spec, progress=False)
    assert f"trajectories in {out} were made from {base} with unet_signature=" in str(e.value)
    assert f"not {tiny_sd2_v_path} with" in str(e.value) and "delete" in str(e.value)
    with pytest.raises(StepdistillError, match="were made with steps=2, seed=5, not steps=3, seed=1; "):
        make_trajectories(pipe, PROMPTS, out, make_spec(pipe, base, num_trajectories=1, seed=1), progress=False)
    with pytest.raises(StepdistillError, match="were made with steps=2, not steps=3"):
        load_states(out, make_spec(pipe, base, num_trajectories=1))
    with pytest.raises(StepdistillError, match="not the ones spec.prompts_sha256 names"):
        make_trajectories(pipe, PROMPTS[:2], out, spec, progress=False)
    (out / "manifest.json").unlink()
    with pytest.raises(StepdistillError, match="shard-00000.safetensors has no manifest.json"):
        make_trajectories(pipe, PROMPTS, out, spec, progress=False)
    with pytest.raises(StepdistillError, match="has no manifest.json: not a trajectory folder"):
        load_states(out)


def run_cli(argv):
    parser = argparse.ArgumentParser(prog="stepdistill")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["agd", "trajectories", *argv])
    args.func(args)


@pytest.mark.parametrize("flags, message", [
    (["--guidance_range", "0.5,12"], "--guidance_range 0.5,12: need 1 <= low <= high"),
    (["--guidance_range", "12,2"], "--guidance_range 12,2: need 1 <= low <= high"),
    (["--guidance_range", "3"], "--guidance_range 3: expected two comma-separated numbers"),
    (["--trajectory_steps", "0"], "--trajectory_steps 0: must be at least 1"),
    (["--num_trajectories", "0"], "--num_trajectories 0: must be at least 1"),
    (["--batch_size", "-1"], "--batch_size -1: must be at least 1"),
    (["--resolution", "0"], "--resolution 0: must be at least 1"),
    (["--resolution", "15"], "--resolution 15: must be a multiple of 2"),
    (["--prompts_file", "nope.txt"], "nope.txt: prompt file not found"),
    (["--pretrained_model_name_or_path", "./no/such/model"], "no such directory"),
])
def test_cli_bad_input_is_one_line(flags, message, tiny_sd_path, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    defaults = {"--pretrained_model_name_or_path": str(tiny_sd_path), "--prompts_file": str(prompts),
                "--output_dir": str(tmp_path / "t"), "--num_trajectories": "2", "--trajectory_steps": "2"}
    defaults.update(zip(flags[::2], flags[1::2]))
    with pytest.raises(StepdistillError) as e:
        run_cli([x for kv in defaults.items() for x in kv])
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "t" / "manifest.json").exists()


def test_cli_makes_and_resumes_and_checks_the_folder_before_loading(tiny_sd_path, tmp_path, monkeypatch, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    argv = ["--pretrained_model_name_or_path", str(tiny_sd_path), "--prompts_file", str(prompts), "--output_dir",
            str(tmp_path / "t"), "--num_trajectories", "3", "--batch_size", "2", "--trajectory_steps", "2",
            "--guidance_range", "1,8", "--no_progress", "--device", "cpu"]
    run_cli(argv)
    assert "3 trajectories x 2 steps in" in capsys.readouterr().out
    states = load_states(tmp_path / "t")
    assert len(states) == 6 and states.spec.guidance_range == (1.0, 8.0) and states.spec.resolution == 16  # the pipeline's own size, filled in
    from stepdistill.teacher import Teacher

    monkeypatch.setattr(Teacher, "from_pretrained", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(StepdistillError, match="were made with steps=2, not steps=4"):
        run_cli(argv + ["--trajectory_steps", "4"])


def test_stored_targets_are_what_the_sampler_stepped_with(sd, tmp_path):
    """An independent hook on the sampler (the scheduler's step, wrapped before the store wraps it) sees exactly the
    model outputs that the store keeps as targets, step by step, and the latents it steps from."""
    base, pipe = sd
    seen = []
    original = pipe.scheduler.step

    def spy(model_output, timestep, sample, *args, **kwargs):
        seen.append((int(timestep), model_output.detach().clone()))
        return original(model_output, timestep, sample, *args, **kwargs)

    pipe.scheduler.step = spy
    try:
        spec = make_spec(pipe, base, num_trajectories=2, batch_size=2)
        make_trajectories(pipe, PROMPTS, tmp_path / "t", spec, progress=False)
    finally:
        del pipe.scheduler.step
    states = load_states(tmp_path / "t", spec)
    steps = states.steps
    assert len(seen) == steps
    for s, (t, output) in enumerate(seen):
        got = states.get(torch.tensor([s, steps + s]))  # trajectory 0 and 1 at step s
        assert torch.equal(got["t"], torch.tensor([t, t]))
        assert torch.equal(got["target"], output.float())
