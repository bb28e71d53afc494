"""The one training loop every method runs in: Accelerate underneath (DDP, mixed precision; FSDP2 for full networks
through an accelerate config: stepdistill/fsdp.py), gradient accumulation, atomic resumable checkpoints, a progress
bar with the losses, JSONL and tracker logging, validation grids, and the final Diffusers-loadable output."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import torch

from . import fsdp
from .checkpoint import (SHARDED_FORMAT, checkpoint_format, list_checkpoints, load_checkpoint,
                         load_checkpoint_weights, load_sharded_checkpoint, load_unsharded_into_sharded,
                         load_weights_any, remove_stale_temporaries, resolve_checkpoint, save_checkpoint,
                         save_sharded_checkpoint)
from .data import build_dataset, serve
from .errors import Preempted, StepdistillError, TrainingStopped
from .methods.base import PhaseContext
from .lora import trainable_state_dict
from .precision import enable_tf32, keep_trainable_in_float32, optimizer_class, weight_dtype
from .randomness import StepRandom
from .preflight import preflight
from .teacher import Teacher

logger = logging.getLogger("stepdistill")


def _lr_scheduler(config, optimizer, total: int):
    """The schedule of one network over its ``total`` updates (options checked by preflight.check_lr_schedule)."""
    from diffusers.optimization import get_scheduler

    extra = {k: v for k, v in (("num_cycles", config.lr_num_cycles), ("power", config.lr_power)) if v is not None}
    return get_scheduler(config.lr_scheduler, optimizer, step_rules=config.lr_step_rules,
                         num_warmup_steps=config.lr_warmup_steps, num_training_steps=total, **extra)


class Trainer:
    """``keep`` (caption → bool), when given, trains on a part of the data only (an MSD student's part): its samples,
    and the validation prompts it accepts."""

    def __init__(self, config, method_cls, keep=None):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        preflight(config, method_cls)
        self.resolution = config.resolution  # set and checked by preflight
        self.keep = keep
        # opened (columns, first sample, image headers) before any weights load, and before the accelerator logs
        # anything, so bad data is one line; streamed sources are not read
        self.dataset = build_dataset(config, self.resolution, need_images=method_cls.requires_images(config),
                                     keep=keep)
        self.config = config
        self.method_cls = method_cls
        from accelerate.state import AcceleratorState

        # one process may run several trainings (tests, the demo): each picks its own precision
        AcceleratorState._reset_state(reset_partial_state=False)
        # Accelerate picks MULTI_CPU (gloo) for a torchrun/mpirun launch only when told to use the CPU
        multi_process_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
        fsdp_plugin = fsdp.launch_plugin()  # None unless an FSDP launch
        self.accelerator = Accelerator(
            cpu=multi_process_cpu, mixed_precision=config.mixed_precision, log_with=config.report_to,
            project_config=ProjectConfiguration(project_dir=config.output_dir, logging_dir=config.output_dir),
            fsdp_plugin=fsdp_plugin,
        )
        acc = self.accelerator
        self.fsdp = fsdp.activate(acc, fsdp_plugin)  # the networks are sharded (FSDP2)
        self.output_dir = Path(config.output_dir)
        if acc.is_main_process:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
        logger.info("distributed: %s, %d process%s", getattr(acc.distributed_type, "value", acc.distributed_type),
                    acc.num_processes, "" if acc.num_processes == 1 else "es")

        if config.allow_tf32:
            enable_tf32()
        # mixed precision (stepdistill/precision.py): the frozen networks in fp16/bf16, trainable ones in float32
        self.weight_dtype = weight_dtype(acc.mixed_precision)
        self.teacher = Teacher.for_config(config, self.weight_dtype, acc.device)
        torch.manual_seed(config.seed)
        self.method = method_cls(config, self.teacher, keep=keep)
        keep_trainable_in_float32(self.method)
        if config.gradient_checkpointing:
            for net in self.method.networks.values():
                if hasattr(net, "enable_gradient_checkpointing"):
                    net.enable_gradient_checkpointing()
        self._cache_prompts()
        self.data = serve(config, self.dataset, acc.process_index, acc.num_processes,
                          encode=self._encode_latents if config.cache_latents else None,
                          main=acc.is_main_process, barrier=acc.wait_for_everyone)

        # wrapped: each network as the accelerator prepared it (DDP in distributed runs); methods only ever see the
        # wrapped module of the phase they compute (PhaseContext.trained)
        self.optimizers, self.schedulers, self.params, self.wrapped = {}, {}, {}, {}
        for name, net in self.method.networks.items():
            params = self.method.trainable_parameters(name)
            opt = optimizer_class(config)(params, lr=self.method.learning_rate(name),
                                          **self.method.optimizer_kwargs(name))
            updates = self._updates_of(name)
            self.schedulers[name] = _lr_scheduler(config, opt, updates)
            wrapped, self.optimizers[name] = acc.prepare(net, opt)
            self.wrapped[name] = wrapped
            # FSDP2 shards the module in place (wrapped is net) with new, sharded parameters: the optimizer's
            self.params[name] = fsdp.sharded_params(name, wrapped, self.optimizers[name]) if self.fsdp else params
        if self.fsdp:
            fsdp.shard_copies(acc, self.method.ema_copies())
        self.step = 0
        self.saved_step = None  # the step of the checkpoint on disk that this run wrote or resumed from
        self.nan_skips = 0  # updates dropped by --on_nan skip in this run
        self._sigterm = False  # set by the SIGTERM handler; acted on at the next step boundary
        self.log_file = self.output_dir / "logs.jsonl"
        resume = resolve_checkpoint(config.output_dir, config.resume_from_checkpoint, method_cls.name)
        if resume is not None:
            self._restore(resume)
            self.saved_step = self.step
        elif config.init_from_checkpoint:
            self._init_from(Path(config.init_from_checkpoint))
        self._trim_log()
        if acc.is_main_process:
            for path in remove_stale_temporaries(self.output_dir):
                logger.info("removed %s: a checkpoint save that never finished", path)
        if config.report_to and acc.is_main_process:
            acc.init_trackers(config.tracker_project_name or f"stepdistill-{method_cls.name}",
                              config={k: v for k, v in vars(config).items() if isinstance(v, (int, float, str, bool))})

    def _trim_log(self) -> None:
        """Keep only the log lines of steps this run has (a resumed run re-logs what came after its checkpoint;
        a fresh run starts an empty log)."""
        if not self.accelerator.is_main_process or not self.log_file.is_file():
            return
        lines = [line for line in self.log_file.read_text().splitlines()
                 if line.strip() and json.loads(line)["step"] <= self.step]
        self.log_file.write_text("".join(line + "\n" for line in lines))

    def _updates_of(self, name: str) -> int:
        return sum(name in self.method.phases(s) for s in range(self.config.max_train_steps)) or 1

    # ------------------------------------------------------------------ caching
    def _cache_prompts(self) -> None:
        """Encode every distinct caption once, up front (bounded, so huge caption sets stay lazy; streamed data:
        encoded as they come, through the teacher's LRU)."""
        captions = [] if self.dataset.streamed else list(dict.fromkeys(self.dataset.captions))
        extra = list(self.config.validation_prompts or [])
        if len(captions) <= 20_000:
            for i in range(0, len(captions), 256):
                self.teacher.encode_prompt(captions[i:i + 256], self.resolution)
        self.teacher.encode_prompt([""] + extra, self.resolution)

    def _encode_latents(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std = self.teacher.latent_dist(images.to(self.accelerator.device))
        return mean.cpu(), std.cpu()

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self) -> None:
        """Write checkpoint-STEP (atomically: a temporary folder renamed into place). A full disk or another
        write error removes the temporary, keeps the previous checkpoints and stops the run on every process
        (TrainingStopped: one line naming the kept checkpoint and how to resume)."""
        if self.saved_step == self.step:  # already on disk (saved or resumed at this step)
            return
        acc = self.accelerator
        acc.wait_for_everyone()
        failure = None
        try:
            self._write_checkpoint()
        except OSError as e:  # under FSDP DCP raises on every process; without it, the main process alone writes
            failure = e
        if self._any_process(failure is not None):
            raise TrainingStopped(self._write_failure(f"checkpoint-{self.step}", failure))
        self.saved_step = self.step
        acc.wait_for_everyone()

    def _write_failure(self, what: str, failure: OSError | None) -> str:
        """The one-line message of a failed write: the cause (a full disk said so), what is kept, how to go on."""
        if failure is None:
            cause = "another process failed to write it"
        elif failure.errno in (errno.ENOSPC, errno.EDQUOT):
            cause = f"the disk is full ({failure.strerror or 'no space left on device'})"
        else:
            cause = f"{type(failure).__name__}: {failure}"
        kept = list_checkpoints(self.output_dir)
        if kept:
            keep = f"{kept[-1].name} is the last complete checkpoint, kept"
            fix = "free space (or fix the cause), then run again with --resume_from_checkpoint latest"
        else:
            keep = "there is no complete checkpoint yet"
            fix = "free space (or fix the cause), then start the run again"
        return (f"could not write {what} in {self.output_dir} at step {self.step}: {cause}; nothing of it was kept; "
                f"{keep}; {fix}")

    def _write_checkpoint(self) -> None:
        acc = self.accelerator
        if self.fsdp:  # every process writes its shards
            path = save_sharded_checkpoint(
                self.output_dir, self.step, method=self.method_cls.name, networks=self.method.networks,
                optimizers=self.optimizers, schedulers=self.schedulers, copies=self.method.ema_copies(),
                total_limit=self.config.checkpoints_total_limit, is_main=acc.is_main_process,
                barrier=acc.wait_for_everyone, num_processes=acc.num_processes)
            logger.info("saved %s (sharded, %d processes)", path, acc.num_processes)
        elif acc.is_main_process:
            modules = {name: trainable_state_dict(acc.unwrap_model(w)) for name, w in self.wrapped.items()}
            modules.update(self.method.extra_state())
            path = save_checkpoint(self.output_dir, self.step, method=self.method_cls.name, modules=modules,
                                   optimizers=self.optimizers, schedulers=self.schedulers,
                                   total_limit=self.config.checkpoints_total_limit)
            logger.info("saved %s", path)

    def _save_snapshot(self) -> None:
        """The complete output as it stands (``snapshots/step-N``), written atomically: a folder that exists is
        whole."""
        final = self.output_dir / "snapshots" / f"step-{self.step:06d}"
        tmp = final.with_name(final.name + ".tmp")
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        failure = None
        try:
            self._write_output(tmp)
        except OSError as e:
            failure = e
            shutil.rmtree(tmp, ignore_errors=True)
        if self._any_process(failure is not None):
            raise TrainingStopped(self._write_failure(f"the output snapshot {final.name}", failure))
        if self.accelerator.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            logger.info("output snapshot: %s", final)

    def _write_output(self, folder: Path) -> None:
        """The method's output files in ``folder``, written by the main process (under FSDP every process first
        takes part in gathering the full weights)."""
        if self.fsdp:
            fsdp.save_full_output(self.method, folder, self.accelerator.is_main_process)
        elif self.accelerator.is_main_process:
            self.method.save_output(folder)

    def _write_final_output(self) -> None:
        """The output files in output_dir, all or none: written into a temporary folder there (the model card finds
        samples/ through a link), then moved into place entry by entry. A failed write (a full disk) removes the
        temporary, writes nothing of the output and stops the run on every process (TrainingStopped); the
        checkpoint of the last step stays, and resuming from it writes the output."""
        acc = self.accelerator
        tmp = self.output_dir / ".output.tmp"  # one name for every process (under FSDP all take part)
        failure = None
        try:
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                samples = self.output_dir / "samples"
                if samples.is_dir():
                    (tmp / "samples").symlink_to(samples.resolve(), target_is_directory=True)
            self._write_output(tmp)
        except OSError as e:
            failure = e
        if acc.is_main_process:
            if (tmp / "samples").is_symlink():
                (tmp / "samples").unlink()
            if failure is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        if self._any_process(failure is not None):
            raise TrainingStopped(self._write_failure("the output", failure))
        if acc.is_main_process:
            for entry in sorted(tmp.iterdir()):
                dest = self.output_dir / entry.name
                if dest.is_dir() and not dest.is_symlink():
                    shutil.rmtree(dest)
                os.replace(entry, dest)
            tmp.rmdir()

    def _restore(self, path: Path) -> None:
        if self.fsdp or checkpoint_format(path) == SHARDED_FORMAT:
            # a sharded checkpoint reshards to any process count, with or without FSDP; an unsharded one is read
            # whole by every FSDP process, which keeps its shards
            load = load_unsharded_into_sharded if checkpoint_format(path) != SHARDED_FORMAT \
                else load_sharded_checkpoint
            self.step = load(path, networks=self.method.networks, optimizers=self.optimizers,
                             schedulers=self.schedulers, copies=self.method.ema_copies())
            logger.info("resumed from %s at step %d", path, self.step)
            return
        step, modules, _ = load_checkpoint(path, optimizers=self.optimizers, schedulers=self.schedulers)
        for name, net in self.method.networks.items():
            missing = set(trainable_state_dict(net)) - set(modules[name])
            if missing:
                raise StepdistillError(f"{path}: checkpoint lacks {len(missing)} trainable tensors of {name} "
                                       "(a different LoRA rank or model?)")
            net.load_state_dict(modules[name], strict=False)
        self.method.load_extra_state({k: v for k, v in modules.items() if k not in self.method.networks})
        self.step = step
        logger.info("resumed from %s at step %d", path, step)

    def _init_from(self, path: Path) -> None:
        """The networks' weights of another run's checkpoint (same method, same shapes), nothing else of it."""
        if self.fsdp or checkpoint_format(path) == SHARDED_FORMAT:
            kept = load_weights_any(path, networks=self.method.networks, copies=self.method.ema_copies())
            for name, fresh in kept.items():
                logger.info("%s: weights from %s%s", name, path, f", {fresh} tensors kept at their initialisation"
                            if fresh else "")
            return
        modules = load_checkpoint_weights(path)
        missing = [k for k in self.method.ema_copies() if k not in modules]
        if missing:
            raise StepdistillError(f"--init_from_checkpoint {path}: the checkpoint has no {', '.join(missing)}; "
                                   "start the EMA in the run that writes the checkpoint, or drop it")
        for name, net in self.method.networks.items():
            own, saved = trainable_state_dict(net), modules.get(name, {})
            foreign = sorted(k for k in saved if k not in own or saved[k].shape != own[k].shape)
            if foreign:
                raise StepdistillError(f"--init_from_checkpoint {path}: {len(foreign)} tensors of {name} do not fit "
                                       f"this run (e.g. {foreign[0]}): another model, LoRA rank or student shape")
            net.load_state_dict(saved, strict=False)
            fresh = len(set(own) - set(saved))
            logger.info("%s: %d tensors from %s%s", name, len(saved), path,
                        f", {fresh} kept at their initialisation" if fresh else "")
        self.method.load_extra_state({k: v for k, v in modules.items() if k not in self.method.networks})

    # ------------------------------------------------------------------ the loop
    def train(self) -> Path:
        """Train to ``max_train_steps``, save the last checkpoint and write the output. SIGTERM (pre-emption)
        saves a checkpoint of the current step at the next step boundary and raises Preempted instead; a NaN/inf
        loss or a failed save raises TrainingStopped (see ``--on_nan``)."""
        previous = self._catch_sigterm()
        self._bar = None
        try:
            return self._train()
        finally:
            if self._bar is not None:
                self._bar.close()  # ends its line before an error's message
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    def _catch_sigterm(self):
        """Install the SIGTERM handler (main thread only: Python's rule for signal handlers); returns the handler
        it replaced, or None. The handler only sets a flag, and stays: a repeated SIGTERM does not cut the save
        short. Schedulers that signal every process of a job (SLURM's scancel) reach a torchrun worker twice, once
        directly and once forwarded by the launcher, within the same second. SIGINT (Ctrl-C) and SIGKILL still end
        the run at once."""
        if threading.current_thread() is not threading.main_thread():
            return None
        previous = signal.getsignal(signal.SIGTERM)

        def on_sigterm(signum, frame):
            if self._sigterm:
                logger.warning("SIGTERM again: the checkpoint of this step is being saved; SIGKILL stops at once")
            self._sigterm = True

        signal.signal(signal.SIGTERM, on_sigterm)
        return previous if previous is not None else signal.SIG_DFL

    def _any_process(self, *flags: bool) -> bool | list[bool]:
        """Whether any process raised each flag (one collective under distributed runs, so that every process
        takes the same decision)."""
        values = [bool(f) for f in flags]
        if self.accelerator.num_processes > 1:
            t = torch.tensor([float(v) for v in values], device=self.accelerator.device)
            values = [v > 0 for v in self.accelerator.reduce(t, reduction="sum").tolist()]
        return values[0] if len(values) == 1 else values

    @staticmethod
    def _first_non_finite(out) -> str | None:
        """The first loss term of a phase's output that is NaN or inf, as 'name = value', or None: every logged
        term, then the loss the phase back-propagates."""
        terms = list(out.logs.items()) + [("the total loss", out.loss)]
        for name, value in terms:
            try:
                v = float(value.detach().float().sum()) if torch.is_tensor(value) else float(value)
            except (TypeError, ValueError):
                continue
            if not math.isfinite(v):
                return f"{name} = {v}"
        return None

    def _preempt(self, bar) -> None:
        """SIGTERM seen by some process: checkpoint this step on every process, say how to resume, stop."""
        bar.close()
        self._save_checkpoint()
        path = self.output_dir / f"checkpoint-{self.step}"
        logger.warning("SIGTERM: saved %s at step %d of %d; the run is not finished and its output was not "
                       "written: resume with --resume_from_checkpoint latest (same --output_dir)", path, self.step,
                       self.config.max_train_steps)
        self.accelerator.end_training()
        raise Preempted(f"stopped by SIGTERM at step {self.step}: resume from {path}", checkpoint=path)

    def _train(self) -> Path:
        from tqdm.auto import tqdm

        acc, config, method = self.accelerator, self.config, self.method
        accum = config.gradient_accumulation_steps
        bar = self._bar = tqdm(total=config.max_train_steps, initial=self.step, desc=method.name,
                               disable=not acc.is_main_process, dynamic_ncols=True)
        last = time.time()
        stop = False  # SIGTERM on some process, as agreed by all at the last check
        while self.step < config.max_train_steps:
            logs: dict[str, float] = {}
            skipped: list[str] = []  # phases whose update --on_nan skip dropped
            handoffs: list[dict] = [{} for _ in range(accum)]  # per micro-batch: what earlier phases handed over
            for phase in method.phases(self.step):
                if self.fsdp:
                    fsdp.drop_stray_grads(self.params[phase])
                bad = None  # the first non-finite loss term of this phase on this process
                phase_logs: dict[str, float] = {}
                for micro in range(accum):
                    iteration = self.step * accum + micro
                    ctx = self._context(phase, iteration, handoffs[micro])
                    sync = micro == accum - 1
                    no_sync = acc.no_sync(self.wrapped[phase]) if not sync else contextlib.nullcontext()
                    with no_sync, acc.autocast():
                        out = method.loss(ctx)
                        loss = out.loss if acc.num_processes == 1 or self.fsdp \
                            else self._touch_every_parameter(out.loss, phase)
                        # inputs=: gradients reach only this phase's network (a generator loss that flows through
                        # the fake score must not leave gradients on the fake score); under FSDP see
                        # fsdp.drop_stray_grads
                        acc.backward(loss / accum, **({} if self.fsdp else {"inputs": self.params[phase]}))
                    handoffs[micro].update(out.handoff)
                    bad = bad or self._first_non_finite(out)
                    for k, v in out.logs.items():
                        phase_logs[k] = phase_logs.get(k, 0.0) + float(v) / accum
                # every process takes the same decision: a NaN on one poisons the averaged gradients of all;
                # the SIGTERM flag rides along (SIGTERM may reach some processes only)
                poisoned, stop = self._any_process(bad is not None, self._sigterm)
                if poisoned:
                    self._on_non_finite(phase, bad)
                    self.optimizers[phase].zero_grad(set_to_none=True)
                    skipped.append(phase)
                    continue
                for k, v in phase_logs.items():
                    logs[k] = logs.get(k, 0.0) + v
                if config.max_grad_norm:  # the norm before clipping, logged per network
                    clip = (lambda p, n: fsdp.clip_grad_norm_(acc, p, n)) if self.fsdp else acc.clip_grad_norm_
                    logs[f"grad_norm_{phase}"] = float(clip(self.params[phase], config.max_grad_norm))
                self.optimizers[phase].step()
                self.schedulers[phase].step()
                self.optimizers[phase].zero_grad(set_to_none=True)
                method.after_update(phase, self.step)
                logs[f"lr_{phase}"] = self.schedulers[phase].get_last_lr()[0]
            self.step += 1
            logs = self._reduce(logs)
            if config.on_nan == "skip":
                logs["nan_skips"] = self.nan_skips  # in this run so far
            if skipped:
                logger.warning("step %d: skipped the update of %s (non-finite loss; %d of at most %d skips)",
                               self.step, ", ".join(skipped), self.nan_skips, config.max_nan_skips)
            now = time.time()
            logs["sec_per_step"] = now - last
            last = now
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if not k.startswith("lr_") and k != "sec_per_step"})
            self._log(logs)
            if stop:  # before validation and snapshots: the scheduler's grace period is short
                self._preempt(bar)
            if config.checkpointing_steps and self.step % config.checkpointing_steps == 0 \
                    and self.step < config.max_train_steps:
                self._save_checkpoint()
            if config.validation_steps and self.step % config.validation_steps == 0:
                self.validate()
            if self.step in config.save_output_steps and self.step < config.max_train_steps:
                self._save_snapshot()
        bar.close()
        self._save_checkpoint()
        return self.finish()

    def _on_non_finite(self, phase: str, bad: str | None) -> None:
        """A NaN/inf loss at this step (on this process when ``bad`` names the term, else on another): stop, or
        under --on_nan skip count it and stop past --max_nan_skips. Nothing of the step is saved either way."""
        config = self.config
        where = f"{bad} in phase {phase!r}" if bad else f"a loss of phase {phase!r} on another process"
        step = self.step + 1  # as logs.jsonl numbers the steps
        kept = list_checkpoints(self.output_dir)
        keep = (f"{kept[-1].name} is the last checkpoint, kept (nothing of this step was saved): resume with "
                "--resume_from_checkpoint latest after fixing the cause (a lower --learning_rate, "
                "--mixed_precision bf16 instead of fp16, the data)") if kept else \
            "no checkpoint was written yet"
        if config.on_nan == "skip":
            self.nan_skips += 1
            if self.nan_skips <= config.max_nan_skips:
                return
            raise TrainingStopped(f"non-finite loss at step {step}: {where}; more than --max_nan_skips "
                                  f"{config.max_nan_skips} updates skipped in this run; {keep}")
        raise TrainingStopped(f"non-finite loss at step {step}: {where}; the run stopped before the update "
                              f"(--on_nan skip drops such updates instead); {keep}")

    def _context(self, phase: str, iteration: int, received: dict) -> PhaseContext:
        """One phase's view of one (micro-)iteration: its batch, its own random stream, its prepared network."""
        acc = self.accelerator
        root = StepRandom(self.config.seed, iteration, acc.process_index, acc.num_processes, acc.device)
        rng = root if phase == self.method.main_stream_phase else root.stream(phase)
        return PhaseContext(phase=phase, step=self.step, batch=self.data.batch(iteration), rng=rng,
                            iteration_rng=root, trained=self.wrapped[phase], received=received)

    def _touch_every_parameter(self, loss: torch.Tensor, phase: str) -> torch.Tensor:
        """loss + 0 · Σ params: under DDP every parameter of the phase's network must receive a gradient, also the
        parts a phase may leave unused (the fake score's GAN head before the GAN starts). find_unused_parameters is
        no way out: the fake score's turn calls its DDP module twice (denoising, then the GAN head), and the
        second call would mark the first call's parameters unused."""
        return loss + 0.0 * torch.stack([p.sum() for p in self.params[phase]]).sum()

    def _reduce(self, logs: dict[str, float]) -> dict[str, float]:
        """Mean of each logged value over processes (so logs describe the global batch)."""
        if self.accelerator.num_processes == 1 or not logs:
            return logs
        keys = sorted(logs)
        t = torch.tensor([logs[k] for k in keys], device=self.accelerator.device, dtype=torch.float64)
        t = self.accelerator.reduce(t, reduction="mean")
        return dict(zip(keys, t.tolist()))

    def _log(self, logs: dict[str, float]) -> None:
        if not self.accelerator.is_main_process:
            return
        with open(self.log_file, "a") as f:
            f.write(json.dumps({"step": self.step, **logs}) + "\n")
        if self.config.report_to:
            self.accelerator.log(logs, step=self.step)

    def validation_prompts(self) -> list[str]:
        prompts = [p for p in self.config.validation_prompts or [] if self.keep is None or self.keep(p)]
        if not prompts:
            prompts = self.dataset.validation_captions(8)
        return prompts

    @torch.no_grad()
    def validate(self) -> Path | None:
        from .evaluation import generate, save_grid

        if not (self.accelerator.is_main_process or self.fsdp):
            return None
        # under FSDP every process runs the sharded student (each forward gathers its shards: a collective); the
        # main process writes the grid
        recipe = self.method.recipe()
        pipe = self.method.sampling_pipeline()
        prompts = self.validation_prompts()
        # one image at a time: the grid sampled as one batch of 8 was the run's peak host memory (LCM-LoRA on
        # tiny-digits at 128 px: 610-690 MB against 570-590 MB for the training steps, varying run to run)
        with self.accelerator.autocast():  # float32 trainable networks beside half-precision frozen ones
            images = generate(pipe, prompts, batch_size=1, seed=self.config.seed, progress=False,
                              height=self.resolution, width=self.resolution, **recipe.call_kwargs())
        if not self.accelerator.is_main_process:
            return None
        path = self.output_dir / "samples" / f"step-{self.step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_grid(images, path, nrow=min(8, len(prompts)), upscale=max(1, 128 // self.resolution))
        logger.info("validation grid: %s", path)
        self._log_grid(path)
        return path

    def _log_grid(self, path: Path) -> None:
        """The validation grid to every tracker (TensorBoard: an image summary; W&B: a wandb.Image)."""
        if not self.config.report_to:
            return
        import numpy as np
        from PIL import Image

        grid = np.asarray(Image.open(path).convert("RGB"))
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({"validation": grid[None]}, step=self.step, dataformats="NHWC")
            elif tracker.name == "wandb":
                tracker.log_images({"validation": [grid]}, step=self.step)

    def finish(self) -> Path:
        acc = self.accelerator
        acc.wait_for_everyone()
        if not (self.config.validation_steps and self.step % self.config.validation_steps == 0):
            self.validate()  # first, so that the model card shows the final grid (under FSDP all processes sample)
        self._write_final_output()
        if acc.is_main_process:
            from .plots import plot_losses

            plot_losses(self.log_file, self.output_dir / "loss_curve.png")
            if "kohya" in self.config.export:
                from .export import KOHYA_FILE_NAME, to_kohya

                logger.info("kohya export: %s", to_kohya(self.output_dir, self.output_dir / KOHYA_FILE_NAME))
            logger.info("wrote %s", self.output_dir)
            if self.config.push_to_hub:
                push_to_hub(self.output_dir, self.config.hub_model_id)
        acc.wait_for_everyone()
        acc.end_training()
        return self.output_dir


def push_to_hub(output_dir: Path, repo_id: str) -> None:
    """Upload the output (weights, recipe, card, samples, logs; not checkpoints or snapshots) with huggingface_hub.
    A thin call by design: it needs a login and the network, so no test here runs it."""
    from huggingface_hub import create_repo, upload_folder

    create_repo(repo_id, exist_ok=True)
    upload_folder(repo_id=repo_id, folder_path=str(output_dir), commit_message="stepdistill output",
                  ignore_patterns=["checkpoint-*", "checkpoint-*/**", "snapshots/**", "*.partial*", "*.tmp*"])
    logger.info("uploaded %s to the Hub: %s", output_dir, repo_id)


def run(method_cls, argv: list[str] | None = None) -> int:
    """Entry point of the train scripts (kept for callers of ``stepdistill.trainer.run``): see ``api.main``."""
    from .api import main

    return main(method_cls, argv)
