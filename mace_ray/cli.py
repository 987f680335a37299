"""The ``mace-ray`` command line.

Exit codes: 0 success; 1 unexpected failure (a bug or an infrastructure error, with a
traceback; the run is marked failed and resumes on rerun); 2 bad input or settings (one
line on stderr naming the input; nothing is marked complete).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from mace_core.concepts import ConceptType
from mace_core.errors import MaceError
from mace_core.models import DEFAULT_MODEL
from mace_ray.cli_options import (
    AddressOpt,
    ConfigOpt,
    ExecutorOpt,
    GpusPerWorkerOpt,
    S3EndpointOpt,
    fail,
)
from mace_ray.eval_cli import eval_command
from mace_ray.logs import setup_logging

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Mass concept erasure (MACE) for Stable Diffusion, on one machine or a Ray cluster.",
)


# Exit code of a complete run whose erasure report fails --max-residual.
EXIT_WEAK_ERASURE = 3
# A run stopped by SIGTERM (128 + 15, as a shell reports it): marked interrupted, resumable.
EXIT_SIGTERM = 143


def _batch_size(value: str) -> int | None:
    """``--concepts-per-batch``: a positive integer, or auto (None)."""
    if str(value).strip().lower() == "auto":
        return None
    try:
        k = int(str(value).strip())
    except ValueError:
        k = 0
    if k < 1:
        fail(f"--concepts-per-batch: expected a positive integer or auto, got {value!r}")
    return k


@app.command()
def erase(
    concepts: Annotated[Path, typer.Argument(help="Concept file: one 'text | type | anchor' per line.")],
    config: ConfigOpt = None,
    model: Annotated[
        str, typer.Option(help="Hub id, local diffusers folder, or 'tiny' (built-in random model).")
    ] = DEFAULT_MODEL,
    output: Annotated[
        str, typer.Option(help="Where runs are written: a folder or s3://bucket/prefix.")
    ] = "mace-runs",
    type_: Annotated[
        ConceptType, typer.Option("--type", case_sensitive=False, help="Type of lines without one.")
    ] = ConceptType.OBJECT,
    prior_captions: Annotated[
        Path | None, typer.Option(help="Caption file for the prior C_p (default: built-in captions).")
    ] = None,
    retain: Annotated[
        Path | None, typer.Option(help="Concept file of concepts to keep (the retained set C_r).")
    ] = None,
    executor: ExecutorOpt = "ray",
    address: AddressOpt = None,
    workers: Annotated[
        int | None, typer.Option(min=1, help="Concept workers (default: one per GPU of the cluster, else 1).")
    ] = None,
    gpus_per_worker: GpusPerWorkerOpt = None,
    resume: Annotated[
        bool, typer.Option(help="Reuse what an earlier run with the same inputs finished.")
    ] = True,
    device: Annotated[
        str | None, typer.Option(help="torch device (default: cuda if present, else cpu).")
    ] = None,
    concepts_per_batch: Annotated[
        str,
        typer.Option(help="Concepts per worker batch, or auto: from the GPU's free memory (4 on CPUs)."),
    ] = "auto",
    images: Annotated[int, typer.Option(min=1, help="Training images per concept.")] = 8,
    inference_steps: Annotated[int, typer.Option(min=1, help="DPM-Solver steps per training image.")] = 30,
    train_steps: Annotated[int | None, typer.Option(min=0, help="LoRA steps (default: per type).")] = None,
    lr: Annotated[float | None, typer.Option(min=0.0, help="LoRA learning rate (default: per type).")] = None,
    rank: Annotated[int, typer.Option(min=1, help="LoRA rank.")] = 1,
    lora_init: Annotated[
        str, typer.Option(help="gaussian (A ~ N(0, 1/rank^2), the paper's) or kaiming (PEFT's default).")
    ] = "gaussian",
    cfr_prior_weight: Annotated[
        float | None,
        typer.Option(min=0.0, help="CFR prior weight a, per-token mean (default: the paper's for the run)."),
    ] = None,
    cfr_ridge: Annotated[
        float | None, typer.Option(min=0.0, help="CFR ridge r, per-token mean (default: the paper's).")
    ] = None,
    fusion_prior_weight: Annotated[
        float | None, typer.Option(min=0.0, help="Fusion prior weight f (default: the paper's).")
    ] = None,
    fusion_ridge: Annotated[
        float | None, typer.Option(min=0.0, help="Fusion ridge r (default: the paper's).")
    ] = None,
    domain_weight: Annotated[
        float | None,
        typer.Option(min=0.0, help="Weight w of the domain set ('a person' prompts; default: the paper's)."),
    ] = None,
    retain_weight: Annotated[
        float, typer.Option(min=0.0, help="Weight of the --retain set against the erased concepts.")
    ] = 1.0,
    cfr_scale_squared: Annotated[
        bool,
        typer.Option(
            help="Paper defaults: apply the prior/domain scale squared in CFR, as the reference "
            "experiments did (--no-cfr-scale-squared: once, as Eq. 2 reads)."
        ),
    ] = True,
    prompts_per_concept: Annotated[
        int | None, typer.Option(min=1, help="Templates per concept (the paper: 30).")
    ] = 30,
    squared_loss: Annotated[bool, typer.Option(help="Square the Frobenius norm of Eq. 3.")] = False,
    penalize_eot: Annotated[bool, typer.Option(help="Also suppress end-of-text/padding attention.")] = True,
    seed: Annotated[int, typer.Option(help="Seed of images, LoRA init and training draws.")] = 0,
    masker: Annotated[
        str, typer.Option(help="grounded-sam | segment-anything | whole-image.")
    ] = "grounded-sam",
    detector: Annotated[
        str | None, typer.Option(help="Grounding DINO: hub id, local folder or 'tiny'.")
    ] = None,
    segmenter: Annotated[
        str | None, typer.Option(help="SAM: hub id, local folder, 'tiny', or a .pth (segment-anything).")
    ] = None,
    box_threshold: Annotated[float, typer.Option(help="Grounding DINO box threshold.")] = 0.3,
    text_threshold: Annotated[float, typer.Option(help="Grounding DINO text threshold.")] = 0.25,
    s3_endpoint: S3EndpointOpt = None,
    precision: Annotated[
        str, typer.Option(help="auto (fp16/bf16 autocast on GPUs, fp32 on CPU) or fp32.")
    ] = "auto",
    max_residual: Annotated[
        float | None,
        typer.Option(
            min=0.0, help="Exit 3 (after writing everything) if a concept's residual stays above this."
        ),
    ] = None,
    lock_wait: Annotated[
        float,
        typer.Option(
            min=0.0, help="Seconds to wait for another driver running the same run before refusing."
        ),
    ] = 90.0,
    placement_wait: Annotated[
        float,
        typer.Option(min=0.0, help="Seconds an autoscaler may take to add a node the workers fit on."),
    ] = 600.0,
    verbose: Annotated[bool, typer.Option("--verbose/--quiet", help="Progress lines on stderr.")] = True,
) -> None:
    """Erase the concepts of CONCEPTS from MODEL; writes runs/<run_id>/ under OUTPUT."""
    from mace_core.erasure_report import above_limit
    from mace_core.settings import (
        ClosedFormSettings,
        DataSettings,
        EraseSettings,
        MaskSettings,
        TrainSettings,
    )
    from mace_ray.erase import EraseRequest, Interrupted, on_sigterm, run_erase

    setup_logging(verbose)
    try:
        settings = EraseSettings(
            cfr=ClosedFormSettings(cfr_prior_weight, domain_weight, cfr_ridge, retain_weight),
            fusion=ClosedFormSettings(fusion_prior_weight, domain_weight, fusion_ridge, retain_weight),
            train=TrainSettings(
                rank=rank,
                lora_init=lora_init,
                lr=lr,
                steps=train_steps,
                squared_loss=squared_loss,
                penalize_eot=penalize_eot,
                seed=seed,
            ),
            data=DataSettings(images_per_concept=images, inference_steps=inference_steps, seed=seed),
            masks=MaskSettings(masker, detector, segmenter, box_threshold, text_threshold),
            prompts_per_concept=prompts_per_concept,
            cfr_scale_squared=cfr_scale_squared,
            precision=precision,
        )
        req = EraseRequest(
            concept_file=str(concepts),
            model=model,
            output=output,
            default_type=type_,
            settings=settings,
            prior_captions=str(prior_captions) if prior_captions else None,
            retain_file=str(retain) if retain else None,
            device=device,
            concepts_per_batch=_batch_size(concepts_per_batch),
            s3_endpoint=s3_endpoint,
            executor=executor,
            address=address,
            workers=workers,
            gpus_per_worker=gpus_per_worker,
            resume=resume,
            max_residual=max_residual,
            lock_wait_s=lock_wait,
            placement_wait_s=placement_wait,
            progress=verbose,
        )
        with on_sigterm():
            report = run_erase(req)
    except (MaceError, ValueError) as e:
        fail(str(e))
    except Interrupted as e:
        fail(f"{e}: the run stopped and is marked interrupted; the same command resumes it", EXIT_SIGTERM)
    typer.echo(json.dumps({"run_id": report["run_id"], "status": report["status"], **report["output"]}))
    # From the per-concept residuals, not the stored list: a complete run reused with a new
    # --max-residual is judged by the new limit.
    residuals = {c["text"]: (c.get("erasure") or {}).get("residual") for c in report.get("concepts", [])}
    above = list(above_limit(residuals, max_residual).items())
    if above:
        shown = ", ".join(f"{name} ({value:.3f})" for name, value in above[:5])
        more = f" and {len(above) - 5} more" if len(above) > 5 else ""
        fail(
            f"--max-residual {max_residual}: {len(above)} concept(s) stay above it: {shown}{more}",
            code=EXIT_WEAK_ERASURE,
        )


@app.command()
def status(
    run: Annotated[str, typer.Argument(help="Run id (the folder name under runs/).")],
    output: Annotated[str, typer.Option(help="The --output the run was written to.")] = "mace-runs",
    s3_endpoint: S3EndpointOpt = None,
) -> None:
    """Show a run's status and progress from its manifest."""
    from mace_ray.erase import run_status

    setup_logging(False)
    try:
        typer.echo(json.dumps(run_status(output, run, s3_endpoint), indent=2))
    except MaceError as e:
        fail(str(e))


