"""Storage keys of evaluations (local folder or s3://bucket/prefix, same keys).

evals/images/<model_id>/<suite>/<prompt_id>.png   generated images, shared by every eval
                                                 that renders the same prompt with the same
                                                 model content (its fingerprint, not its
                                                 path) and generation settings (resume/reuse)
evals/<eval_id>/report.json                      metrics per model, settings, versions, timings
evals/<eval_id>/summary.md                       Markdown summary (one column per model)
evals/<eval_id>/prompts.json                     the suite: every prompt with its seed
evals/<eval_id>/scores/<tag>.json                per-image scores of each model
evals/<eval_id>/plots/<name>.png                 bar charts
evals/cache/fid-reference/<key>.safetensors      FID moments of a reference image folder
                                                 (keyed by its images' content and the feature
                                                 extractor's, mace_core.evaluation.fid)
"""

from __future__ import annotations

from dataclasses import dataclass

from mace_ray.storage.keys import ReportFolder, Under, safe_part

# Ids are made by mace_ray.eval.driver / mace_core.evaluation.suites from [a-z0-9-] only, so a
# key can never leave the evals folder; safe_part checks them again.


def images_prefix(model_id: str, suite: str) -> str:
    return f"evals/images/{safe_part(model_id, 'model id')}/{safe_part(suite, 'suite')}"


def reference_cache_key(key: str) -> str:
    return f"evals/cache/fid-reference/{safe_part(key, 'cache key')}.safetensors"


def image_key(model_id: str, suite: str, prompt_id: str) -> str:
    return f"{images_prefix(model_id, suite)}/{safe_part(prompt_id, 'prompt id')}.png"


@dataclass(frozen=True)
class EvalLayout(ReportFolder):
    eval_id: str

    prompts = Under("prompts.json")

    @property
    def root(self) -> str:
        return f"evals/{safe_part(self.eval_id, 'eval id')}"

    def scores(self, tag: str) -> str:
        return f"{self.root}/scores/{safe_part(tag, 'model tag')}.json"
