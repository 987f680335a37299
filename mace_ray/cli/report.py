"""How a command whose job ends in a report (``mace-ray audit``, ``mace-ray eval``) runs it
and shows the result: logging set up, bad input as one ``mace-ray: error:`` line (exit 2), a
bug as its traceback (exit 1, ``mace_ray.cli.errors``), then the report's table and one JSON
line naming the job, its status and its folder."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import typer

from mace_ray.cli.errors import reported_errors
from mace_ray.cli.options import EXIT_SIGINT, fail
from mace_ray.engine.logs import setup_logging
from mace_ray.erase.stopping import CTRL_C


def run_reported_job(
    progress: bool,
    run: Callable[[], dict[str, Any]],
    table: Callable[[dict[str, Any]], str],
    id_key: str,
) -> None:
    """``run()`` the job, then print ``table(report)`` and ``{id_key, status, root}`` as JSON."""
    setup_logging(progress)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # its font-cache line is noise here
    try:
        with reported_errors():  # bad input (also from a worker): one line; anything else: a bug
            report = run()
    except KeyboardInterrupt:  # a stop, not a bug: what is done is kept (jobs resume by their markers)
        fail(f"{CTRL_C}: stopped; the same command resumes it", EXIT_SIGINT)
    typer.echo(table(report))
    out = report["output"]
    typer.echo(json.dumps({id_key: report[id_key], "status": report["status"], "root": out["root"]}))
