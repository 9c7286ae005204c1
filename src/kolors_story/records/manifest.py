"""``manifest.json``: how a story was made, enough to regenerate every image (resolved config,
model hash, LoRA sha256s, sampler, seeds, best-of picks, coherence inputs, versions).

Written by ``generate.manifest.build_manifest``; read by reproduce, the submission bundle and its
model card, the coherence comparison and ``evaluate.py images=<story folder>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kolors_story.errors import MissingFileError, SettingsError
from kolors_story.records.base import Record, RecordError
from kolors_story.records.layout import MANIFEST_FILE, MANIFEST_FORMAT
from kolors_story.records.scores import StoryScores


class ModelRecord(Record):
    name: str
    path: str
    path_resolved: str | None = None
    vae_path: str | None = None
    hash: str
    dtype: str | None = None
    device: str | None = None
    text_encoder_quant: str | None = None  # none | int8 | nf4 (models.quantization); None: written before it existed


class LoraRecord(Record):
    path: str
    file: str
    scale: float
    sha256: str | None = None
    bundle_file: str | None = None  # its name inside a submission bundle


class CandidateRecord(Record):
    """One best-of candidate of a scene."""

    candidate: int
    seed: int
    score: float | None = None  # None when reproduced (the recorded choice needs no scorer)
    clip_t: float | None = None


class SceneRecord(Record):
    index: int
    description: str = ""
    prompt: str
    negative: str = ""
    seed: int  # seed of the kept image (best-of may pick another candidate than the scene's own)
    scene_seed: int | None = None
    caption_ascii: str | None = None
    prompt_en: str | None = None
    has_character: bool | None = None
    image: str
    sha256: str | None = None
    score: float | None = None
    candidates: list[CandidateRecord] | None = None
    chosen_candidate: int | None = None


class SamplerRecord(Record):
    scheduler: str
    scheduler_class: str | None = None
    steps: int
    cfg: float
    stage1_size: list[int] | None = None
    size: list[int]  # [height, width] of the final images
    batch_size: int | None = None


class HiresRecord(Record):
    enabled: bool = True
    stage1_size: list[int]
    final_size: list[int] | None = None
    upscaler: str
    scale: float | None = None
    strength: float
    steps: int
    refine_steps_run: int | None = None
    cfg: float | None = None
    pipeline: str | None = None


class BestOfRecord(Record):
    n: int
    seed_stride: int | None = None
    selected_by: str = "aesthetic score"
    chosen: list[int] | None = None


class SelectionRecord(Record):
    """Which candidate of each scene best-of kept, and why (``generate.best_of``)."""

    select: str  # scene | story
    objective: Any  # a sentence (scene) or the story objective's weights (story)
    method: str | None = None
    chosen: list[int]
    chosen_story: dict | None = None
    per_scene_best: list[int] | None = None
    per_scene_best_story: dict | None = None
    candidates: list[list[CandidateRecord]]
    why: str


class ReferenceImageRecord(Record):
    image: str  # the path it was read from
    name: str
    sha256: str
    bundle_file: str | None = None  # its copy inside a submission bundle


class AdapterRecord(Record):
    """The IP-Adapter that was loaded (identified by its weight file's sha256)."""

    weight_sha256: str | None = None


class ReferenceRecord(Record):
    scene: int | None = None
    image: ReferenceImageRecord | None = None
    scales: list[float]
    adapter: AdapterRecord | None = None


class SharingRecord(Record):
    references: list[int]
    strength: float
    blocks: list[str]
    window: list[float]
    token_ratio: float
    seed: int | None = None
    record_device: str | None = None
    recorded_bytes: int | None = None


class CoherenceRecord(Record):
    sharing: SharingRecord | None = None
    reference: ReferenceRecord | None = None


class StoryRecord(Record):
    title: str
    language: str = "zh"
    trigger: str | None = ""
    file: str | None = None  # story.file as given (the scenes themselves are in config.story)
    file_sha256: str | None = None  # of that file when the story was rendered; bundles keep a copy


class BundleRecord(Record):
    name: str
    team: str
    lora_files: list[str] = []


class Manifest(Record):
    """``manifest.json`` of a story folder or bundle."""

    format: str  # MANIFEST_FORMAT
    created: str | None = None
    tiny_model: bool = False
    note: str | None = None
    model: ModelRecord
    loras: list[LoraRecord] = []
    scheduler: dict = {}  # class + full config
    sampler: SamplerRecord
    hires: HiresRecord | None = None
    best_of: BestOfRecord | None = None
    selection: SelectionRecord | None = None
    candidates_panel: str | None = None  # best-of: CANDIDATES_FILE
    coherence: CoherenceRecord | None = None
    memory: dict = {}
    story: StoryRecord
    scenes: list[SceneRecord]
    images: dict[str, str] = {}  # file -> sha256
    panel: str | None = None
    scores: StoryScores | None = None  # when scored (+ a note for a stand-in model)
    source: dict | None = None  # the training checkpoint (run=) or the reproduced manifest
    config: dict  # the resolved generate config
    overrides: list[str] = []
    versions: dict = {}
    seconds: float | None = None
    bundle: BundleRecord | None = None  # only inside a submission bundle

    @property
    def reference_image(self) -> ReferenceImageRecord | None:
        """The character sheet the story was conditioned on (coherence.reference.image), if any."""
        ref = self.coherence.reference if self.coherence else None
        return ref.image if ref else None

    @property
    def adapter_sha256(self) -> str | None:
        """The IP-Adapter weights' sha256 when one was loaded."""
        ref = self.coherence.reference if self.coherence else None
        return ref.adapter.weight_sha256 if ref and ref.adapter else None


def load_manifest(source: str | Path) -> tuple[Manifest, Path]:
    """The manifest and the folder holding its images (a bundle, output folder or the file itself)."""
    path = Path(str(source)).expanduser()
    if path.is_dir():
        manifest_path = path / MANIFEST_FILE
    elif path.is_file():
        manifest_path = path
    else:
        raise MissingFileError(f"reproduce={source}: no such file or folder")
    if not manifest_path.is_file():
        raise MissingFileError(
            f"reproduce={source}: {manifest_path} does not exist; give a generate.py output folder, a submission "
            "bundle or a manifest.json"
        )
    try:
        import json

        data = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SettingsError(f"{manifest_path} is not valid JSON ({err}); it is not a kolors-story manifest") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT or "config" not in data:
        raise SettingsError(f"{manifest_path} is not a kolors-story manifest (expected format {MANIFEST_FORMAT!r})")
    return Manifest.from_json(data, source=manifest_path), manifest_path.parent


__all__ = ["AdapterRecord", "BestOfRecord", "BundleRecord", "CandidateRecord", "CoherenceRecord", "HiresRecord",
           "LoraRecord", "Manifest", "ModelRecord", "RecordError", "ReferenceImageRecord", "ReferenceRecord",
           "SamplerRecord", "SceneRecord", "SelectionRecord", "SharingRecord", "StoryRecord", "load_manifest"]