@app.command("cache-prior")
def cache_prior_cmd(
    captions: Annotated[Path, typer.Argument(help="Caption file, one caption per line (e.g. MS-COCO).")],
    model: Annotated[str, typer.Option(help="Hub id, local diffusers folder, or 'tiny'.")] = DEFAULT_MODEL,
    output: Annotated[str, typer.Option(help="The --output that erase runs will use.")] = "mace-runs",
    executor: ExecutorOpt = "ray",
    address: AddressOpt = None,
    s3_endpoint: S3EndpointOpt = None,
) -> None:
    """Build the prior statistics C_p of a caption file once, for every later erase to reuse."""
    from mace_ray.erase import backend_for
    from mace_ray.prior import cache_prior

    setup_logging(True)
    try:
        if executor not in ("ray", "local"):
            raise MaceError(f"unknown executor {executor!r} (valid: ray, local)")
        args = (model, str(captions), output, s3_endpoint)
        with backend_for(executor, address) as backend:
            if backend.name == "local":
                result = cache_prior(*args)
            else:
                import ray

                gpus = 1 if backend.gpus_available() else 0
                task = ray.remote(cache_prior).options(name="cache-prior", num_gpus=gpus)
                result = backend.get(task.remote(*args))
    except MaceError as e:
        fail(str(e))
    typer.echo(json.dumps(result))


