"""The three jobs' settings (``conf/train.yaml``, ``generate.yaml``, ``evaluate.yaml``) and their registration with Hydra.

Every key with its type, default and a one-line comment (see :mod:`kolors_story.config`)."""

# No ``from __future__ import annotations`` here: OmegaConf reads these annotations at runtime.
from dataclasses import dataclass, field
from typing import Any, List, Optional

from omegaconf import II, MISSING

from kolors_story.config.character_settings import CharacterSettings
from kolors_story.config.comfyui_settings import ComfyUISettings, allow_boolean_group_choices
from kolors_story.config.data_settings import DATASET_SCHEMAS, CacheSettings, DatasetSettings, FilterSettings
from kolors_story.config.model_settings import ModelSettings, ScorerSettings
from kolors_story.config.report_settings import GridSettings
from kolors_story.config.story_settings import (
    CoherenceSettings,
    LeaderboardSettings,
    MemorySettings,
    SamplerSettings,
    StorySettings,
    SubmitSettings,
)
from kolors_story.config.train_settings import (
    LoggerSettings,
    LoraSettings,
    OptimSettings,
    RewardSettings,
    TrainerSettings,
)


@dataclass
class TrainSettings:
    """`python train.py`: conf/train.yaml."""

    model: ModelSettings = MISSING
    scorer: ScorerSettings = MISSING
    dataset: DatasetSettings = MISSING
    filter: FilterSettings = MISSING
    lora: LoraSettings = MISSING
    optim: OptimSettings = MISSING
    trainer: TrainerSettings = MISSING
    story: StorySettings = MISSING
    sampler: SamplerSettings = MISSING
    logger: LoggerSettings = MISSING
    memory: MemorySettings = MISSING
    coherence: CoherenceSettings = MISSING
    reward: RewardSettings = MISSING  # reward refinement on the aesthetic score (reward=aesthetic; none: off)
    character: CharacterSettings = field(default_factory=CharacterSettings)  # character=auto: an entity LoRA of story.character first (train.character)
    trigger: str = ""  # the LoRA's trigger words: put before every training caption and every rendered prompt (e.g. 水墨画)
    stage: str = "all"  # all (data + train), data (prepare + cache only) or train (reuse prepared data)
    resume: Optional[str] = None  # a previous run folder (or one of its checkpoints/step-* folders): continue from its last checkpoint
    validate: bool = True  # render + score the story (sampler group) at every checkpoint
    before_after: bool = True  # when a validated run finishes: the story at LoRA scale 0 and 1 -> before_after.png/.json (2 renders)
    data_dir: str = "data/${dataset.name}"  # processed dataset + report.json + cache for this dataset (shared by runs)
    output_dir: Optional[str] = II("hydra:runtime.output_dir")  # run folder: checkpoints/, metrics.jsonl, panels, W&B files
    cache: CacheSettings = field(default_factory=CacheSettings)  # the latent/embedding cache
    plan_only: bool = False  # print the memory plan, write plan.json, load nothing; exit 0 if it fits, 2 if not


