"""Keeping the characters the same in every panel (the ``coherence`` settings) during one render.

Two passes when anything is on: first the scenes the others depend on (candidate 0 of the sharing
references and of the reference scene), one at a time, then everything else. In the second pass,
scenes that use different IP-Adapter strengths are batched apart (the strength is one number per
pipeline call).
With everything off no object is made at all: the render is exactly the plain one.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from PIL import Image

from kolors_story.config import CoherenceSettings, SharingSettings
from kolors_story.generate import reference as ref_mod
from kolors_story.generate.sharing import check_sharing, install_sharing
from kolors_story.story import Scene


def coherence_on(settings: CoherenceSettings | None) -> bool:
    return settings is not None and (settings.sharing.used() or settings.reference.used())


def check_coherence(settings: CoherenceSettings, scenes: list[Scene]) -> None:
    """Every coherence setting and file, before any model is loaded."""
    check_sharing(settings.sharing, len(scenes))
    ref_mod.check_reference(settings.reference, len(scenes))


def reference_positions(scenes: list[Scene], sharing: SharingSettings) -> list[int]:
    """0-based scenes the others read: the configured ones, else the first naming the character, else scene 1."""
    if sharing.reference_scenes:
        return sorted({int(n) - 1 for n in sharing.reference_scenes})
    named = [n for n, s in enumerate(scenes) if s.has_character]
    return [named[0] if named else 0]


def prepare_pipeline(pipe, settings: CoherenceSettings | None, dtype, device) -> dict | None:
    """Load the IP-Adapter onto ``pipe`` when a reference is used (before offload hooks wrap the models)."""
    if settings is None or not settings.reference.used():
        return None
    return ref_mod.load_adapter(pipe, settings.reference, dtype, device)


class StoryCoherence:
    """What one render does for coherence: the order of the scenes, the shared-attention state of
    each batch and the IP-Adapter input of each pipeline call."""

    def __init__(self, pipe, scenes: list[Scene], settings: CoherenceSettings):
        self.pipe, self.scenes, self.settings = pipe, scenes, settings
        self.sharing = settings.sharing.used()
        self.referencing = settings.reference.used()
        ref = settings.reference
        self.references = reference_positions(scenes, settings.sharing) if self.sharing else []
        self.reference_scene = (int(ref.scene) - 1 if self.referencing and ref.image is None and ref.scene is not None
                                else None)
        self.first = sorted(set(self.references) | ({self.reference_scene} if self.reference_scene is not None else set()))
        self.scales = ref_mod.scene_scales(ref, len(scenes)) if self.referencing else None
        self.image = ref_mod.reference_image(ref.image) if self.referencing and ref.image is not None else None
        self._embeds: dict[bool, list[torch.Tensor]] = {}
        self.state, self._undo = None, None
        if self.sharing:
            self.state, self._undo = install_sharing(pipe.unet, settings.sharing,
                                                     pipe.scheduler.config.num_train_timesteps, pipe.unet.device)
        self._pass = 0

    # ------------------------------------------------------------------ the order of the jobs

    def groups(self, jobs) -> Iterator[tuple[int, list[int]]]:
        """``(pass, job indices)``: each group is batched on its own, in this order. The first pass
        renders one job at a time: the sharing references in scene order (each reads the ones
        before it), then the reference scene if it is not one of them; the same whatever the batch
        size."""
        first = [i for i, j in enumerate(jobs) if j.candidate == 0 and j.scene in self.first]
        first.sort(key=lambda i: (jobs[i].scene not in self.references, jobs[i].scene))
        for i in first:
            yield 0, [i]
        taken = set(first)
        rest = [i for i in range(len(jobs)) if i not in taken]
        for scale in sorted({self._scale(1, jobs[i].scene) for i in rest}):
            yield 1, [i for i in rest if self._scale(1, jobs[i].scene) == scale]

    def _scale(self, pass_no: int, scene: int) -> float:
        if not self.referencing or (pass_no == 0 and self.reference_scene is not None):
            return 0.0  # the reference scene's image does not exist yet in the first pass
        return self.scales[scene]

    def after_first_pass(self, jobs, images: list) -> None:
        """The reference scene's image (candidate 0) becomes the IP-Adapter input of the second pass."""
        if self.reference_scene is None:
            return
        at = next(i for i, j in enumerate(jobs) if j.scene == self.reference_scene and j.candidate == 0)
        self.image, self._embeds = images[at], {}

    # ------------------------------------------------------------------ one batch

    def begin_group(self, pass_no: int, scene: int) -> None:
        self._pass = pass_no
        if self.referencing:
            self.pipe.set_ip_adapter_scale(self._scale(pass_no, scene))

    def begin_batch(self, batch) -> None:
        if self.state is None:
            return
        scenes = [j.scene for j in batch]
        if self._pass == 0:  # one scene (see groups)
            (scene,) = scenes
            if scene in self.references:  # records its tokens; reads the references rendered before it
                self.state.begin_batch("record", scenes, [self.references.index(scene) > 0])
            else:  # the reference scene, when it is not a sharing reference
                self.state.begin_batch("read", scenes, [True])
        else:
            self.state.begin_batch("read", scenes, [s not in self.references for s in scenes])

    def call_kwargs(self, cfg: bool) -> dict:
        """What each pipeline call of the batch gets (the stage-1 call and the hires refine)."""
        if not self.referencing:
            return {}
        if cfg not in self._embeds:
            image = self.image if self.image is not None else Image.new("RGB", (64, 64))  # scale 0: unused
            self._embeds[cfg] = ref_mod.image_embeds(self.pipe, image, self.pipe.unet.device, cfg)
        return {"ip_adapter_image_embeds": self._embeds[cfg]}

    # ------------------------------------------------------------------ the record

    def record(self) -> dict:
        out: dict = {}
        if self.sharing:
            s = self.settings.sharing
            out["sharing"] = {"references": [n + 1 for n in self.references], "strength": s.strength,
                              "blocks": list(s.blocks), "window": [s.start, s.end], "token_ratio": s.token_ratio,
                              "seed": s.seed, "record_device": s.record_device,
                              "recorded_bytes": self.state.bank.nbytes}
        if self.referencing:
            ref = self.settings.reference
            out["reference"] = {"scene": None if self.reference_scene is None else self.reference_scene + 1,
                                "image": ref_mod.image_record(ref), "scales": self.scales}
        return out

    def close(self) -> None:
        if self._undo is not None:
            self._undo()
            self._undo = None
