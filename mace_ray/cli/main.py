"""The ``mace-ray`` command line.

Exit codes: 0 success; 1 unexpected failure (a bug or an infrastructure error, with a
traceback and a last line saying so; the run is marked failed and resumes on rerun); 2 bad
input or settings (one line on stderr naming the input; nothing is marked complete, and a
run refused before it starts leaves nothing behind); 3 a complete run above --max-residual;
143 stopped by SIGTERM, 130 by Ctrl-C (marked interrupted; the same command resumes it). How
errors are told apart: mace_ray/cli/errors.py.
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated

import typer

from mace_ray.cli.build import annotated, command
from mace_ray.cli.errors import reported_errors
from mace_ray.cli.options import EXIT_SIGINT, LazyCommands, OneLineErrors, fail
from mace_ray.engine.logs import setup_logging
from mace_ray.engine.requests import ADDRESS, DEFAULT_OUTPUT, EXECUTOR, S3_ENDPOINT, Executor
from mace_ray.erase.request import DEFAULT_MODEL, EraseRequest

# eval and audit are LazyCommands (imported when named: their options import torch);
# rich_markup_mode None: plain help, which fits an 80-column terminal and a job log.
app = typer.Typer(
    cls=LazyCommands,
    rich_markup_mode=None,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Mass concept erasure (MACE) for Stable Diffusion, on one machine or a Ray cluster.",
)

# Exit code of a complete run whose erasure report fails --max-residual.
EXIT_WEAK_ERASURE = 3
# A run stopped by SIGTERM (128 + 15, as a shell reports it): marked interrupted, resumable.
EXIT_SIGTERM = 143

# The shared options of the hand-written commands, from the requests' metadata.
ExecutorOpt = annotated(EXECUTOR, Executor, "executor")
AddressOpt = annotated(ADDRESS, str | None, "address")
S3EndpointOpt = annotated(S3_ENDPOINT, str | None, "s3-endpoint")


def _show_version(value: bool) -> None:
    if value:
        try:
            typer.echo(version("mace-ray"))
        except PackageNotFoundError:  # run from a source tree that was never installed
            fail("mace-ray is not installed (pip install -e .), so it has no version")
        raise typer.Exit()


@app.callback()
def _options(
    show_version: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=_show_version, help="Print the installed version and exit."
        ),
    ] = False,
) -> None:
    pass


def erase(req: EraseRequest) -> None:
    """Erase the concepts of CONCEPTS from MODEL; writes runs/<run_id>/ under OUTPUT."""
    from mace_core.erasure_report import above_limit
    from mace_ray.erase.driver import run_erase
    from mace_ray.erase.stopping import CTRL_C, Interrupted, on_sigterm

    setup_logging(req.progress)
    try:
        with reported_errors(), on_sigterm():
            report = run_erase(req)
    except Interrupted as e:
        fail(f"{e}: the run stopped and is marked interrupted; the same command resumes it", EXIT_SIGTERM)
    except KeyboardInterrupt:
        fail(f"{CTRL_C}: the run stopped and is marked interrupted; the same command resumes it", EXIT_SIGINT)
    typer.echo(json.dumps({"run_id": report["run_id"], "status": report["status"], **report["output"]}))
    # From the per-concept residuals, not the stored list: a complete run reused with a new
    # --max-residual is judged by the new limit.
    residuals = {c["text"]: (c.get("erasure") or {}).get("residual") for c in report.get("concepts", [])}
    above = list(above_limit(residuals, req.max_residual).items())
    if above:
        shown = ", ".join(f"{name} ({value:.3f})" for name, value in above[:5])
        more = f" and {len(above) - 5} more" if len(above) > 5 else ""
        fail(
            f"--max-residual {req.max_residual}: {len(above)} concept(s) stay above it: {shown}{more}",
            code=EXIT_WEAK_ERASURE,
        )


app.command("erase", cls=OneLineErrors)(command(EraseRequest, erase, "erase"))


# How every command names a run (mace_ray/erase/locate.py).
RunArg = Annotated[
    str,
    typer.Argument(
        help="A run id under --output, or the path or s3:// URL of the run's folder "
        "(ROOT/runs/<run_id>: ROOT is then the output).",
        show_default=False,
    ),
]
RunOutputOpt = Annotated[
    str | None,
    typer.Option(
        "--output",
        help="The --output the run was written to, a folder or s3://bucket/prefix (default: mace-runs; "
        "not needed when RUN is the run's folder).",
    ),
]


@app.command(cls=OneLineErrors)
def status(run: RunArg, output: RunOutputOpt = None, s3_endpoint: S3EndpointOpt = None) -> None:
    """Show a run's status and progress from its manifest."""
    from mace_ray.erase.status import run_status

    setup_logging(False)
    with reported_errors():
        typer.echo(json.dumps(run_status(output, run, s3_endpoint), indent=2))