@dataclass
class GenerateSettings:
    """`python generate.py`: conf/generate.yaml."""

    model: ModelSettings = MISSING
    scorer: ScorerSettings = MISSING
    story: StorySettings = MISSING
    sampler: SamplerSettings = MISSING
    memory: MemorySettings = MISSING
    coherence: CoherenceSettings = MISSING
    comfyui: ComfyUISettings = field(default_factory=ComfyUISettings)  # the story as a ComfyUI workflow (a default, not MISSING: older manifests have no comfyui and still reproduce)
    character: CharacterSettings = field(default_factory=CharacterSettings)  # with run=: the run's character LoRA is stacked at character.scale
    output_dir: Optional[str] = II("hydra:runtime.output_dir")  # where 1.png..8.png, panel.png, prompts.csv, manifest.json are written
    trigger: str = ""  # the LoRA's trigger words, put before every prompt (run= takes the training run's)
    lora_path: Optional[str] = None  # a LoRA file (any of the three formats or a DiffSynth epoch=..-step=..ckpt); rank/alpha are read from it
    lora_scale: float = 1.0  # strength of lora_path (or of run='s checkpoint): 0 -> the base model's image, 1 -> as trained
    loras: List[Any] = field(default_factory=list)  # more LoRAs stacked after lora_path: [{path: <file>, scale: 1.0}, ...]
    run: Optional[str] = None  # a train.py run folder (or a best.yaml): model/story/sampler from its config, LoRA from `checkpoint`
    checkpoint: str = "last"  # with run=: step-XXXXXX, last, best (best.yaml in the run/sweep folder) or a best.yaml path
    reproduce: Optional[str] = None  # a manifest.json, output folder or bundle: regenerate it and compare pixel by pixel (exit 1 if any differs)
    score: bool = False  # score the images with the aesthetic predictor (scores.json + manifest); bundles always score
    plan_only: bool = False  # print the memory plan, write plan.json, load nothing; exit 0 if it fits, 2 if not
    overwrite: bool = False  # replace a story already in output_dir (refused otherwise); it is replaced as one unit
    submit: SubmitSettings = field(default_factory=SubmitSettings)  # the competition submission bundle


@dataclass
class EvaluateSettings:
    """`python evaluate.py`: conf/evaluate.yaml."""

    model: ModelSettings = MISSING
    scorer: ScorerSettings = MISSING
    logger: LoggerSettings = MISSING
    memory: MemorySettings = MISSING
    images: Optional[str] = None  # folder with the story images (1.png..8.png, or any images) or a generate.py run folder
    output_dir: Optional[str] = None  # folder for scores.json; null -> beside the images (like a checkpoint's scores.json)
    sweep: Optional[str] = None  # a multirun folder (python train.py -m ...): rank its runs x checkpoints
    leaderboard: LeaderboardSettings = field(default_factory=LeaderboardSettings)  # how sweep= ranks checkpoints
    report: Optional[str] = None  # a train.py run folder: (re)write its report.html, curves.png and progress.png
    grid: GridSettings = field(default_factory=GridSettings)  # with sweep=: the X/Y grid of swept keys -> grid.png
    expected_images: int = 8  # the competition's story length; other counts are scored with a warning
    plan_only: bool = False  # print the memory plan, write plan.json, load nothing; exit 0 if it fits, 2 if not


# group -> schema (a group whose options differ in keys picks its schema per option: DATASET_SCHEMAS)
GROUP_SCHEMAS = {
    "model": ModelSettings, "scorer": ScorerSettings, "filter": FilterSettings, "lora": LoraSettings,
    "optim": OptimSettings, "trainer": TrainerSettings, "logger": LoggerSettings, "story": StorySettings,
    "sampler": SamplerSettings, "memory": MemorySettings, "coherence": CoherenceSettings, "reward": RewardSettings,
    "comfyui": ComfyUISettings, "character": CharacterSettings,
}
JOB_SCHEMAS = {"train": TrainSettings, "generate": GenerateSettings, "evaluate": EvaluateSettings}


def register_configs() -> None:
    """Put every schema into Hydra's ConfigStore (idempotent): ``<group>_schema`` for the group
    option files, ``<source>_dataset_schema`` per data source, ``<job>_schema`` for the job files."""
    from hydra.core.config_store import ConfigStore

    allow_boolean_group_choices()  # comfyui=true picks conf/comfyui/true.yaml
    store = ConfigStore.instance()
    for group, schema in GROUP_SCHEMAS.items():
        store.store(name=f"{group}_schema", node=schema)
    for source, schema in DATASET_SCHEMAS.items():
        store.store(name=f"{source}_dataset_schema", node=schema)
    for job, schema in JOB_SCHEMAS.items():
        store.store(name=f"{job}_schema", node=schema)
