"""Training: a LoRA on the Kolors UNet, from the latent/embedding cache.

    module        the LightningModule: noise-prediction loss on the Kolors schedule, min-SNR, offset noise
    loader        cached items, a resumable rank-aware batch sampler with per-sample noise seeds
    checkpoints   train lines, checkpoint folders (LoRA x3, story, scores, trainer state), Ctrl-C save
    validation    the story rendered and scored at each checkpoint
    logger, wandb_mirror   metrics.jsonl and its W&B mirror
    devices       precision, strategy, world size, which process writes
    resume        resume= config and trainer state
    report        the console summary
    run           the train.py job (data stage -> cache -> training)
"""
