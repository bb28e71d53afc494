"""Guided sampling trajectories: the training states of adapter guidance distillation (AGD, arXiv 2503.07274).

As in the official code (cristianpjensen/agd, ``agd/sd/sample_trajectories.py``) the base pipeline samples with
ordinary classifier-free guidance at a scale w drawn uniformly from a range, and every step stores the conditional
half of the UNet input x_t (after ``scheduler.scale_model_input``), the timestep, w, the prompt's conditioning and
the CFG output uncond + w (cond - uncond) the sampler stepped with, in the model's prediction type. Sampling is the
STOCK pipeline call: a forward hook on the UNet and a wrapper around ``scheduler.step`` record what it does, so the
stored target is exactly the output the sampler used.

``out_dir`` holds ``manifest.json`` (the spec and the size estimate, written first) and one safetensors file per shard
of ``batch_size`` trajectories, written atomically (temp file + ``os.replace``): a killed run leaves only complete
shards, and a rerun with the same spec reuses them and makes the rest. A shard file that does not parse (damaged after
it was written) is made again by the generation, with a warning, and refused by ``load_states`` naming the file.
Shards without a manifest are refused: nothing says what made them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import StepdistillError
from ..teacher import check_supported

logger = logging.getLogger(__name__)
MANIFEST = "manifest.json"
PER_TRAJECTORY = ("w", "prompt_embeds", "pooled_prompt_embeds", "add_time_ids")  # stored once per trajectory
DTYPES = {"F32": torch.float32, "I64": torch.int64}


def check_settings(guidance_range, steps: int, num_trajectories: int, batch_size: int, resolution=None) -> None:
    """One-line errors for settings that cannot make trajectories (the CLI checks them before loading a model)."""
    lo, hi = guidance_range
    if not 1 <= lo <= hi:
        raise StepdistillError(f"--guidance_range {lo:g},{hi:g}: need 1 <= low <= high (Diffusers' guidance scale: "
                               "1 is no guidance), e.g. 1,12")
    for flag, value in (("--trajectory_steps", steps), ("--num_trajectories", num_trajectories),
                        ("--batch_size", batch_size), ("--resolution", resolution)):
        if value is not None and value < 1:
            raise StepdistillError(f"{flag} {value}: must be at least 1")


def prompts_sha256(prompts) -> str:
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()


def unet_signature(pipe) -> dict:
    config = pipe.unet.config
    signature = {"class": type(pipe.unet).__name__, "block_out_channels": list(config.block_out_channels),
                 "cross_attention_dim": config.cross_attention_dim, "in_channels": config.in_channels,
                 "sample_size": config.sample_size, "prediction_type": pipe.scheduler.config.get("prediction_type")}
    if pipe.unet.dtype != torch.float32:  # sampled in half precision (--mixed_precision): other trajectories
        signature["dtype"] = str(pipe.unet.dtype).removeprefix("torch.")
    return signature


@dataclass
class TrajectorySpec:
    """Everything that decides the trajectories; saved in manifest.json. Trajectory i of shard k has the prompt
    ``prompts[(k * batch_size + i) % len(prompts)]`` and the initial noise of seed ``seed + k * batch_size + i``.
    The ``batch_size`` trajectories of a shard share ONE guidance scale w, drawn from (seed, k) uniformly in
    ``guidance_range``, because a stock pipeline call takes one guidance scale (the official code samples one
    prompt at a time, each with its own w). ``resolution`` None: the pipeline's native size."""

    base_model: str  # the path or hub id as given
    pipeline_class: str  # type(pipe).__name__
    unet_signature: dict  # unet_signature(pipe)
    prompts_sha256: str  # prompts_sha256(prompts)
    num_trajectories: int
    guidance_range: tuple[float, float]
    steps: int  # sampler steps
    batch_size: int  # trajectories per shard (one pipeline call, one w)
    seed: int
    scheduler: str  # type(pipe.scheduler).__name__
    resolution: int | None

    def __post_init__(self):
        self.guidance_range = tuple(float(v) for v in self.guidance_range)
        check_settings(self.guidance_range, self.steps, self.num_trajectories, self.batch_size, self.resolution)

    @classmethod
    def for_pipeline(cls, pipe, base_model, prompts, *, num_trajectories: int, guidance_range, steps: int,
                     batch_size: int, seed: int = 0, resolution: int | None = None) -> "TrajectorySpec":
        # the pipeline's own size when not given, so a folder made by the CLI and by the trainer (whose preflight
        # fills in the resolution) have the same spec
        resolution = resolution or int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
        return cls(str(base_model), type(pipe).__name__, unet_signature(pipe), prompts_sha256(prompts),
                   num_trajectories, guidance_range, steps, batch_size, seed, type(pipe.scheduler).__name__,
                   resolution)

    def as_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_trajectories / self.batch_size)

    def guidance_scale(self, k: int) -> float:
        """w of shard k: depends only on (seed, k); a float32 value, so the stored w is the one the sampler used."""
        key = f"{self.seed}/agd-guidance/{k}".encode()
        g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))
        lo, hi = (torch.tensor(v, dtype=torch.float32) for v in self.guidance_range)
        return float(lo + (hi - lo) * torch.rand((), generator=g))


