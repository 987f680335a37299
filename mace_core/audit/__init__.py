"""The audit: does an erased concept come back when asked another way?

Erasure that only holds for the prompts it was trained on is not erasure. The audit attacks
each erased concept through the erased model and measures, against the ORIGINAL model, how
much of the concept comes back:

- ``attacks/``: one module per attack behind ``base.Attack`` (indirect prompts, concept
  inversion, soft-prompt search); a new attack is one new module;
- ``measures``: the leak and residual of a prompt, read off the attn2 keys and values on
  held-out templates (the erasure report's quantities, with the attack's prompt);
- ``embedding``: prompts with learned input embeddings, encoded differentiably;
- ``context``: both models and one concept's attack context;
- ``generation`` and ``scoring``: images of an attack's prompt, judged by ``mace-ray eval``'s
  scorers (CLIP zero-shot, NudeNet);
- ``report``: per-concept figures, attack success rate per concept type, summary, plots.

No Ray, no storage here: ``mace_ray/audit*.py`` runs it as ``mace-ray audit``.
"""
