"""MACE (Mass Concept Erasure, Lu et al., CVPR 2024) as a plain library.

No Ray, no S3, no CLI: every function here takes tensors, models and settings and
returns tensors or dataclasses. Orchestration lives in ``mace_ray``.
"""

__version__ = "0.1.0"
