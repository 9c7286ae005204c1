"""``python -m kolors_story.bench``: where time and memory go, at real Kolors scale and measured here.

Sections (``--only`` picks some; the others already in ``bench.json`` are kept), one module each:

- ``flops``: real-scale accounting on the meta device (no weights): FLOPs of a LoRA training step
  at 1024x1024, of ChatGLM3-6B prompt encoding and of the SDXL VAE encode; peak activation memory;
  resident parameter bytes. What the latent/embedding cache saves per step.
- ``train``: LoRA training steps/s and peak step memory on the ``bench`` model (same classes as
  Kolors): cache vs encoding every step, gradient checkpointing off vs on, raw loop vs Lightning.
- ``generate``: the 8-scene story, batched vs one pipeline call per scene; images must match.
- ``score``: the aesthetic score at the real CLIP ViT-L/14 size, batched vs one image per call.
- ``data``: data stage throughput (preflight, data-juicer recipe, cache build, cache reuse).
- ``text_encoder``: ChatGLM3 in int8/nf4 against full precision (``model.text_encoder_quant``).
- ``gpu``: the GPU check (``gpu*.py``): every memory-plan stage measured on a card against its
  prediction (``--device cpu`` on the bench-size models, ``--plan-only`` on the meta device).

``timing`` holds the A/B harness: every comparison runs A and B alternately after a warm-up and
reports medians and their ratio from the same run, so machine load drifts hit both sides.
``table`` renders the result; ``run`` writes ``bench.json`` (atomically, section by section).
"""
