"""The ``mace-ray`` command line.

Exit codes: 0 success; 1 unexpected failure (a bug or an infrastructure error, with a
traceback); 2 bad input or settings (one line on stderr naming the input).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from mace_core.concepts import ConceptType
from mace_core.errors import MaceError
from mace_core.models import DEFAULT_MODEL

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Mass concept erasure (MACE) for Stable Diffusion, on one machine or a Ray cluster.",
)

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2


def _fail(message: str) -> None:
    typer.echo(f"mace-ray: error: {message}", err=True)
    raise typer.Exit(EXIT_BAD_INPUT)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s [mace-ray] %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


@app.command()
def erase(
    concepts: Annotated[Path, typer.Argument(help="Concept file: one 'text | type | anchor' per line.")],
    model: Annotated[
        str, typer.Option(help="Hub id, local diffusers folder, or 'tiny' (built-in).")
    ] = DEFAULT_MODEL,
    output: Annotated[str, typer.Option(help="Where runs are written (local folder).")] = "mace-runs",
    type_: Annotated[
        ConceptType, typer.Option("--type", case_sensitive=False, help="Type of lines without one.")
    ] = ConceptType.OBJECT,
    prior_captions: Annotated[
        Path | None, typer.Option(help="Caption file for the prior C_p (default: built-in captions).")
    ] = None,
    retain: Annotated[
        Path | None, typer.Option(help="Concept file of concepts to keep (the domain set C_d).")
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="torch device (default: cuda if present, else cpu).")
    ] = None,
    concepts_per_batch: Annotated[int, typer.Option(min=1, help="Concepts trained in one UNet batch.")] = 4,
    images: Annotated[int, typer.Option(min=1, help="Training images per concept.")] = 8,
    inference_steps: Annotated[int, typer.Option(min=1, help="DPM-Solver steps per training image.")] = 30,
    train_steps: Annotated[int | None, typer.Option(min=0, help="LoRA steps (default: per type).")] = None,
    lr: Annotated[float | None, typer.Option(min=0.0, help="LoRA learning rate (default: per type).")] = None,
    rank: Annotated[int, typer.Option(min=1, help="LoRA rank.")] = 1,
    cfr_prior_weight: Annotated[
        float, typer.Option(min=0.0, help="CFR prior weight a (per-token mean).")
    ] = 1.0,
    cfr_ridge: Annotated[float, typer.Option(min=0.0, help="CFR ridge r (per-token mean).")] = 1e-2,
    fusion_prior_weight: Annotated[float, typer.Option(min=0.0, help="Fusion prior weight f.")] = 1.0,
    fusion_ridge: Annotated[float, typer.Option(min=0.0, help="Fusion ridge r.")] = 1e-2,
    domain_weight: Annotated[float, typer.Option(min=0.0, help="Weight w of the retained set.")] = 1.0,
    prompts_per_concept: Annotated[
        int | None, typer.Option(min=1, help="Templates per concept (default: all of its type).")
    ] = None,
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
    s3_endpoint: Annotated[
        str | None, typer.Option(help="S3 endpoint URL (default: AWS_ENDPOINT_URL or AWS).")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose/--quiet", help="Progress lines on stderr.")] = True,
) -> None:
    """Erase the concepts of CONCEPTS from MODEL; writes runs/<run_id>/ under OUTPUT."""
    from mace_core.settings import (
        ClosedFormSettings,
        DataSettings,
        EraseSettings,
        MaskSettings,
        TrainSettings,
    )
    from mace_ray.erase import EraseRequest, run_erase

    _setup_logging(verbose)
    try:
        settings = EraseSettings(
            cfr=ClosedFormSettings(cfr_prior_weight, domain_weight, cfr_ridge),
            fusion=ClosedFormSettings(fusion_prior_weight, domain_weight, fusion_ridge),
            train=TrainSettings(
                rank=rank,
                lr=lr,
                steps=train_steps,
                squared_loss=squared_loss,
                penalize_eot=penalize_eot,
                seed=seed,
            ),
            data=DataSettings(images_per_concept=images, inference_steps=inference_steps, seed=seed),
            masks=MaskSettings(masker, detector, segmenter, box_threshold, text_threshold),
            prompts_per_concept=prompts_per_concept,
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
            concepts_per_batch=concepts_per_batch,
            s3_endpoint=s3_endpoint,
        )
        report = run_erase(req)
    except (MaceError, ValueError) as e:
        _fail(str(e))
    typer.echo(json.dumps({"run_id": report["run_id"], "status": report["status"], **report["output"]}))


@app.command()
def apply(
    erasure: Annotated[Path, typer.Argument(help="An erasure.safetensors file written by 'erase'.")],
    output: Annotated[Path, typer.Option(help="Folder for the erased diffusers pipeline.")],
    model: Annotated[
        str | None, typer.Option(help="Base model (default: the one named in the file).")
    ] = None,
) -> None:
    """Apply a compact erasure file to its base model and save the erased pipeline."""
    from mace_core.checkpoints import apply_erasure, read_erasure, save_pipeline
    from mace_core.models import load_pipeline

    _setup_logging(False)
    try:
        if not erasure.is_file():
            raise MaceError(f"erasure file {str(erasure)!r} does not exist")
        data = erasure.read_bytes()
        _, meta = read_erasure(data, str(erasure))
        pipe = load_pipeline(model or meta["base_model"])
        apply_erasure(pipe, data, str(erasure))
        save_pipeline(pipe, output)
    except MaceError as e:
        _fail(str(e))
    typer.echo(str(output))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
