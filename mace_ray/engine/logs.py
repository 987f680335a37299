"""Logging set-up shared by the CLI and the workers: our progress lines, quiet libraries, and
Ray's own driver output as a job log reads it (``ray job logs`` is a file, not a terminal)."""

from __future__ import annotations

import logging
import os
import re
import sys
import time

FORMAT, DATEFMT = "%(asctime)s [mace-ray] %(message)s", "%H:%M:%S"
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def quiet_libraries() -> None:
    """diffusers/transformers warnings and progress bars would drown the job log."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def progress_line(message: str) -> None:
    """One progress line on stderr, formatted as the driver's log lines: in a Ray worker,
    which configures no logging, as in the driver's own process."""
    print(f"{time.strftime(DATEFMT)} [mace-ray] {message}", file=sys.stderr, flush=True)


class RayDriverLines(logging.Filter):
    """Ray's lines in the driver (connecting, the dashboard's address): left out under
    --quiet (warnings stay); otherwise without the colour codes Ray writes into them even
    when the output is a file."""

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING and not self.verbose:
            return False
        if not sys.stderr.isatty():
            record.msg, record.args = ANSI.sub("", record.getMessage()), ()
        return True


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format=FORMAT, datefmt=DATEFMT, stream=sys.stderr
    )
    logging.getLogger("mace_ray").setLevel(logging.INFO if verbose else logging.WARNING)
    # botocore announces at INFO where it found credentials, each time storage is opened.
    for name in ("botocore", "boto3", "s3transfer", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # What Ray prints here, set before Ray is imported (it reads these then). Worker lines come
    # with a "(ConceptWorker pid=...)" prefix: no colour codes around it in a file; and ours
    # are never folded into "[repeated 2x across cluster]", which keeps one worker's line and
    # hides the others' (Ray compares lines with their numbers taken out).
    if not sys.stderr.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS_ALLOW_REGEX", re.escape("[mace-ray]"))
    ray_lines = logging.getLogger("ray._private.worker")  # where ray.init logs its lines
    for old in [f for f in ray_lines.filters if isinstance(f, RayDriverLines)]:
        ray_lines.removeFilter(old)
    ray_lines.addFilter(RayDriverLines(verbose))
    quiet_libraries()
