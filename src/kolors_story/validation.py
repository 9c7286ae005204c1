"""Render and score the story at a training checkpoint, with the LoRA as it is at that step.

The story's 8 prompts were encoded once by the cache stage (the text encoder is not resident
while training); each checkpoint denoises the same scenes with the same seeds (``sampler`` group,
``validation`` preset: fewer steps than the final render), writes ``1.png``..``8.png`` + the panel,
and scores them with the competition's aesthetic predictor.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kolors_story.generation import render_scenes, save_story
from kolors_story.io import atomic_write_json
from kolors_story.story import Scene


class StoryValidator:
    """Renders ``scenes`` from precomputed ``embeds`` with ``pipe`` (whose UNet is the one being trained)."""

    def __init__(self, pipe, scenes: list[Scene], embeds: dict[str, torch.Tensor], sampler_cfg, scorer_cfg,
                 title: str = "story"):
        self.pipe = pipe
        self.scenes = list(scenes)
        n = embeds["prompt_embeds"].shape[0]
        if n != len(self.scenes):
            raise ValueError(
                f"the cached story embeddings hold {n} scenes but the story has {len(self.scenes)}; "
                "rebuild them with `python train.py stage=data`"
            )
        self.embeds = embeds
        self.sampler = sampler_cfg
        self.scorer_cfg = scorer_cfg
        self.threshold = float(scorer_cfg.get("threshold", 6.0)) if scorer_cfg is not None else 6.0
        self.title = title
        self._scorer = None
        name = sampler_cfg.get("scheduler") if sampler_cfg is not None else None
        if name:  # the sampler the final render will use (the training schedule is not touched)
            from omegaconf import OmegaConf

            from kolors_story.schedulers import build_scheduler

            kwargs = sampler_cfg.get("scheduler_kwargs") or {}
            kwargs = OmegaConf.to_container(kwargs, resolve=True) if OmegaConf.is_config(kwargs) else dict(kwargs)
            pipe.scheduler = build_scheduler(str(name), pipe.scheduler.config, **kwargs)

    @property
    def scorer(self):
        if self._scorer is None:  # loaded at the first checkpoint, then kept
            from kolors_story.scoring import AestheticScorer

            self._scorer = AestheticScorer.from_config(self.scorer_cfg)
        return self._scorer

    def render(self):
        unet = self.pipe.unet
        was_training = unet.training
        device, dtype = unet.device, unet.dtype
        embeds = {k: v.to(device=device, dtype=dtype) for k, v in self.embeds.items()}
        s = self.sampler
        # Own RNG scope: rendering must not shift the training run's random streams.
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            unet.eval()
            try:
                return render_scenes(
                    self.pipe, self.scenes, embeds, steps=int(s.steps), cfg=float(s.cfg),
                    height=int(s.height), width=int(s.width), batch_size=int(s.get("batch_size", 8)),
                )
            finally:
                unet.train(was_training)

    def run(self, out_dir: str | Path, run_dir: str | Path, step: int) -> dict:
        """Render, save and score into ``out_dir``; paths in the result are relative to ``run_dir``."""
        from kolors_story.scoring import coherence, summarize_scores

        out_dir, run_dir = Path(out_dir), Path(run_dir)
        images = self.render()
        saved = save_story(images, self.scenes, out_dir, title=f"{self.title} | step {step}")
        scores, embeddings = self.scorer.score_and_embed(images)
        summary = summarize_scores(scores, threshold=self.threshold)
        coh = coherence(embeddings) if len(images) > 1 else {"coherence": None, "outlier": None}
        result = {
            "scores": summary["scores"],
            "mean": summary["mean"],
            "min": summary["min"],
            "passed": summary["passed"],
            "threshold": self.threshold,
            "coherence": coh["coherence"],
            "outlier": coh["outlier"],
            "scenes": [
                {"index": sc.index, "seed": sc.seed, "description": sc.description, "prompt": sc.prompt,
                 "score": float(score), "image": Path(p).name}
                for sc, score, p in zip(self.scenes, summary["scores"], saved["images"])
            ],
            "sampler": {k: self.sampler.get(k) for k in ("scheduler", "steps", "cfg", "height", "width")},
            "tiny_scorer": bool(getattr(self.scorer, "tiny", False)),
        }
        atomic_write_json(out_dir / "scores.json", {"step": int(step), **result})
        result["images"] = [Path(p).name for p in saved["images"]]
        result["panel"] = Path(saved["panel"]).name
        return result


def read_scores(checkpoint_dir: str | Path) -> dict:
    return json.loads((Path(checkpoint_dir) / "scores.json").read_text(encoding="utf-8"))
