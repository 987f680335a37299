"""``mace-ray audit``: attacks on an erased model's concepts (indirect prompts, concept
inversion, soft-prompt search), measured against the original model. Loaded by the
``mace-ray`` group when named (mace_ray/cli/options.py LAZY_COMMANDS); its options are
``AuditRequest``'s (mace_ray/audit/request.py).

Exit codes as for every mace-ray command: 0 success; 1 unexpected failure (traceback);
2 bad input or settings (one line ``mace-ray: error: ...`` naming the input).
"""

from __future__ import annotations

import typer

from mace_ray.audit.request import AuditRequest
from mace_ray.cli.build import command
from mace_ray.cli.options import OneLineErrors
from mace_ray.cli.report import run_reported_job


def audit(req: AuditRequest) -> None:
    """Attack the concepts erased from MODEL and measure what comes back; writes
    audits/<audit_id>/ under OUTPUT."""
    # Imported here: `mace-ray audit --help` needs neither the driver nor the report.
    from mace_core.audit.report import success_table
    from mace_ray.audit.driver import run_audit

    run_reported_job(req.progress, lambda: run_audit(req), success_table, "audit_id")


# One command; mace_ray/cli/options.py LAZY_COMMANDS imports it when `mace-ray audit` is named.
app = typer.Typer(rich_markup_mode=None, add_completion=False)
app.command("audit", cls=OneLineErrors)(command(AuditRequest, audit, "audit"))
