"""Generation: the 8-scene story rendered, recorded and bundled.

    schedulers, sampler   samplers built on the model's own noise schedule; checked sampler settings
    render                batched, seeded denoising; two-stage hires; best-of-N
    memory                offload / VAE slicing+tiling / text-encoder release / attention / compile
    loras                 the LoRA files to stack, with their strengths and sha256s
    runs                  run= / checkpoint=: a training checkpoint and the config it renders with
    outputs, panel        images with PNG text, the 4x2 panel, prompts.csv
    manifest              manifest.json: everything needed to regenerate the images
    run                   the generate.py job
    reproduce             regenerate a manifest and compare pixel by pixel
    submission, model_card   the competition bundle and its README
"""