@app.command()
def apply(
    erasure: Annotated[Path, typer.Argument(help="An erasure.safetensors file written by 'erase'.")],
    output: Annotated[Path, typer.Option(help="Folder for the erased diffusers pipeline.")],
    model: Annotated[
        str | None, typer.Option(help="Base model (default: the one named in the file).")
    ] = None,
    other_model: Annotated[
        bool,
        typer.Option(
            "--other-model",
            help="Apply to a model other than the one the erasure was computed on (its fingerprint differs).",
        ),
    ] = False,
    s3_endpoint: Annotated[str | None, typer.Option(help="S3 endpoint for an s3:// --model.")] = None,
) -> None:
    """Apply a compact erasure file to its base model and save the erased pipeline."""
    from mace_core.checkpoints import apply_erasure, read_erasure, save_pipeline
    from mace_core.models import load_pipeline
    from mace_ray.models_remote import fingerprint_model, resolve_model

    setup_logging(False)
    try:
        if not erasure.is_file():
            raise MaceError(f"erasure file {str(erasure)!r} does not exist")
        if output.exists() and not output.is_dir():
            raise MaceError(f"--output {str(output)!r} is a file; give a folder for the pipeline")
        data = erasure.read_bytes()
        _, meta = read_erasure(data, str(erasure))
        base = model or meta["base_model"]
        expected = meta.get("model_fingerprint")
        if expected and not other_model:
            # The erasure replaces attn2 matrices computed from one model's weights: on any
            # other weights it would mix two models without a word.
            now = fingerprint_model(base, s3_endpoint).full
            if now != expected:
                raise MaceError(
                    f"{str(erasure)!r} was computed on a model with fingerprint {expected}; "
                    f"{base!r} has {now} (pass --other-model to apply it anyway)"
                )
        pipe = load_pipeline(resolve_model(base, s3_endpoint))
        apply_erasure(pipe, data, str(erasure))
        save_pipeline(pipe, output)
    except MaceError as e:
        fail(str(e))
    typer.echo(str(output))


app.command("eval")(eval_command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