@app.command(cls=OneLineErrors)
def gc(
    output: Annotated[
        str,
        typer.Option(
            help="The --output of the runs: a folder or s3://bucket/prefix (a run's folder there, "
            "ROOT/runs/<run_id>, stands for ROOT)."
        ),
    ] = DEFAULT_OUTPUT,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List what would be removed; remove nothing.")
    ] = False,
    s3_endpoint: S3EndpointOpt = None,
) -> None:
    """Remove the shared training data (data/<key>/) that no run under OUTPUT refers to."""
    from mace_ray.erase.gc import collect_garbage

    setup_logging(True)
    with reported_errors():
        typer.echo(json.dumps(collect_garbage(output, s3_endpoint, dry_run)))


@app.command("cache-prior", cls=OneLineErrors)
def cache_prior_cmd(
    captions: Annotated[Path, typer.Argument(help="Caption file, one caption per line (e.g. MS-COCO).")],
    model: Annotated[
        str, typer.Option(help="Hub id, diffusers folder (local or s3://), or 'tiny'.")
    ] = DEFAULT_MODEL,
    output: Annotated[
        str, typer.Option(help="The --output that erase runs will use (a folder or s3://bucket/prefix).")
    ] = DEFAULT_OUTPUT,
    executor: ExecutorOpt = Executor.RAY,
    address: AddressOpt = None,
    s3_endpoint: S3EndpointOpt = None,
) -> None:
    """Build the prior statistics C_p of a caption file once, for every later erase to reuse."""
    from mace_ray.engine.backend import backend_for
    from mace_ray.erase.prior import cache_prior

    setup_logging(True)
    with reported_errors():
        args = (model, str(captions), output, s3_endpoint)
        with backend_for(executor, address) as backend:
            if backend.name == "local":
                result = cache_prior(*args)
            else:
                import ray

                gpus = 1 if backend.gpus_available() else 0
                task = ray.remote(cache_prior).options(name="cache-prior", num_gpus=gpus)
                result = backend.get(task.remote(*args))
    typer.echo(json.dumps(result))


@app.command(cls=OneLineErrors)
def apply(
    # Strings, never Path: Path("s3://b/k") is "s3:/b/k".
    erasure: Annotated[
        str,
        typer.Argument(
            help="An erasure.safetensors file written by 'erase' (a path or s3:// URL), or a run's "
            "folder (its final/erasure.safetensors).",
            show_default=False,
        ),
    ],
    output: Annotated[
        str, typer.Option(help="New folder (or s3:// location) for the erased diffusers pipeline.")
    ],
    model: Annotated[
        str | None, typer.Option(help="Base model (default: the one named in the file); local or s3://.")
    ] = None,
    other_model: Annotated[
        bool,
        typer.Option(
            "--other-model",
            help="Apply to a model other than the one the erasure was computed on (its fingerprint differs).",
        ),
    ] = False,
    s3_endpoint: S3EndpointOpt = None,
) -> None:
    """Apply a compact erasure file to its base model and save the erased pipeline."""
    from mace_ray.erase.apply import apply_erasure_file

    setup_logging(False)
    with reported_errors():
        apply_erasure_file(erasure, output, model, other_model, s3_endpoint)
    typer.echo(output)


@app.command(cls=OneLineErrors)
def pull(
    run: RunArg,
    dest: Annotated[
        str, typer.Argument(metavar="DIR", help="Local folder for the run's outputs.", show_default=False)
    ],
    output: RunOutputOpt = None,
    s3_endpoint: S3EndpointOpt = None,
) -> None:
    """Copy a complete run's outputs (pipeline, erasure, LoRAs, report) to DIR, checked."""
    from mace_ray.erase.pull import pull_run

    setup_logging(False)
    with reported_errors():
        typer.echo(json.dumps(pull_run(run, dest, output, s3_endpoint)))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
