"""``mace-ray audit``: attacks on an erased model's concepts (indirect prompts, concept
inversion, soft-prompt search), measured against the original model. Registered in
mace_ray/cli.py; its options are ``AuditRequest``'s (mace_ray/audit_settings.py).

Exit codes as for every mace-ray command: 0 success; 1 unexpected failure (traceback);
2 bad input or settings (one line ``mace-ray: error: ...`` naming the input).
"""

from __future__ import annotations

import json
import logging

import typer

from mace_core.errors import MaceError
from mace_ray.audit_settings import AuditRequest
from mace_ray.cli_build import command
from mace_ray.cli_options import fail


def audit(req: AuditRequest) -> None:
    """Attack the concepts erased from RUN_OR_PIPELINE and measure what comes back; writes
    audits/<audit_id>/ under OUTPUT."""
    # Imported here: mace_ray.cli imports this module to register the command.
    from mace_core.audit.report import success_table
    from mace_ray.audit import run_audit
    from mace_ray.logs import setup_logging

    setup_logging(req.progress)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # its font-cache line is noise here
    try:
        report = run_audit(req)
    except (MaceError, ValueError) as e:
        fail(str(e))
    typer.echo(success_table(report))
    out = report["output"]
    typer.echo(json.dumps({"audit_id": report["audit_id"], "status": report["status"], "root": out["root"]}))


audit_command = command(AuditRequest, audit, "audit")
