"""Logging set-up shared by the CLI and the workers: our progress lines, quiet libraries."""

from __future__ import annotations

import logging
import sys


def quiet_libraries() -> None:
    """diffusers/transformers warnings and progress bars would drown the job log."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s [mace-ray] %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    logging.getLogger("mace_ray").setLevel(logging.INFO if verbose else logging.WARNING)
    # botocore announces at INFO where it found credentials, each time storage is opened.
    for name in ("botocore", "boto3", "s3transfer", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    quiet_libraries()
