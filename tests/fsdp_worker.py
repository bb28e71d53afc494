"""Several trainings one after another in one launch (tests/test_fsdp.py): every process of the group runs them in
the same order, so the interpreter and process-group start-up is paid once. Usage (under torchrun or accelerate
launch): fsdp_worker.py RUNS.json, a list of [method, [argument, ...]]; exits with the first non-zero status."""

import faulthandler
import json
import os
import sys

from accelerate.state import PartialState

from stepdistill.api import main

if __name__ == "__main__":
    # a collective that never completes (one process waiting for another) fails with every thread's stack instead of
    # waiting for the test's timeout
    faulthandler.dump_traceback_later(int(os.environ.get("FSDP_WORKER_TIMEOUT_S", "600")), exit=True)
    # The trainings share the launch's process group. Trainer.finish -> Accelerator.end_training destroys it, and
    # Accelerate's PartialState (kept between trainings) would not make a new one: the next training would run its
    # collectives on whatever group torch creates lazily (FSDP2's default mesh, for one), per process.
    PartialState.destroy_process_group = lambda self, group=None: None
    for method, argv in json.loads(open(sys.argv[1]).read()):
        status = main(method, argv)
        if status:
            sys.exit(status)
    import torch.distributed as dist

    dist.destroy_process_group()
