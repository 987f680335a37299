"""The paper's evaluation protocols (MACE Sec. 4) as a plain library: no Ray, no S3, no CLI.

Modules, in the order a run uses them:

- ``suites``      prompt suites with fixed per-image seeds: objects (CIFAR-10 + synonyms),
                  celebrities and styles (templates x seeds), explicit (I2P CSV), coco (captions CSV)
- ``prompt_csv``  reading and validating the user-supplied I2P / COCO prompt CSVs
- ``seeds``       deterministic seeds derived from (base, suite, prompt, index)
- ``generation``  images of a shard of prompts, each from its own seed
- ``clip_model``  CLIP image/text embeddings (hub id, local folder, or the built-in tiny random CLIP)
- ``recognition`` celebrity recognisers (default: CLIP zero-shot over the names; pluggable)
- ``nudity``      NudeNet detections per exposed class (the explicit protocol)
- ``features``    FID feature extractors: FID Inception-v3 (pytorch-fid) or CLIP image features
- ``fid``         additive feature moments and the Frechet distance
- ``metrics``     the formulas: zero-shot accuracy, H_o, H_c, CLIP score, H_a, exposed counts
- ``scoring``     per-image scores of a shard and their per-suite summary
- ``summary``, ``plots``  the Markdown summary and matplotlib PNGs of a report
"""
