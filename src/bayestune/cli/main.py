"""``bayestune <subcommand>``: parse, pick the job's GPU, run the subcommand's module, and turn
a project error into one line."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence

from bayestune.cli.parser import build_parser, command_module
from bayestune.errors import BayesTuneError

log = logging.getLogger("bayestune")


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    started = time.time()
    if getattr(args, "device", "cpu") != "cuda":
        from bayestune.devices import keep_freed_memory

        keep_freed_memory()
    from bayestune.liveness import PARENT_GONE, watch_parent

    watched = None
    try:
        watched = watch_parent()  # a workflow's job stops when its Snakemake is gone
        if getattr(args, "gpu_slots", None) is not None:
            from bayestune.devices import assign_device

            args.device = str(assign_device(args.device, args.gpu_slots, args.jobs_per_gpu))
        module = command_module(args.command)
        module.run(module.settings(args))
    except BayesTuneError as err:
        # Bad input and failed runs end with one clear line; anything else is a bug or a failure
        # of the machine (out of memory, ...) and keeps its traceback.
        print(f"bayestune {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if watched is None or not PARENT_GONE.is_set():
            raise
        print(f"bayestune {args.command}: stopped: the process that started it (pid {watched}, "
              "$BAYESTUNE_WATCH_PID) is gone; rerun the workflow to go on (a sampler resumes "
              "from its checkpoint)", file=sys.stderr)
        return 130
    log.info("%s done in %.1f s", args.command, time.time() - started)
    return 0
