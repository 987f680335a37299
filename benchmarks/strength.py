"""Erasure strength of the defaults per model family, width and seed (and against the old defaults).

Every row is one local erase run of a tiny random pipeline of one family (``--families``),
built at one text-context width (``--widths``, the family's defaults when not given) from one
seed (``--seeds``) and saved as a diffusers folder; its figures are the run's erasure report
(report.json "erasure", held-out prompts) plus the drift of bystanders: concepts of the same
type that the run does NOT name (no --retain, so they never enter the closed forms),
measured on their held-out prompts.

Families and widths (the context width the edited projections read):
  sd1   one CLIP (end-of-text padding), last hidden states: width 32 is the ``tiny`` model;
  sd2   one GELU CLIP ('!' padding), v-prediction: width 64 is the family's tiny model;
  sdxl  two CLIPs side by side (penultimate states), split as SDXL splits 2048 into 768 + 1280
        (``mace_core.families.sdxl.split_width``): 64 = 32 + 32 is the family's tiny model;
  flux  T5 context as wide as the width, CLIP pooled as wide: 32 is the family's tiny model;
  sd3   CLIP-L + CLIP-G (half the width each) and T5 in one context: 64 is its tiny model.
  (flux and sd3 edit context_embedder and the pooled projection: the headline figures are the
  context's, the pooled projection's are beside them: residual_pooled(_cfr), prior_drift_pooled(_cfr).)
A family joins by adding its builder to ``BUILDERS`` (width, seed -> pipeline) and its
default widths to ``WIDTHS``.

Configurations (``--configs``):
  new: the defaults (the paper's per-type weights for the run's N, Gaussian LoRA init,
       30 prompts per concept, every occurrence of the concept in Eq. 3);
  old: the defaults before them: per-token weights prior 1, no domain set, ridge 1e-2,
       Kaiming-uniform LoRA init, all of the type's templates;
  cfr: the defaults, run as --method cfr (closed-form refinement alone: no images, no LoRA;
       seconds a run): its "residual" and "prior_drift" are CFR's.

Usage: python benchmarks/strength.py [--families sd1 sd2 sdxl] [--widths 64 sdxl:2048] [--seeds 0 1]
           [--types celebrity] [--counts 2] [--configs new] [--table families]
           [--out benchmarks/results]
Writes <out>/strength_<table>_cpu.json (one table: a row per run) and prints one line per run.
The type-by-count table of the built-in tiny model (strength_tiny_cpu.json) is
  --families sd1 --widths 32 --seeds 0 --types celebrity style object explicit
  --counts 2 10 20 --configs new old --table tiny
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mace_core.checkpoints import read_erasure
from mace_core.concepts import Concept, ConceptType, read_concept_file
from mace_core.erasure_report import KVProjection, concept_drifts, summary_line
from mace_core.families import flux, sd1, sd2, sd3, sdxl
from mace_core.models import load_pipeline, load_prompt_encoder, pipeline_projections
from mace_core.settings import ClosedFormSettings, DataSettings, EraseSettings, MaskSettings, TrainSettings
from mace_ray.erase.driver import run_erase
from mace_ray.erase.request import EraseRequest

ROOT = Path(__file__).resolve().parents[1]
# Concepts to erase and bystanders (same type, not erased) for each type.
LISTS: dict[ConceptType, tuple[str, str | None]] = {
    ConceptType.CELEBRITY: ("jobs/celebrities/erase.txt", "jobs/celebrities/retain.txt"),
    ConceptType.STYLE: ("jobs/artists/erase.txt", "jobs/artists/retain.txt"),
    ConceptType.OBJECT: ("jobs/cifar10/objects.txt", None),  # bystanders: the classes not erased
    ConceptType.EXPLICIT: ("jobs/explicit/erase.txt", None),
}
BYSTANDERS = 5
# Small data settings: on the tiny random models the images are noise either way.
DATA = DataSettings(images_per_concept=2, inference_steps=3)
MASKS = MaskSettings(masker="whole-image")

# Family -> (context width, seed) -> a tiny random pipeline of that family.
BUILDERS: dict[str, Callable[[int, int], Any]] = {
    "sd1": lambda width, seed: sd1.build_tiny_pipeline(seed, width=width),
    "sd2": lambda width, seed: sd2.build_tiny_pipeline(seed, width=width),
    "sdxl": lambda width, seed: sdxl.build_tiny_pipeline(seed, widths=sdxl.split_width(width)),
    # FLUX.1: T5 as wide as the context (the CLIP pooled embedding as wide); SD 3.x: the
    # context is T5's width, both CLIPs half of it each (their pooled embeddings side by side).
    "flux": lambda width, seed: flux.build_tiny_pipeline(seed, text_width=width),
    "sd3": lambda width, seed: sd3.build_tiny_pipeline(seed, text_width=width // 2),
}
# The widths a family is measured at when --widths names none for it (the first: its tiny
# model's; the last of SD 1.x and SDXL: the real models' widths, 768 and 768 + 1280).
WIDTHS: dict[str, tuple[int, ...]] = {
    "sd1": (32, 64, 768),
    "sd2": (64, 128),
    "sdxl": (64, 96, 128, 2048),
    "flux": (32, 64),
    "sd3": (64, 128),
}


def widths_of(family: str, given: list[str] | None) -> tuple[int, ...]:
    """--widths: ``W`` (every family) or ``FAMILY:W`` tokens; a family none names gets WIDTHS."""
    out = []
    for token in given or []:
        name, _, width = token.rpartition(":")
        if name in ("", family):
            out.append(int(width))
    return tuple(out) or WIDTHS[family]


def configs(train_steps: int | None) -> dict[str, EraseSettings]:
    old = ClosedFormSettings(prior_weight=1.0, domain_weight=0.0, ridge=1e-2)
    new = EraseSettings(train=TrainSettings(steps=train_steps), data=DATA, masks=MASKS)
    return {
        "new": new,
        "cfr": new,  # run as --method cfr (METHODS): the closed-form refinement alone, seconds
        "old": EraseSettings(
            cfr=old,
            fusion=old,
            train=TrainSettings(steps=train_steps, lora_init="kaiming"),
            data=DATA,
            masks=MASKS,
            prompts_per_concept=None,
        ),
    }


# The method each configuration runs (the rest: the whole method).
METHODS: dict[str, str] = {"cfr": "cfr"}
POOLED_FIGURES = ("residual_pooled", "residual_pooled_cfr", "prior_drift_pooled", "prior_drift_pooled_cfr")


def concepts_of(path: str, type_: ConceptType) -> list[Concept]:
    return read_concept_file(ROOT / path, type_).concepts


def run_one(
    model: Path,
    concepts: list[Concept],
    bystanders: list[Concept],
    settings: EraseSettings,
    work: Path,
    method: str = "mace",
) -> dict[str, Any]:
    """One local erase run of the pipeline folder ``model``: its report's figures and the
    bystanders' drift between the original and the erased projections."""
    cfile = work / "concepts.txt"
    cfile.write_text("".join(f"{c.text} | {c.type.value} | {c.anchor}\n" for c in concepts))
    t = time.perf_counter()
    rep = run_erase(
        EraseRequest(
            concept_file=str(cfile),
            model=str(model),
            output=str(work / "out"),
            settings=settings,
            executor="local",
            method=method,
        )
    )
    seconds = time.perf_counter() - t
    projections = pipeline_projections(load_pipeline(str(model)))
    erased, _ = read_erasure((Path(rep["output"]["root"]) / "final" / "erasure.safetensors").read_bytes())
    cpu = torch.device("cpu")
    original = KVProjection(projections.weights(), cpu)
    fused = KVProjection(projections.from_component_tensors(erased), cpu)
    drifts = concept_drifts(load_prompt_encoder(str(model), cpu), bystanders, original, fused)
    values = [v for v in drifts.values() if v is not None]
    erasure = rep["erasure"]
    return {
        "residual": erasure["residual"],
        "residual_cfr": erasure["residual_cfr"],
        "residual_train": erasure["residual_train"],
        "prior_drift": erasure["prior_drift"],
        "prior_drift_cfr": erasure["prior_drift_cfr"],
        "bystander_drift": {"mean": sum(values) / len(values), "max": max(values)} if values else None,
        "lora_relative_norm": erasure["lora_relative_norm"],
        "attention_mass": erasure["attention_mass"],
        # FLUX.1 / SD 3.x: the pooled text projection's figures (absent for SD).
        **{k: erasure[k] for k in POOLED_FIGURES if k in erasure},
        "summary": summary_line(erasure),
        "weights": rep["weights"],
        "seconds": round(seconds, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", nargs="+", default=list(BUILDERS), choices=list(BUILDERS))
    ap.add_argument("--widths", nargs="+", default=None, help="W or FAMILY:W (default: WIDTHS)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--types", nargs="+", default=["celebrity"], choices=[t.value for t in LISTS])
    ap.add_argument("--counts", nargs="+", type=int, default=[2])
    ap.add_argument("--configs", nargs="+", default=["new"], choices=["new", "old", "cfr"])
    ap.add_argument("--train-steps", type=int, default=None, help="default: the type's (50 or 120)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: no oversubscription)")
    ap.add_argument("--table", default="families", help="the output's name: strength_<table>_cpu.json")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    started = time.perf_counter()
    for family in args.families:
        for width in widths_of(family, args.widths):
            for seed in args.seeds:
                with tempfile.TemporaryDirectory() as tmp:
                    model = Path(tmp) / "model"
                    BUILDERS[family](width, seed).save_pretrained(model, safe_serialization=True)
                    rows += run_model(family, width, seed, model, args)
    out = {
        "what": "erasure report of default erase runs per family, context width and seed, tiny random "
        "pipelines, local executor",
        "data": {"images_per_concept": DATA.images_per_concept, "inference_steps": DATA.inference_steps},
        "masker": MASKS.masker,
        "bystanders_per_run": BYSTANDERS,
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"strength_{args.table}_cpu.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


def run_model(family: str, width: int, seed: int, model: Path, args: argparse.Namespace) -> list[dict]:
    """Every type, count and configuration of ``args`` on one pipeline folder."""
    rows = []
    for type_name in args.types:
        type_ = ConceptType(type_name)
        erase_file, bystander_file = LISTS[type_]
        pool = concepts_of(erase_file, type_)
        done: set[int] = set()
        for n in args.counts:
            # Without a bystander list the type's other concepts are the bystanders: keep one.
            n = min(n, len(pool) - (0 if bystander_file else 1))
            if n < 1 or n in done:
                continue
            done.add(n)
            others = concepts_of(bystander_file, type_) if bystander_file else pool[n:]
            for name in args.configs:
                settings = configs(args.train_steps)[name]
                row = {"family": family, "width": width, "seed": seed, "type": type_name, "concepts": n}
                row["config"] = name
                with tempfile.TemporaryDirectory() as tmp:
                    row.update(
                        run_one(
                            model,
                            pool[:n],
                            others[:BYSTANDERS],
                            settings,
                            Path(tmp),
                            METHODS.get(name, "mace"),
                        )
                    )
                rows.append(row)
                by = row["bystander_drift"]
                by_mean = "n/a" if by is None else format(by["mean"], ".4f")
                print(
                    f"{family:5s} w={width:4d} seed={seed} {type_name:9s} N={n:3d} {name}: {row['summary']}; "
                    f"bystander drift {by_mean} ({row['seconds']}s)",
                    flush=True,
                )
    return rows


if __name__ == "__main__":
    main()
