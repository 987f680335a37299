"""Storage keys of evaluations (local folder or s3://bucket/prefix, same keys).

evals/images/<model_id>/<suite>/<prompt_id>.png   generated images, shared by every eval
                                                 that renders the same prompt with the same
                                                 model and generation settings (resume/reuse)
evals/<eval_id>/report.json                      metrics per model, settings, versions, timings
evals/<eval_id>/summary.md                       Markdown summary (one column per model)
evals/<eval_id>/prompts.json                     the suite: every prompt with its seed
evals/<eval_id>/scores/<tag>.json                per-image scores of each model
evals/<eval_id>/plots/<name>.png                 bar charts
evals/cache/fid-reference/<key>.safetensors      FID moments of a reference image folder
                                                 (keyed by its files and the feature extractor)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Ids are made by mace_ray.evaluate / mace_core.evaluation.suites from [a-z0-9-] only, so a
# key can never leave the evals folder; checked again here.
_ID = re.compile(r"^[a-z0-9][a-z0-9-]*$")


def _safe(value: str, what: str) -> str:
    if not _ID.match(value):
        raise ValueError(f"unsafe {what} {value!r}")
    return value


def images_prefix(model_id: str, suite: str) -> str:
    return f"evals/images/{_safe(model_id, 'model id')}/{_safe(suite, 'suite')}"


def reference_cache_key(key: str) -> str:
    return f"evals/cache/fid-reference/{_safe(key, 'cache key')}.safetensors"


def image_key(model_id: str, suite: str, prompt_id: str) -> str:
    return f"{images_prefix(model_id, suite)}/{_safe(prompt_id, 'prompt id')}.png"


@dataclass(frozen=True)
class EvalLayout:
    eval_id: str

    @property
    def root(self) -> str:
        return f"evals/{_safe(self.eval_id, 'eval id')}"

    @property
    def report(self) -> str:
        return f"{self.root}/report.json"

    @property
    def summary(self) -> str:
        return f"{self.root}/summary.md"

    @property
    def prompts(self) -> str:
        return f"{self.root}/prompts.json"

    def scores(self, tag: str) -> str:
        return f"{self.root}/scores/{_safe(tag, 'model tag')}.json"

    def plot(self, name: str) -> str:
        if not re.match(r"^[a-z0-9_-]+\.png$", name):
            raise ValueError(f"unsafe plot name {name!r}")
        return f"{self.root}/plots/{name}"
