"""The method's own version, part of the key of every stored result.

A run id, a prior-statistics cache key and a training-data key (``data/<key>/``) each hash
``METHOD_VERSION``, so that artefacts made by one version of the method are never resumed,
reused or mixed under one "complete" by another.

BUMP ``METHOD_VERSION`` (an integer, +1) IN THE SAME CHANGE whenever the maths or a stored
format changes: a closed form, a default weight, the prompts a stage builds, how images,
masks, statistics or LoRAs are made or serialised. A change that leaves every stored byte
and every number as it was (logging, refactoring, speed) does not bump it. The packaged
prompt files (templates, held-out prompts) are hashed on their own
(``mace_core.prompts.prompt_data_digest``): editing them needs no bump.
"""

from __future__ import annotations

# 2: the closed forms weigh an MMDiT's pooled block on its own (its statistics record its rows).
# 3: on a GPU (--precision auto) an MMDiT's images and LoRAs are made on its transformer held in
#    bf16 (``ModelFamily.half_weights``); nothing made on a CPU changes.
METHOD_VERSION = 3