def shard_path(out_dir, k: int) -> Path:
    return Path(out_dir) / f"shard-{k:05d}.safetensors"


def check_folder(out_dir, fields: dict) -> None:
    """The error naming what differs when ``out_dir``'s manifest was made with other settings than ``fields`` (a
    spec's dict, or part of one: the CLI checks what it knows before loading a model)."""
    out_dir = Path(out_dir)
    try:
        saved = json.loads((out_dir / MANIFEST).read_text())["spec"]
    except FileNotFoundError:
        return
    except (ValueError, KeyError, TypeError) as e:
        raise StepdistillError(f"{out_dir / MANIFEST} does not parse ({e}); delete {out_dir} or pass another "
                               "folder") from None
    diff = [k for k, v in fields.items() if saved.get(k) != v]
    if not diff:
        return

    def describe(d):
        rest = ", ".join(f"{k}={d.get(k)}" for k in diff if k != "base_model")
        return " with ".join(([d.get("base_model")] if "base_model" in diff else []) + ([rest] if rest else []))

    made = "from" if "base_model" in diff else "with"
    raise StepdistillError(f"trajectories in {out_dir} were made {made} {describe(saved)}, not {describe(fields)}; "
                           f"pass another output folder, or delete {out_dir} to make them again")


def _timesteps(pipe, steps: int) -> list[int]:
    """The timesteps the pipeline's scheduler will visit (one UNet call each), before any sampling."""
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(steps)
    values = scheduler.timesteps.tolist()
    if any(v != int(v) for v in values):
        raise StepdistillError(f"{type(pipe.scheduler).__name__} gives fractional timesteps at {steps} steps (e.g. "
                               f"{next(v for v in values if v != int(v))}); the stored states have integer "
                               "timesteps: use timestep_spacing 'leading' or 'trailing', or DDIMScheduler")
    return [int(v) for v in values]


def _resolution(pipe, spec: TrajectorySpec) -> int:
    return spec.resolution or int(pipe.unet.config.sample_size) * pipe.vae_scale_factor


