"""``mace-ray eval``: the paper's evaluation protocols (MACE Sec. 4) on one model, or on an
erased model beside its original (``--baseline``). Registered in mace_ray/cli.py; its options
are ``EvalRequest``'s (mace_ray/run_settings.py).

Exit codes as for every mace-ray command: 0 success; 1 unexpected failure (traceback);
2 bad input or settings (one line ``mace-ray: error: ...`` naming the input).
"""

from __future__ import annotations

import json
import logging

import typer

from mace_core.errors import MaceError
from mace_ray.cli_build import command
from mace_ray.cli_options import fail
from mace_ray.run_settings import EvalRequest


def evaluate(req: EvalRequest) -> None:
    """Evaluate MODEL with one of the paper's protocols; writes evals/<eval_id>/ under OUTPUT."""
    # Imported here: mace_ray.cli imports this module to register the command.
    from mace_core.evaluation.errors import check_eval_extra
    from mace_core.evaluation.summary import metrics_table
    from mace_ray.evaluate import run_eval
    from mace_ray.logs import setup_logging

    setup_logging(req.progress)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # its font-cache line is noise here
    try:
        check_eval_extra()
        report = run_eval(req)
    except (MaceError, ValueError) as e:
        fail(str(e))
    typer.echo(metrics_table(report))
    out = report["output"]
    typer.echo(json.dumps({"eval_id": report["eval_id"], "status": report["status"], "root": out["root"]}))


eval_command = command(EvalRequest, evaluate, "eval")
