"""Configuration, in one home: every key's schema (``*_settings``: type, default and a one-line
comment), composing Hydra's config into those typed settings (``compose``), and reading back the
config a finished run saved (``saved``).

The settings dataclasses are registered with Hydra's ConfigStore (``register_configs``) as the
schema of each config group: every option file in ``conf/<group>/`` starts from its schema
(``defaults: [/<group>_schema@_here_]``) and sets only what it changes, so a default lives here
once, and a mistyped value (``trainer.seed=abc``) fails when the config is composed, with Hydra's
message naming the key. Only the entry layer (``cli``) and this package read a raw Hydra config;
everything below receives these typed objects.

Defaults written ``II("...")`` are interpolations Hydra fills in (``sampler.height`` follows
``model.resolution``); code that builds these objects directly passes real values for them.
"""

from kolors_story.config.character_settings import CharacterSettings
from kolors_story.config.comfyui_settings import ComfyUISettings
from kolors_story.config.compose import compose_settings, config_yaml, plain, to_settings, typed
from kolors_story.config.data_settings import (
    DATASET_SCHEMAS,
    CacheSettings,
    DatasetSettings,
    DemoDatasetSettings,
    FilterSettings,
    ModelScopeDatasetSettings,
)
from kolors_story.config.job_settings import (
    GROUP_SCHEMAS,
    JOB_SCHEMAS,
    EvaluateSettings,
    GenerateSettings,
    TrainSettings,
    register_configs,
)
from kolors_story.config.model_settings import (
    ModelSettings,
    ScorerSettings,
    StoryObjectiveSettings,
    TinyModelSpec,
    TinyScorerSpec,
)
from kolors_story.config.report_settings import GridSettings
from kolors_story.config.story_settings import (
    BestOfSettings,
    CoherenceSettings,
    HiresSettings,
    LeaderboardSettings,
    MemorySettings,
    ReferenceSettings,
    SamplerSettings,
    SharingSettings,
    StorySettings,
    SubmitSettings,
    TinyIPAdapterSpec,
)
from kolors_story.config.train_settings import (
    EmaSettings,
    LoggerSettings,
    LoraSettings,
    LossSettings,
    OptimSettings,
    RewardSettings,
    TrainerSettings,
)

__all__ = [
    "DATASET_SCHEMAS", "GROUP_SCHEMAS", "JOB_SCHEMAS", "BestOfSettings", "CacheSettings", "CharacterSettings",
    "CoherenceSettings",
    "ComfyUISettings",
    "DatasetSettings", "DemoDatasetSettings", "EmaSettings", "EvaluateSettings", "FilterSettings",
    "GenerateSettings", "GridSettings", "HiresSettings", "LeaderboardSettings", "LoggerSettings", "LoraSettings",
    "LossSettings", "MemorySettings", "ModelScopeDatasetSettings", "ModelSettings", "OptimSettings", "ReferenceSettings",
    "RewardSettings", "SamplerSettings", "ScorerSettings", "SharingSettings", "StoryObjectiveSettings",
    "StorySettings", "SubmitSettings", "TinyIPAdapterSpec", "TinyModelSpec", "TinyScorerSpec", "TrainSettings",
    "TrainerSettings", "compose_settings", "config_yaml", "plain", "register_configs", "to_settings", "typed",
]