def _shapes(pipe, spec: TrajectorySpec) -> dict[str, tuple]:
    """The shape of each stored tensor per trajectory (timesteps: per shard)."""
    config, factor, resolution = pipe.unet.config, pipe.vae_scale_factor, _resolution(pipe, spec)
    if resolution % factor:
        raise StepdistillError(f"--resolution {resolution}: must be a multiple of {factor} (the VAE's downsampling)")
    steps = len(_timesteps(pipe, spec.steps))
    latent = (steps, config.in_channels, resolution // factor, resolution // factor)
    shapes = {"x_t": latent, "target": latent, "timesteps": (steps,), "w": (),
              "prompt_embeds": (pipe.tokenizer.model_max_length, config.cross_attention_dim)}
    if check_supported(type(pipe).__name__, type(pipe).__name__) == "sdxl":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        shapes.update(pooled_prompt_embeds=(pooled,), add_time_ids=(6,))
    return shapes


def estimate_bytes(pipe, spec: TrajectorySpec) -> int:
    """Disk the shards will take (float32 tensors, int64 timesteps; headers not counted), before any sampling."""
    shapes = _shapes(pipe, spec)
    per_trajectory = sum(4 * math.prod(s) for name, s in shapes.items() if name != "timesteps")
    return spec.num_trajectories * per_trajectory + spec.num_shards * 8 * shapes["timesteps"][0]


def _record(pipe, batch: int, **call) -> dict:
    """Run one stock pipeline call and return what it did: the conditional half of every UNet input and of its
    conditioning (the pipelines batch [uncond; cond]), and the model output every scheduler step takes (the CFG
    output the sampler used)."""
    rec = {"x_t": [], "t": [], "target": [], "cond": {}}

    def cpu(value):
        if value.shape[0] not in (batch, 2 * batch):
            raise StepdistillError(f"the UNet got a batch of {value.shape[0]} for {batch} prompts; expected "
                                   "[uncond; cond] (classifier-free guidance) or the prompts alone")
        return value[-batch:].detach().to("cpu", torch.float32).contiguous()

    def unet_hook(module, args, kwargs, output):
        named = dict(zip(("sample", "timestep", "encoder_hidden_states"), args), **kwargs)
        rec["x_t"].append(cpu(named["sample"]))
        rec["t"].append(int(torch.as_tensor(named["timestep"]).reshape(-1)[0]))
        added = named.get("added_cond_kwargs") or {}
        if not rec["cond"]:
            rec["cond"]["prompt_embeds"] = cpu(named["encoder_hidden_states"])
            if "text_embeds" in added:  # SDXL
                rec["cond"].update(pooled_prompt_embeds=cpu(added["text_embeds"]), add_time_ids=cpu(added["time_ids"]))

    scheduler = pipe.scheduler
    own_step, original = "step" in vars(scheduler), scheduler.step

    def step(model_output, *args, **kwargs):
        rec["target"].append(cpu(model_output))
        return original(model_output, *args, **kwargs)

    scheduler.step = step
    handle = pipe.unet.register_forward_hook(unet_hook, with_kwargs=True)
    try:
        pipe(**call)
    finally:
        handle.remove()
        if own_step:
            scheduler.step = original
        else:
            del scheduler.step
    return rec


def _make_shard(pipe, prompts: list[str], spec: TrajectorySpec, k: int, timesteps: list[int]) -> bytes:
    from safetensors.torch import save

    first = k * spec.batch_size
    n = min(spec.batch_size, spec.num_trajectories - first)
    batch_prompts = [prompts[(first + i) % len(prompts)] for i in range(n)]
    w = spec.guidance_scale(k)
    resolution = _resolution(pipe, spec)
    rec = _record(pipe, n, prompt=batch_prompts, guidance_scale=w, num_inference_steps=spec.steps, height=resolution,
                  width=resolution, output_type="latent",
                  generator=[torch.Generator().manual_seed(spec.seed + first + i) for i in range(n)])
    if rec["t"] != timesteps or len(rec["target"]) != len(timesteps):
        raise StepdistillError(f"{type(pipe).__name__} made UNet calls at {rec['t']} and {len(rec['target'])} "
                               f"scheduler steps; expected one of each per timestep {timesteps}")
    tensors = {"x_t": torch.stack(rec["x_t"], 1), "target": torch.stack(rec["target"], 1),
               "timesteps": torch.tensor(timesteps, dtype=torch.long), "w": torch.full((n,), w), **rec["cond"]}
    # one metadata entry: safetensors writes several in a random order, and a resumed shard must equal the original
    info = {"prompts": batch_prompts, "shard": k, "spec_sha256": spec.sha256()}
    return save(tensors, {"trajectories": json.dumps(info)})


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_header(path: Path) -> tuple[dict, int]:
    """A safetensors header and where the data starts; ValueError when the file is not whole."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else size
        if n > size - 8:
            raise ValueError("truncated header")
        header = json.loads(f.read(n))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise ValueError(f"{size} bytes, its header describes {8 + n + end}")
    return header, 8 + n


def _shard_problem(path: Path, spec: TrajectorySpec, k: int) -> str | None:
    """None for a complete shard of this spec, else what is wrong with it ("missing" when there is none)."""
    if not path.is_file():
        return "missing"
    try:
        meta = json.loads(_read_header(path)[0]["__metadata__"]["trajectories"])
    except (ValueError, KeyError, TypeError, IndexError) as e:
        return f"does not parse ({type(e).__name__}: {e})"
    if meta.get("spec_sha256") != spec.sha256() or meta.get("shard") != k:
        return "was made for another spec or shard"
    return None


def make_trajectories(pipe, prompts: list[str], out_dir, spec: TrajectorySpec, progress: bool = True) -> Path:
    """Sample the trajectories of ``spec`` into ``out_dir`` with the stock pipeline; a rerun resumes. Turns off the
    pipeline's own per-call progress bar (a bar over shards replaces it)."""
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    if prompts_sha256(prompts) != spec.prompts_sha256:
        raise StepdistillError("these prompts are not the ones spec.prompts_sha256 names; make the spec from them "
                               "(TrajectorySpec.for_pipeline)")
    timesteps, estimate = _timesteps(pipe, spec.steps), estimate_bytes(pipe, spec)
    if (out_dir / MANIFEST).is_file():
        check_folder(out_dir, spec.as_dict())
    else:
        stray = sorted(out_dir.glob("shard-*.safetensors"))
        if stray:
            raise StepdistillError(f"{stray[0]} has no {MANIFEST} beside it, so nothing says what made it; delete "
                                   f"the shards in {out_dir} or pass another output folder")
        out_dir.mkdir(parents=True, exist_ok=True)
        manifest = {"spec": spec.as_dict(), "estimated_bytes": estimate}
        _write_atomic(out_dir / MANIFEST, json.dumps(manifest, indent=2).encode())
    logger.info("%d trajectories x %d steps -> about %.1f MB in %s", spec.num_trajectories, len(timesteps),
                estimate / 1e6, out_dir)
    todo = []
    for k in range(spec.num_shards):
        problem = _shard_problem(shard_path(out_dir, k), spec, k)
        if problem not in (None, "missing"):
            logger.warning("%s %s; making it again", shard_path(out_dir, k), problem)
        todo += [k] if problem else []
    if len(todo) < spec.num_shards:
        logger.info("reusing %d of %d shards in %s", spec.num_shards - len(todo), spec.num_shards, out_dir)
    pipe.set_progress_bar_config(disable=True)
    with tqdm(total=spec.num_shards, initial=spec.num_shards - len(todo), disable=not progress,
              desc="trajectory shards", unit="shard") as bar:
        for k in todo:
            _write_atomic(shard_path(out_dir, k), _make_shard(pipe, prompts, spec, k, timesteps))
            bar.update()
    return out_dir


def load_states(out_dir, spec: TrajectorySpec | None = None) -> "TrajectoryStates":
    """The states of a complete trajectory folder (checked against ``spec`` when given)."""
    out_dir = Path(out_dir)
    if not (out_dir / MANIFEST).is_file():
        raise StepdistillError(f"{out_dir} has no {MANIFEST}: not a trajectory folder; make one with `stepdistill "
                               "agd trajectories`")
    if spec is not None:
        check_folder(out_dir, spec.as_dict())
    spec = TrajectorySpec(**json.loads((out_dir / MANIFEST).read_text())["spec"])
    problems = [(k, _shard_problem(shard_path(out_dir, k), spec, k)) for k in range(spec.num_shards)]
    missing = [k for k, p in problems if p == "missing"]
    if missing:
        raise StepdistillError(f"{out_dir}: {len(missing)} of {spec.num_shards} shards are missing (first: "
                               f"{shard_path(out_dir, missing[0]).name}); rerun the generation with the same "
                               "settings: it resumes and makes only the missing ones")
    for k, problem in problems:
        if problem:
            raise StepdistillError(f"{shard_path(out_dir, k)} {problem}; rerun the generation with the same settings: "
                                   "it makes that shard again")
    return TrajectoryStates(spec, [shard_path(out_dir, k) for k in range(spec.num_shards)])


class TrajectoryStates:
    """The (trajectory, step) states of a trajectory folder, read from the shards as they are asked for (each is
    memory-mapped, privately and without holding a file descriptor). State index = trajectory * steps + step,
    trajectories in shard order."""

    def __init__(self, spec: TrajectorySpec, paths: list[Path]):
        self.spec, self._shards = spec, []
        for path in paths:
            header, start = _read_header(path)
            raw = torch.from_file(str(path), shared=False, size=path.stat().st_size, dtype=torch.uint8)
            self._shards.append({name: raw[start + begin:start + end].view(DTYPES[info["dtype"]]).view(info["shape"])
                                 for name, info in header.items() if name != "__metadata__"
                                 for begin, end in [info["data_offsets"]]})
        self.steps = len(self._shards[0]["timesteps"])

    def __len__(self) -> int:
        return self.spec.num_trajectories * self.steps

    def get(self, index: torch.Tensor) -> dict:
        index = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        if len(index) and not (0 <= int(index.min()) and int(index.max()) < len(self)):
            raise IndexError(f"state indices must be in [0, {len(self)})")
        trajectory, step = index // self.steps, index % self.steps
        shard, row = trajectory // self.spec.batch_size, trajectory % self.spec.batch_size
        out = {}
        for k in shard.unique().tolist():
            where = (shard == k).nonzero().squeeze(1)
            data, r, s = self._shards[k], row[where], step[where]
            part = {name: data[name][r] for name in PER_TRAJECTORY if name in data}
            part.update(x_t=data["x_t"][r, s], target=data["target"][r, s], t=data["timesteps"][s])
            for name, value in part.items():
                if name not in out:
                    out[name] = value.new_empty((len(index),) + tuple(value.shape[1:]))
                out[name][where] = value
        return out
