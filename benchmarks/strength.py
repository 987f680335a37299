"""Erasure strength of the defaults against the old defaults, per concept type and count.

Every configuration is one local erase run of the built-in tiny model; its figures are the
run's erasure report (report.json "erasure", held-out prompts) plus the drift of
bystanders: concepts of the same type that the run does NOT name (no --retain, so they
never enter the closed forms), measured on their held-out prompts.

Configurations:
  new: the defaults (the paper's per-type weights for the run's N, Gaussian LoRA init,
       30 prompts per concept, every occurrence of the concept in Eq. 3);
  old: the defaults before them: per-token weights prior 1, no domain set, ridge 1e-2,
       Kaiming-uniform LoRA init, all of the type's templates (Eq. 3 still marks every
       occurrence: the old first-occurrence rule is gone, and the templates rarely repeat
       a concept).

Usage: python benchmarks/strength.py [--types celebrity style object explicit]
           [--counts 2 10 20] [--out benchmarks/results]
Writes <out>/strength_tiny_cpu.json and prints one line per run.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mace_core.checkpoints import read_erasure
from mace_core.concepts import Concept, ConceptType, read_concept_file
from mace_core.erasure_report import KVProjection, concept_drifts, summary_line
from mace_core.models import build_tiny_pipeline, get_attn2_weights
from mace_core.settings import ClosedFormSettings, DataSettings, EraseSettings, MaskSettings, TrainSettings
from mace_core.text_stats import TextEncoder
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
# Small data settings: on the tiny random model the images are noise either way.
DATA = DataSettings(images_per_concept=2, inference_steps=3)
MASKS = MaskSettings(masker="whole-image")


def configs(train_steps: int | None) -> dict[str, EraseSettings]:
    old = ClosedFormSettings(prior_weight=1.0, domain_weight=0.0, ridge=1e-2)
    return {
        "new": EraseSettings(train=TrainSettings(steps=train_steps), data=DATA, masks=MASKS),
        "old": EraseSettings(
            cfr=old,
            fusion=old,
            train=TrainSettings(steps=train_steps, lora_init="kaiming"),
            data=DATA,
            masks=MASKS,
            prompts_per_concept=None,
        ),
    }


def concepts_of(path: str, type_: ConceptType) -> list[Concept]:
    return read_concept_file(ROOT / path, type_).concepts


def run_one(
    concepts: list[Concept], bystanders: list[Concept], settings: EraseSettings, work: Path, encoder, original
) -> dict[str, Any]:
    cfile = work / "concepts.txt"
    cfile.write_text("".join(f"{c.text} | {c.type.value} | {c.anchor}\n" for c in concepts))
    t = time.perf_counter()
    rep = run_erase(
        EraseRequest(
            concept_file=str(cfile),
            model="tiny",
            output=str(work / "out"),
            settings=settings,
            executor="local",
        )
    )
    seconds = time.perf_counter() - t
    fused, _ = read_erasure((Path(rep["output"]["root"]) / "final" / "erasure.safetensors").read_bytes())
    cpu = torch.device("cpu")
    drifts = concept_drifts(encoder, bystanders, KVProjection(original, cpu), KVProjection(fused, cpu))
    values = [v for v in drifts.values() if v is not None]
    erasure = rep["erasure"]
    return {
        "residual": erasure["residual"],
        "residual_cfr": erasure["residual_cfr"],
        "residual_train": erasure["residual_train"],
        "prior_drift": erasure["prior_drift"],
        "bystander_drift": {"mean": sum(values) / len(values), "max": max(values)} if values else None,
        "lora_relative_norm": erasure["lora_relative_norm"],
        "attention_mass": erasure["attention_mass"],
        "summary": summary_line(erasure),
        "weights": rep["weights"],
        "seconds": round(seconds, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--types", nargs="+", default=[t.value for t in LISTS], choices=[t.value for t in LISTS])
    ap.add_argument("--counts", nargs="+", type=int, default=[2, 10, 20])
    ap.add_argument("--train-steps", type=int, default=None, help="default: the type's (50 or 120)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()

    pipe = build_tiny_pipeline(seed=0)
    encoder = TextEncoder(pipe.tokenizer, pipe.text_encoder, torch.device("cpu"))
    original = get_attn2_weights(pipe.unet)
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
            erased = pool[:n]
            others = concepts_of(bystander_file, type_) if bystander_file else pool[n:]
            bystanders = others[:BYSTANDERS]
            for name, settings in configs(args.train_steps).items():
                with tempfile.TemporaryDirectory() as tmp:
                    row = {"type": type_name, "concepts": n, "config": name}
                    row.update(run_one(erased, bystanders, settings, Path(tmp), encoder, original))
                rows.append(row)
                by = row["bystander_drift"]
                print(
                    f"{type_name:9s} N={n:3d} {name}: {row['summary']}; bystander drift "
                    f"{'n/a' if by is None else format(by['mean'], '.4f')} ({row['seconds']}s)",
                    flush=True,
                )
    out = {
        "what": "erasure report of the new defaults next to the old ones, tiny model, local executor",
        "data": {"images_per_concept": DATA.images_per_concept, "inference_steps": DATA.inference_steps},
        "masker": MASKS.masker,
        "bystanders_per_run": BYSTANDERS,
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "strength_tiny_cpu.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
