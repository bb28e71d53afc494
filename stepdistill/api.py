"""Training from Python and from the command line, through one path.

    import stepdistill
    out = stepdistill.train("dmd2", config="train_scripts/configs/tiny_digits/dmd2.yaml", output_dir="runs/dmd2",
                            max_train_steps=500)

``train`` turns its keyword options into the command line that sets them and parses it exactly as
``train_scripts/train_<method>.py`` and ``stepdistill train METHOD`` do (YAML, then the options, then the method's
checks), so a bad value raises the StepdistillError whose text those commands print after ``error:``.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Any

from .errors import Preempted, StepdistillError, TrainingStopped, report, split_debug

def _method_class(method):
    from .methods import get_method

    return get_method(method) if isinstance(method, str) else method


def train_from_argv(method, argv: list[str] | None = None, prog: str | None = None) -> Path:
    """Parse ``argv`` (``--config FILE`` and options) for ``method`` (a registered name or a method class; None:
    the one the config file names, or its pipeline of stages, ``stepdistill.stages``), train, write the output and
    return its directory. Bad input raises a one-line StepdistillError before any weights load."""
    from .config import parse_config
    from .trainer import Trainer

    if method is None:  # the --config file names it (method:), or is a pipeline of stages (stages:)
        from .stages import method_of_config, train_stages

        method = method_of_config(list(argv or []))
        if method == "stages":
            return train_stages(list(argv or []), prog=prog or "stepdistill train")
    if method == "msd":  # K students and a router: an orchestration of the DM trainers (stepdistill.msd.train)
        from .msd.train import train_msd_from_argv

        return train_msd_from_argv(argv, prog=prog or "train_msd.py")
    method_cls = _method_class(method)
    config = parse_config(method_cls.config_class, argv, prog=prog or f"train_{method_cls.name}.py",
                          method=method_cls.name)
    return Path(Trainer(config, method_cls).train())


def train(method: str | None = None, config: str | Path | None = None, output_dir: str | Path | None = None,
          **options: Any) -> Path:
    """Train ``method`` ("lcm", "tscd", "dmd2", "sid", "agd", "tsm": ``stepdistill.methods.METHODS``; or "msd", K
    students of "dmd2"/"sid" and a router; None: what the ``config`` file names, its ``method:`` or its
    ``stages:``) and return the output directory (weights, ``stepdistill.json``, model card, logs).

    ``config`` is a YAML file of options; ``options`` override it, by the command-line names
    (``max_train_steps=2``, ``segments=[8, 4]``, ``use_lora=False``); ``None`` leaves an option to the file or its
    default.
    """
    from .config import options_to_argv

    argv = options_to_argv({"config": config, "output_dir": output_dir, **options})
    return train_from_argv(method, argv)


def main(method, argv: list[str] | None = None, prog: str | None = None) -> int:
    """Entry point of ``train_scripts/train_<method>.py`` and ``stepdistill train METHOD``: parse, train, write.
    Bad input is one line on stderr (``error: ...``) and exit status 2; ``--debug`` adds its traceback. A run stopped
    by a NaN/inf loss or a full disk: one line and exit status 1 (its last complete checkpoint kept). A run stopped by
    SIGTERM after saving a checkpoint of its step: exit status 0 (the output is not written: resume with
    ``--resume_from_checkpoint latest``)."""
    argv, debug = split_debug(sys.argv[1:] if argv is None else list(argv))
    try:
        train_from_argv(method, argv, prog)
    except StepdistillError as e:
        return report(e, "error: ", debug)
    except TrainingStopped as e:
        if debug:
            traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except Preempted:
        return Preempted.exit_code  # the trainer logged the checkpoint and how to resume
    return 0
