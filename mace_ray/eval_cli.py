"""``mace-ray eval``: the paper's evaluation protocols (MACE Sec. 4) on one model, or on an
erased model beside its original (``--baseline``). Registered in mace_ray/cli.py.

Exit codes as for every mace-ray command: 0 success; 1 unexpected failure (traceback);
2 bad input or settings (one line ``mace-ray: error: ...`` naming the input).
"""

from __future__ import annotations

import enum
import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from mace_core.errors import MaceError
from mace_ray.cli_options import AddressOpt, ConfigOpt, ExecutorOpt, GpusPerWorkerOpt, S3EndpointOpt, fail


class SuiteName(str, enum.Enum):
    objects = "objects"
    celebrities = "celebrities"
    styles = "styles"
    explicit = "explicit"
    coco = "coco"


def eval_command(
    model: Annotated[
        str,
        typer.Argument(
            help="Model to evaluate: hub id, local diffusers folder, 'tiny', or an erase run's "
            "final/pipeline folder (or its runs/<run_id> folder: erased and retained concepts come from it)."
        ),
    ],
    suite: Annotated[
        SuiteName, typer.Option(case_sensitive=False, help="Evaluation protocol (paper Sec. 4).")
    ],
    config: ConfigOpt = None,
    baseline: Annotated[
        str | None,
        typer.Option(help="The original model, evaluated in the same run and printed beside MODEL."),
    ] = None,
    output: Annotated[
        str, typer.Option(help="Where evals/ is written: a folder or s3://bucket/prefix.")
    ] = "mace-runs",
    erased: Annotated[
        Path | None,
        typer.Option(
            help="Concept file of the erased concepts (objects/celebrities/styles; default: the erase run's)."
        ),
    ] = None,
    retained: Annotated[
        Path | None,
        typer.Option(
            help="Concept file of retained celebrities/artists (default: the erase run's --retain set)."
        ),
    ] = None,
    prompts_csv: Annotated[
        Path | None,
        typer.Option(
            help="explicit: I2P CSV (column prompt; sd_seed, sd_guidance_scale, ... used when present); "
            "coco: captions CSV (column caption; image_id optional)."
        ),
    ] = None,
    reference_images: Annotated[
        Path | None, typer.Option(help="coco: folder of real images (e.g. MS-COCO val) for FID.")
    ] = None,
    fid_weights: Annotated[
        Path | None,
        typer.Option(
            help="coco: FID Inception-v3 weights, a .safetensors file (default: FID on CLIP features)."
        ),
    ] = None,
    clip: Annotated[
        str | None,
        typer.Option(
            help="CLIP for scoring: hub id, local folder or 'tiny' (default: tiny for tiny models, "
            "else openai/clip-vit-large-patch14)."
        ),
    ] = None,
    recognizer: Annotated[
        str, typer.Option(help="celebrities: 'clip' (zero-shot over the names) or 'module:factory'.")
    ] = "clip",
    images_per_prompt: Annotated[
        int | None,
        typer.Option(
            min=1, help="Images (seeds) per prompt (default: objects 200, celebrities/styles 5, else 1)."
        ),
    ] = None,
    seeds: Annotated[
        list[int] | None,
        typer.Option(help="Exact seeds, repeatable (--seeds 0 --seeds 1): every prompt once per seed."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Base of the derived per-prompt seeds.")] = 0,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N rows of --prompts-csv.")] = None,
    inference_steps: Annotated[int, typer.Option(min=1, help="DPM-Solver steps per image.")] = 30,
    guidance_scale: Annotated[
        float, typer.Option(min=0.0, help="CFG scale (an I2P row's own sd_guidance_scale wins).")
    ] = 7.5,
    resolution: Annotated[
        int | None,
        typer.Option(min=8, help="Image size for every prompt (default: the CSV's, else the model's)."),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per pipeline call.")] = 8,
    fp16: Annotated[bool, typer.Option(help="Generate in float16 on CUDA.")] = False,
    executor: ExecutorOpt = "ray",
    address: AddressOpt = None,
    workers: Annotated[
        int | None,
        typer.Option(min=1, help="Evaluation workers (default: one per GPU of the cluster, else 1)."),
    ] = None,
    gpus_per_worker: GpusPerWorkerOpt = None,
    shard_size: Annotated[int, typer.Option(min=1, help="Images per worker job.")] = 32,
    device: Annotated[
        str | None, typer.Option(help="torch device (default: cuda if present, else cpu).")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Reuse images stored by an earlier eval.")] = True,
    s3_endpoint: S3EndpointOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose/--quiet", help="Progress lines on stderr.")] = True,
) -> None:
    """Evaluate MODEL with one of the paper's protocols; writes evals/<eval_id>/ under OUTPUT."""
    # Imported here: mace_ray.cli imports this module to register the command.
    from mace_core.evaluation.errors import check_eval_extra
    from mace_core.evaluation.generation import GenerationSettings
    from mace_core.evaluation.summary import metrics_table
    from mace_ray.evaluate import EvalRequest, run_eval
    from mace_ray.logs import setup_logging

    setup_logging(verbose)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # its font-cache line is noise here
    try:
        check_eval_extra()
        req = EvalRequest(
            model=model,
            suite=suite.value,
            baseline=baseline,
            output=output,
            erased_file=str(erased) if erased else None,
            retained_file=str(retained) if retained else None,
            prompts_csv=str(prompts_csv) if prompts_csv else None,
            reference_images=str(reference_images) if reference_images else None,
            limit=limit,
            images_per_prompt=images_per_prompt,
            seeds=tuple(seeds) if seeds else None,
            seed=seed,
            generation=GenerationSettings(
                inference_steps=inference_steps,
                guidance_scale=guidance_scale,
                resolution=resolution,
                batch_size=batch_size,
                fp16=fp16,
            ),
            clip=clip,
            recognizer=recognizer,
            fid_weights=str(fid_weights) if fid_weights else None,
            executor=executor,
            address=address,
            workers=workers,
            gpus_per_worker=gpus_per_worker,
            device=device,
            shard_size=shard_size,
            s3_endpoint=s3_endpoint,
            resume=resume,
            progress=verbose,
        )
        report = run_eval(req)
    except (MaceError, ValueError) as e:
        fail(str(e))
    typer.echo(metrics_table(report))
    out = report["output"]
    typer.echo(json.dumps({"eval_id": report["eval_id"], "status": report["status"], "root": out["root"]}))
