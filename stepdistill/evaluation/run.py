"""``stepdistill eval``: generate (or resume) the images of a base pipeline or a stepdistill output, score them with
the chosen metrics and write ``metrics.json``.

Every input is checked before the pipeline runs, so a typo costs seconds, not an hour of sampling. Images are
written as ``images/{i:05d}.png`` as they are made and image i always uses seed ``seed + i`` in a fixed batch, so an
interrupted run resumes to exactly the files an uninterrupted one writes.

Launched with several processes (``torchrun --nproc_per_node N`` or ``accelerate launch``), the missing batches are
dealt out among them (:mod:`.shard`): each process writes the images it generated, scores its share of the batches,
and the main process gathers the per-batch features, feeds them to the metrics in batch order (the order of one
process, so the numbers are those of one process) and alone writes ``generation.json``, ``grid.png`` and
``metrics.json``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm

from ..errors import StepdistillError
from ..recipe import Recipe
from ..teacher import check_pipeline
from .captions import prompt_source
from .images import IMAGES_DIR, canonical_preprocess, image_path, load_images, save_png, write_eval_grid
from .pipeline import device_name, prepare_pipeline, sampler_settings, scheduler_class
from .protocol import GENERATION_NAME, METRICS_NAME, fingerprint, protocol_record, read_generation
from .registry import Metric, metrics
from .sampler import Sampler
from .shard import Shard

logger = logging.getLogger(__name__)
COUNTS = ("generated_images", "unet_samples", "generation_seconds")


def normalise_metrics(values: Sequence[str]) -> list[str]:
    known = metrics()
    chosen = [m.strip().lower() for v in values for m in str(v).split(",") if m.strip()]
    unknown = [m for m in chosen if m not in known]
    if unknown or not chosen:
        raise StepdistillError(f"--metrics {' '.join(values)}: unknown {', '.join(unknown) or 'empty list'}; "
                               f"choose from {', '.join(known)}")
    return list(dict.fromkeys(chosen))


def _write_json(path: Path, value: dict) -> None:
    # write then rename: an interruption never leaves a truncated file a resume would fail to read
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


def _merged(state: dict, parts: list[dict], num_processes: int) -> dict:
    """``generation.json`` after this run: the earlier runs' counts plus every process's own."""
    out = dict(state)
    for part in parts:
        for key in COUNTS:
            out[key] += part[key]
        if out["timesteps"] is None:
            out["timesteps"] = part["timesteps"]
    if any(part["generated_images"] for part in parts):
        out["num_processes"] = num_processes
    return out


def _generate_missing(pipe, call_kwargs: dict, prompts: list[str], todo: list[range], args, output_dir: Path,
                      state: dict, shard: Shard) -> dict:
    """Generate this process's share of ``todo`` and write its images; returns ``generation.json`` (on the main
    process: with every process's counts; elsewhere: this process's only)."""
    sampler = Sampler(pipe, call_kwargs)
    mine = shard.split(todo)
    own = {"generated_images": 0, "unet_samples": 0, "generation_seconds": 0.0, "timesteps": None}
    bar = tqdm(total=sum(len(b) for b in mine), desc="generating", unit="img",
               disable=args.no_progress or not shard.is_main)
    for batch in mine:
        before = sampler.counter.samples
        start = time.perf_counter()
        images = sampler([prompts[i] for i in batch], [args.seed + i for i in batch])
        own["generation_seconds"] += time.perf_counter() - start
        own["unet_samples"] += sampler.counter.samples - before
        own["generated_images"] += len(batch)
        if own["timesteps"] is None:
            own["timesteps"] = [int(t) if float(t).is_integer() else round(float(t), 4)
                                for t in pipe.scheduler.timesteps.tolist()]
        for i, image in zip(batch, images):
            if not image_path(output_dir, i).is_file():
                save_png(image, image_path(output_dir, i))
        if shard.is_main:
            # after the images, so the counts never claim images an interruption lost (the other processes'
            # counts join at the end)
            _write_json(output_dir / GENERATION_NAME, _merged(state, [own], shard.num_processes))
        bar.update(len(batch))
    bar.close()
    parts = shard.gather(own)
    if not shard.is_main:
        return _merged(state, [own], shard.num_processes)
    state = _merged(state, parts, shard.num_processes)
    _write_json(output_dir / GENERATION_NAME, state)
    return state


def _score(args, output_dir: Path, prompts: list[str], batches: list[range], scorers: dict[str, Metric],
           shard: Shard) -> dict | None:
    """Scores streamed from the written files, so a resumed run scores exactly what an uninterrupted one does.

    A metric with ``features``/``add_features`` has its per-batch features computed by the process that owns the
    batch, gathered, and added on the main process in batch order; one with ``update`` only is fed there from the
    files. Returns the scores on the main process, ``None`` elsewhere."""
    sharded = {n: s for n, s in scorers.items() if hasattr(s, "features") and hasattr(s, "add_features")}
    rest = {n: s for n, s in scorers.items() if n not in sharded}
    local: dict[int, dict[str, Any]] = {}
    mine = shard.split(range(len(batches))) if sharded else []
    for k in tqdm(mine, desc="scoring", unit="batch", disable=args.no_progress or not shard.is_main):
        images = load_images([image_path(output_dir, i) for i in batches[k]])
        local[k] = {n: s.features(images, [prompts[i] for i in batches[k]]) for n, s in sharded.items()}
    parts = shard.gather(local)
    if not shard.is_main:
        return None
    features = {k: v for part in parts for k, v in part.items()}
    for k, batch in enumerate(batches):
        batch_prompts = [prompts[i] for i in batch]
        for name, scorer in sharded.items():
            scorer.add_features(features[k][name], batch_prompts)
        if rest:
            images = load_images([image_path(output_dir, i) for i in batch])
            for scorer in rest.values():
                scorer.update(images, batch_prompts)
    result: dict[str, Any] = {}
    for scorer in scorers.values():
        result.update(scorer.compute())
    return result


def _lora_context_width(weights: Path) -> int | None:
    """The text-embedding width a LoRA's cross-attention key projections take (read from the file's header)."""
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        widths = {f.get_slice(k).get_shape()[1] for k in f.keys() if ".attn2.to_k." in k and "lora_A" in k}
    return widths.pop() if len(widths) == 1 else None


def check_student_fits(student: str, recipe: Recipe, base_model: str) -> None:
    """A student and the base pipeline it is applied to (``--pretrained_model_name_or_path``, in place of the
    recipe's base model) are of one family and text width: an SDXL LoRA does not go into an SD 1.5 pipeline.
    Configs and the LoRA file's header only; nothing loads."""
    import json

    from ..export import _FAMILY_NAMES, base_model_family
    from ..lora import LORA_WEIGHTS_NAME
    from ..preflight import _component_config

    fix = (f"pass a base model of the student's family, or drop --pretrained_model_name_or_path to use its own "
           f"({recipe.base_model})")
    want, have = base_model_family(recipe.base_model), base_model_family(base_model)
    if want and have and want != have:
        raise StepdistillError(f"--student {student} was trained on an {_FAMILY_NAMES[want]} model, but "
                               f"--pretrained_model_name_or_path {base_model} is an {_FAMILY_NAMES[have]} pipeline; "
                               f"{fix}")
    weights = Path(student) / LORA_WEIGHTS_NAME
    if recipe.adapter != "lora" or not weights.is_file():
        return
    try:
        width = _lora_context_width(weights)
        unet_width = _component_config(base_model, "unet").get("cross_attention_dim")
    except (OSError, json.JSONDecodeError, StepdistillError):
        return  # unreadable here: loading says what is wrong
    if width is not None and isinstance(unet_width, int) and width != unet_width:
        raise StepdistillError(f"--student {student}: its LoRA takes text embeddings of width {width}, the UNet of "
                               f"--pretrained_model_name_or_path {base_model} gives {unet_width}; {fix}")


def run_eval(args) -> dict:
    """Generate (or resume) the images, score them and write ``metrics.json``; returns its content (on every process
    of a sharded run)."""
    args.metrics = normalise_metrics(args.metrics)
    args._run_state = {}  # what this run's metrics share (registry.run_state); never carried over from another run
    args.preprocess = canonical_preprocess(args.preprocess)
    specs = [spec for name, spec in metrics().items() if name in args.metrics]  # in registration order
    device = device_name(args.device)

    # ---- every check that can fail comes before the pipeline runs
    recipe = Recipe.load(args.student) if args.student else None
    base_model = args.pretrained_model_name_or_path or (recipe.base_model if recipe else None)
    if base_model is None:
        raise StepdistillError("no base model: pass --pretrained_model_name_or_path (or a --student whose recipe "
                               "names one)")
    base_model = str(base_model)
    check_pipeline(base_model)  # a folder or a hub id (in the cache when offline), a supported pipeline class
    settings = sampler_settings(args, recipe)
    if settings.scheduler:
        scheduler_class(settings.scheduler)

    prompts_all, prompt_info = prompt_source(args)
    num_images = args.num_images if args.num_images is not None else len(prompts_all)
    if args.batch_size < 1:
        raise StepdistillError(f"--batch_size {args.batch_size}: must be at least 1")
    least = max(spec.min_images for spec in specs)
    if least > 1 and num_images < least:
        raise StepdistillError(f"--num_images {num_images}: FID needs at least {least} images (thousands for a "
                               "meaningful number)")
    if num_images < 1:
        raise StepdistillError(f"--num_images {num_images}: must be at least 1")
    prompt_info["cycled"] = num_images > len(prompts_all)
    prompts = [prompts_all[i % len(prompts_all)] for i in range(num_images)]
    args.num_images = num_images  # resolved, for the metrics' own checks (e.g. KID's subset size)

    if args.resolution is not None:  # checked against the VAE and UNet configs, not found at the first call
        from ..preflight import model_resolution

        model_resolution(base_model, args.resolution)
    if recipe is not None and args.pretrained_model_name_or_path:
        check_student_fits(args.student, recipe, base_model)
    output_dir = Path(args.output_dir)
    previous = read_generation(output_dir)
    if previous is None and (output_dir / IMAGES_DIR).is_dir() and any((output_dir / IMAGES_DIR).glob("*.png")):
        raise StepdistillError(f"--output_dir {output_dir}: holds images but no {GENERATION_NAME}, so they cannot "
                               "be resumed safely; use an empty directory")
    from ..preflight import check_output_dir

    check_output_dir(str(output_dir), create=False)  # a refused run leaves no folder behind

    shard = Shard()  # after the input checks: a typo fails every process alike before any rendezvous
    if not {"fid", "kid"} & set(args.metrics) and (args.reference_dir or args.reference_stats) and shard.is_main:
        logger.warning("a FID/KID reference was given but --metrics has neither fid nor kid; it is ignored")
    # the metrics check their own inputs (references, CLIP model) before loading their networks
    scorers = {spec.name: spec.factory(args, base_model, shard.device(device)) for spec in specs}

    pipe, call_kwargs = prepare_pipeline(args, base_model, recipe, settings, shard.device(device))
    fp = fingerprint(args, base_model, Path(base_model).exists(), pipe, call_kwargs, prompt_info["sha256"])
    if previous is not None and previous.get("fingerprint") != fp:
        changed = sorted(k for k in fp if previous.get("fingerprint", {}).get(k) != fp[k])
        raise StepdistillError(f"--output_dir {output_dir}: holds images of another run (differs in "
                               f"{', '.join(changed)}); use a new --output_dir or delete it")
    if previous is not None and previous.get("batch_size") != args.batch_size and shard.is_main:
        logger.warning("resuming with --batch_size %d instead of %s: images may differ in the last bits",
                       args.batch_size, previous.get("batch_size"))

    # ---- generation (resumable, dealt out among the processes), then scoring
    state = previous or {"fingerprint": fp, "generated_images": 0, "unet_samples": 0,
                         "generation_seconds": 0.0, "timesteps": None}
    state["batch_size"] = args.batch_size
    batches = [range(s, min(s + args.batch_size, num_images)) for s in range(0, num_images, args.batch_size)]
    # a batch with any image missing is redone whole, so every image is computed in the same batch as before
    todo = [b for b in batches if not all(image_path(output_dir, i).is_file() for i in b)]
    shard.barrier()  # every process has read the directory before any writes to it
    if shard.is_main:
        (output_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
        _write_json(output_dir / GENERATION_NAME, state)  # before any image, so an interrupted run can resume
    shard.barrier()
    state = _generate_missing(pipe, call_kwargs, prompts, todo, args, output_dir, state, shard)
    shard.barrier()  # every image is on disk before any process scores
    result = _score(args, output_dir, prompts, batches, scorers, shard)
    if shard.is_main:
        grid = write_eval_grid(output_dir, num_images)
        result["protocol"] = protocol_record(
            args, num_images=num_images, prompt_info=prompt_info, scorers=scorers, fingerprint=fp, recipe=recipe,
            settings=settings, state=state, call_kwargs=call_kwargs, device=device, output_dir=output_dir,
            grid=grid)
        _write_json(output_dir / METRICS_NAME, result)
    return shard.broadcast(result)
