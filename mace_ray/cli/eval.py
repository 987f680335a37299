"""``mace-ray eval``: the paper's evaluation protocols (MACE Sec. 4) on one model, or on an
erased model beside its original (``--baseline``). Loaded by the ``mace-ray`` group when
named (mace_ray/cli/options.py LAZY_COMMANDS); its options are ``EvalRequest``'s
(mace_ray/eval/request.py).

Exit codes as for every mace-ray command: 0 success; 1 unexpected failure (traceback);
2 bad input or settings (one line ``mace-ray: error: ...`` naming the input).
"""

from __future__ import annotations

from typing import Any

import typer

from mace_ray.cli.build import command
from mace_ray.cli.options import OneLineErrors
from mace_ray.cli.report import run_reported_job
from mace_ray.eval.request import EvalRequest


def evaluate(req: EvalRequest) -> None:
    """Evaluate MODEL with one of the paper's protocols; writes evals/<eval_id>/ under OUTPUT."""
    # Imported here: `mace-ray eval --help` needs neither the driver nor the summary.
    from mace_core.evaluation.errors import check_eval_extra
    from mace_core.evaluation.summary import metrics_table
    from mace_ray.eval.driver import run_eval

    def run() -> dict[str, Any]:
        check_eval_extra()  # one line naming what a plain install lacks, before anything runs
        return run_eval(req)

    run_reported_job(req.progress, run, metrics_table, "eval_id")


# One command; mace_ray/cli/options.py LAZY_COMMANDS imports it when `mace-ray eval` is named.
app = typer.Typer(rich_markup_mode=None, add_completion=False)
app.command("eval", cls=OneLineErrors)(command(EvalRequest, evaluate, "eval"))
