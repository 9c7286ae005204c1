"""The LoRA files a story is rendered with: ``lora_path`` (or a run's checkpoint) then ``loras``,
stacked on the UNet with their own strengths, each recorded by sha256."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kolors_story.config import GenerateSettings
from kolors_story.errors import MissingFileError, SettingsError
from kolors_story.files import file_sha256
from kolors_story.records import LoraRecord


@dataclass
class LoraSpec:
    path: Path
    scale: float = 1.0
    sha256: str | None = None
    bundle_file: str | None = None  # name inside a submission bundle, when it came from one

    def as_record(self) -> LoraRecord:
        d = LoraRecord(path=str(self.path), file=self.path.name, scale=float(self.scale), sha256=self.sha256)
        if self.bundle_file:
            d.bundle_file = self.bundle_file
        return d


def lora_specs(job: GenerateSettings) -> list[LoraSpec]:
    """``lora_path`` (with ``lora_scale``) followed by ``loras`` (a list of {path, scale} or paths)."""
    specs = []
    if job.lora_path:
        specs.append(LoraSpec(Path(str(job.lora_path)).expanduser(), float(job.lora_scale)))
    for n, item in enumerate(job.loras or []):
        if isinstance(item, str):
            path, scale = item, 1.0
        else:
            if not item.get("path"):
                raise SettingsError(f"loras[{n}] has no path: give each entry as {{path: <file>, scale: <float>}}")
            path, scale = item["path"], item.get("scale", 1.0)
        specs.append(LoraSpec(Path(str(path)).expanduser(), float(scale)))
    for n, spec in enumerate(specs):
        if not spec.path.is_file():
            raise MissingFileError(f"LoRA file {spec.path} (LoRA #{n + 1}) does not exist; check lora_path / loras")
    return specs


def load_loras(pipe, specs: list[LoraSpec]) -> list[LoraSpec]:
    """Load and stack every LoRA (rank/alpha come from each file) and record each file's sha256."""
    from kolors_story.lora import load_lora_into_pipeline

    for n, spec in enumerate(specs):
        load_lora_into_pipeline(pipe, spec.path, scale=spec.scale, adapter_name=f"lora{n + 1}")
        spec.sha256 = file_sha256(spec.path)
    return specs
