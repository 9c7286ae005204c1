"""Render and score the story at a training checkpoint, with the LoRA as it is at that step.

The story's 8 prompts were encoded once by the cache stage (the text encoder is not resident
while training); each checkpoint denoises the same scenes with the same seeds (``sampler`` group,
``validation`` preset: fewer steps than the final render), writes ``1.png``..``8.png`` + the panel,
and scores them with the competition's aesthetic predictor (plus CLIP-T against the English prompts).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kolors_story.config import CoherenceSettings, SamplerSettings, ScorerSettings
from kolors_story.evaluate.alignment import PromptAligner
from kolors_story.evaluate.scorer import AestheticScorer
from kolors_story.evaluate.summary import score_story
from kolors_story.generate.coherence import (
    StoryCoherence,
    coherence_on,
    prepare_pipeline,
)
from kolors_story.generate.outputs import save_story
from kolors_story.generate.reference import unload_adapter
from kolors_story.generate.render import render_scenes
from kolors_story.generate.schedulers import build_scheduler
from kolors_story.records import SCORES_FILE, CheckpointScores, SceneScore
from kolors_story.story import Scene
from kolors_story.train.character_parts import stacked_lora


@dataclass
class CheckpointStory:
    """What a checkpoint's validation render left: its scores (``scores.json``) and its files."""

    scores: CheckpointScores
    images: list[str]  # file names in the checkpoint folder
    panel: str


class StoryValidator:
    """Renders ``scenes`` from precomputed ``embeds`` with ``pipe`` (whose UNet is the one being trained)."""

    def __init__(self, pipe, scenes: list[Scene], embeds: dict[str, torch.Tensor], sampler: SamplerSettings,
                 scorer: ScorerSettings, title: str = "story", coherence: CoherenceSettings | None = None,
                 character: tuple[Path, float] | None = None):
        self.pipe = pipe
        self.scenes = list(scenes)
        n = embeds["prompt_embeds"].shape[0]
        if n != len(self.scenes):
            raise ValueError(
                f"the cached story embeddings hold {n} scenes but the story has {len(self.scenes)}; "
                "rebuild them with `python train.py stage=data`"
            )
        self.embeds = embeds
        self.sampler = sampler
        self.scorer_settings = scorer
        self.title = title
        self.coherence = coherence if coherence_on(coherence) else None  # the same coherence as the final render
        self.character = character  # (file, scale): the character LoRA, stacked for each render as generate.py run= does
        self._scorer = None
        self._aligner = None
        # The sampler the final render will use (the training schedule is not touched).
        pipe.scheduler = build_scheduler(sampler.scheduler, pipe.scheduler.config, **sampler.scheduler_kwargs)

    @property
    def scorer(self) -> AestheticScorer:
        if self._scorer is None:  # loaded at the first checkpoint (or earlier by the caller), then kept
            self._scorer = AestheticScorer.from_settings(self.scorer_settings)
        return self._scorer

    @property
    def aligner(self) -> PromptAligner | None:
        if self._aligner is None and self.scorer_settings.alignment and any(s.prompt_en for s in self.scenes):
            self._aligner = PromptAligner.from_settings(self.scorer_settings)
        return self._aligner

    def render(self):
        unet = self.pipe.unet
        was_training = unet.training
        device, dtype = unet.device, unet.dtype
        embeds = {k: v.to(device=device, dtype=dtype) for k, v in self.embeds.items()}
        s = self.sampler
        retries: list[dict] = []
        # Own RNG scope: rendering must not shift the training run's random streams.
        with torch.random.fork_rng(devices=[]), torch.no_grad(), stacked_lora(self.pipe, *(self.character or (None, 0))):
            unet.eval()
            try:
                images = self._render_coherent(embeds, retries)
            finally:
                unet.train(was_training)
        if retries:  # it ran out of memory at this batch: the next checkpoints render smaller batches
            s.batch_size = max(1, min(r["batch_size"] for r in retries) // 2)
            print(f"story validation ran out of GPU memory: rendering {s.batch_size} scenes at a time from now on")
        return images

    def _render_coherent(self, embeds, retries: list[dict]):
        """The story as generate.py renders it: with the coherence settings (IP-Adapter loaded for this
        render only: the training step runs without it), else plainly."""
        s = self.sampler
        kwargs = dict(steps=s.steps, cfg=s.cfg, height=s.height, width=s.width, batch_size=s.batch_size,
                      retries=retries)
        if self.coherence is None:
            return render_scenes(self.pipe, self.scenes, embeds, **kwargs)
        adapter = prepare_pipeline(self.pipe, self.coherence, self.pipe.unet.dtype, self.pipe.unet.device)
        coherence = StoryCoherence(self.pipe, self.scenes, self.coherence)
        try:
            return render_scenes(self.pipe, self.scenes, embeds, coherence=coherence, **kwargs)
        finally:
            coherence.close()
            if adapter is not None:
                unload_adapter(self.pipe)

    def run(self, out_dir: str | Path, run_dir: str | Path, step: int) -> CheckpointStory:
        """Render, save and score into ``out_dir`` (its ``scores.json``); returns the scores and the files."""
        out_dir = Path(out_dir)
        images = self.render()
        saved = save_story(images, self.scenes, out_dir, title=f"{self.title} | step {step}")
        summary = score_story(self.scorer, self.aligner, images, [s.prompt_en for s in self.scenes],
                              self.scorer_settings)
        result = CheckpointScores(
            step=int(step), **summary.to_json(),
            scenes=[SceneScore(index=sc.index, seed=sc.seed, description=sc.description, prompt=sc.prompt,
                               prompt_en=sc.prompt_en, score=float(score), image=Path(p).name)
                    for sc, score, p in zip(self.scenes, summary.scores, saved["images"])],
            sampler={k: getattr(self.sampler, k) for k in ("scheduler", "steps", "cfg", "height", "width")},
            tiny_scorer=self.scorer.note is not None,
        )
        result.write(out_dir / SCORES_FILE)
        return CheckpointStory(result, [Path(p).name for p in saved["images"]], Path(saved["panel"]).name)
