"""Regenerate a story from its manifest and check every image against the recorded one.

``python generate.py reproduce=<manifest.json | output folder | submission bundle>`` renders with
the recorded config, LoRA files (checked by sha256) and best-of picks, then compares pixels:
each image is ``identical`` or ``differs`` (with how much), and the exit code is non-zero when
any image differs. Only where things live may change (``model.path=...`` when the weights moved).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf, open_dict
from PIL import Image

from kolors_story.configs import override_key, task_overrides, typed
from kolors_story.errors import SettingsError, UserError
from kolors_story.files import atomic_write_json, file_sha256
from kolors_story.generate.loras import LoraSpec
from kolors_story.generate.run import generate
from kolors_story.records import Manifest, load_manifest
from kolors_story.settings import GenerateConfig
from kolors_story.story import story_scenes

# Keys a user may change with reproduce=: where things live and what runs them, never what is
# rendered (memory modes change pixels by at most fp rounding, which the report shows).
LOCATION_KEYS = ("model.path", "model.vae_path", "model.device", "scorer.path", "scorer.device", "output_dir",
                 "coherence.reference.path", "memory", "memory.*")


def is_location_key(key: str) -> bool:
    return key in LOCATION_KEYS or key.startswith("memory.")


class ReproduceError(UserError, RuntimeError):
    """The recorded result cannot be regenerated as recorded (missing or changed inputs)."""


def recorded_loras(manifest: Manifest, folder: Path) -> list[LoraSpec]:
    """The LoRA files the manifest used: the bundle's copy first, else the recorded path; the
    file's sha256 must equal the recorded one (a changed LoRA cannot reproduce the images)."""
    specs = []
    for n, rec in enumerate(manifest.get("loras") or []):
        places = []
        if rec.get("bundle_file"):
            places.append(folder / rec["bundle_file"])
        places += [Path(rec["path"]), folder / rec["file"]]
        found, mismatched = None, []
        for place in places:
            if place.is_file():
                digest = file_sha256(place)
                if rec.get("sha256") in (None, digest):
                    found = place
                    break
                mismatched.append(f"{place} (sha256 {digest[:12]}...)")
        if found is None:
            detail = (f"found only files with other contents: {', '.join(mismatched)}" if mismatched
                      else f"looked in {', '.join(map(str, places))}")
            raise ReproduceError(
                f"LoRA #{n + 1} {rec['file']} (sha256 {str(rec.get('sha256'))[:12]}...) is not available: {detail}"
            )
        specs.append(LoraSpec(path=found, scale=float(rec["scale"]), bundle_file=rec.get("bundle_file")))
    return specs


def recorded_reference_image(manifest: Manifest, folder: Path) -> Path | None:
    """The coherence reference image the story was conditioned on: the bundle's copy first, else the
    recorded path; its sha256 must equal the recorded one (another image cannot reproduce the story)."""
    rec = ((manifest.get("coherence") or {}).get("reference") or {}).get("image")
    if not rec:
        return None
    places = [folder / rec["bundle_file"]] if rec.get("bundle_file") else []
    places += [Path(rec["image"]), folder / rec["name"]]
    for place in places:
        if place.is_file() and file_sha256(place) == rec["sha256"]:
            return place
    seen = [f"{p} (sha256 {file_sha256(p)[:12]}...)" for p in places if p.is_file()]
    raise ReproduceError(f"the coherence reference image {rec['name']} (sha256 {rec['sha256'][:12]}...) is not available: "
                         + (f"found only other images: {', '.join(seen)}" if seen
                            else f"looked in {', '.join(map(str, places))}"))


def compare_images(recorded: str | Path, regenerated: str | Path) -> dict:
    """Pixel comparison: identical, or how far apart (max/mean abs difference, share of pixels)."""
    recorded, regenerated = Path(recorded), Path(regenerated)
    if not recorded.is_file():
        return {"status": "missing", "detail": f"{recorded} does not exist"}
    try:
        with Image.open(recorded) as a_img:
            a = np.asarray(a_img.convert("RGB"), dtype=np.int16)
    except OSError as err:
        return {"status": "differs", "detail": f"{recorded} is not a readable image ({err})"}
    with Image.open(regenerated) as b_img:
        b = np.asarray(b_img.convert("RGB"), dtype=np.int16)
    if a.shape != b.shape:
        return {"status": "differs", "detail": f"size {a.shape[1]}x{a.shape[0]} vs {b.shape[1]}x{b.shape[0]}"}
    diff = np.abs(a - b)
    changed = float((diff.max(axis=-1) > 0).mean())
    return {
        "status": "identical" if not diff.any() else "differs",
        "max_abs_diff": int(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "pixels_differing": changed,
        "bytes_identical": recorded.read_bytes() == regenerated.read_bytes(),
    }


def _location_overrides(overrides: list[str]) -> list[str]:
    bad = [o for o in overrides if not is_location_key(override_key(o)) and override_key(o) != "reproduce"]
    if bad:
        raise SettingsError(
            f"reproduce= regenerates with the recorded settings; only {', '.join(LOCATION_KEYS)} may be changed "
            f"(got {', '.join(bad)}). To render with other settings run generate.py without reproduce="
        )
    return [o for o in overrides if override_key(o) not in ("reproduce", "output_dir")]


def recorded_job(manifest: Manifest, locations: dict | None = None) -> GenerateConfig:
    """The generate settings a manifest recorded, with only ``locations`` changed; it renders the
    recorded LoRA files (not ``lora_path``/``run``) and writes no bundle."""
    config = OmegaConf.create(manifest["config"])
    with open_dict(config):
        for key, value in (locations or {}).items():
            if not is_location_key(key):
                raise SettingsError(f"reproduce cannot change {key}; only {', '.join(LOCATION_KEYS)}")
            OmegaConf.update(config, key, value, force_add=True)
    job = typed(config, GenerateConfig, lenient=True)  # manifests of older versions carry retired keys
    job.run, job.reproduce, job.score, job.lora_path, job.loras = None, None, False, None, []
    job.submit.team = None
    return job


def manifest_problems(manifest: Manifest, folder: Path, job: GenerateConfig) -> list[str]:
    """Where the manifest disagrees with itself or with the files beside it: each scene record
    against what its own config implies (prompt, negative, seeds), each recorded sha256 against
    the image table and the file on disk. An edited manifest cannot claim a reproduction."""
    problems = []
    expected = story_scenes(job.story, job.sampler)
    scenes = manifest.get("scenes") or []
    if len(scenes) != len(expected):
        problems.append(f"scenes: {len(scenes)} recorded, the recorded config gives {len(expected)}")
    stride = job.sampler.best_of.seed_stride
    for n, (rec, want) in enumerate(zip(scenes, expected)):
        chosen = int(rec.get("chosen_candidate", 0) or 0)
        implied = {"index": want.index, "prompt": want.prompt, "negative": want.negative,
                   "description": want.description, "scene_seed": want.seed, "seed": want.seed + chosen * stride,
                   "image": f"{want.index}.png"}
        problems += [f"scenes[{n}].{key}: recorded {rec.get(key)!r}, the recorded config gives {value!r}"
                     for key, value in implied.items() if rec.get(key) != value]
        table = (manifest.get("images") or {}).get(rec.get("image"))
        if rec.get("sha256") != table:
            problems.append(f"scenes[{n}].sha256 {str(rec.get('sha256'))[:12]}... differs from images[{rec.get('image')!r}] "
                            f"{str(table)[:12]}...")
        on_disk = folder / str(rec.get("image"))
        if on_disk.is_file() and file_sha256(on_disk) != rec.get("sha256"):
            problems.append(f"scenes[{n}].sha256: {on_disk.name} on disk does not match the recorded sha256 "
                            "(the image was edited after generation)")
    return problems


def adapter_problems(recorded: Manifest, now: Manifest) -> list[str]:
    """The IP-Adapter weights used now must be the recorded ones (by sha256)."""
    def sha(m: Manifest):
        return (((m.get("coherence") or {}).get("reference") or {}).get("adapter") or {}).get("weight_sha256")

    if sha(recorded) is not None and sha(recorded) != sha(now):
        return [f"coherence.reference adapter weights: sha256 {str(sha(now))[:12]}... now, "
                f"{str(sha(recorded))[:12]}... recorded (other IP-Adapter weights)"]
    return []


def reproduce(source: str | Path, out_dir: str | Path, locations: dict | None = None, progress: bool = True) -> dict:
    """Regenerate the story recorded at ``source`` into ``out_dir`` and compare image by image.

    ``locations`` maps allowed keys (``model.path`` ...) to new values. Writes and returns the
    report (``reproduce.json``): per image identical/differs, counts, ``all_identical``.
    """
    manifest, folder = load_manifest(source)
    job = recorded_job(manifest, locations)
    loras = recorded_loras(manifest, folder)
    reference_image = recorded_reference_image(manifest, folder)
    if reference_image is not None:
        job.coherence.reference.image = str(reference_image)
    choices = [int(s["chosen_candidate"]) for s in manifest["scenes"]] if manifest.get("best_of") else None
    out_dir = Path(out_dir)
    # On a CPU the thread count changes the order of float reductions (last-bit differences):
    # regenerate with the thread count the images were made with.
    threads = (manifest.get("versions") or {}).get("torch_threads")
    previous_threads = torch.get_num_threads()
    if threads and str(job.model.device).startswith("cpu"):
        torch.set_num_threads(int(threads))
    try:
        result = generate(job, out_dir=out_dir, loras=loras, choices=choices, progress=progress,
                          source={"reproduce": str(Path(str(source)).resolve())},
                          overrides=[f"{k}={v}" for k, v in (locations or {}).items()])
    finally:
        torch.set_num_threads(previous_threads)

    rows = []
    for scene, new_path in zip(manifest["scenes"], result.images):
        recorded = folder / scene["image"]
        row = {"image": scene["image"], **compare_images(recorded, new_path)}
        if recorded.is_file():
            row["recorded_matches_manifest"] = file_sha256(recorded) == scene.get("sha256")
        rows.append(row)
    identical = sum(r["status"] == "identical" for r in rows)
    problems = manifest_problems(manifest, folder, job) + adapter_problems(manifest, result.manifest)
    report = {
        "source": str(Path(str(source)).resolve()),
        "out_dir": str(out_dir),
        "model_hash_recorded": manifest["model"]["hash"],
        "model_hash_now": result.manifest["model"]["hash"],
        "tiny_model": result.manifest["tiny_model"],
        "images": rows,
        "identical": identical,
        "total": len(rows),
        "manifest_problems": problems,
        "all_identical": identical == len(rows) and len(rows) == len(manifest["scenes"]) and not problems,
    }
    atomic_write_json(out_dir / "reproduce.json", report)
    return report


def format_report(report: dict) -> str:
    lines = [f"Reproducing {report['source']}"]
    if report["model_hash_recorded"] != report["model_hash_now"]:
        lines.append(f"WARNING: model hash {report['model_hash_now']} differs from the recorded "
                     f"{report['model_hash_recorded']} (other weights: images are expected to differ)")
    for row in report["images"]:
        if row["status"] == "identical":
            text = "identical"
        elif "max_abs_diff" in row:
            text = (f"DIFFERS  max |diff| {row['max_abs_diff']}, mean {row['mean_abs_diff']:.3f}, "
                    f"{100 * row['pixels_differing']:.1f}% of pixels")
        else:
            text = f"{row['status'].upper()}  {row.get('detail', '')}"
        if row.get("recorded_matches_manifest") is False:
            text += "  (recorded file does not match its manifest sha256: edited after generation)"
        lines.append(f"  {row['image']:>6}  {text}")
    for problem in report.get("manifest_problems", []):
        lines.append(f"  MANIFEST  {problem}")
    lines.append(f"{report['identical']}/{report['total']} identical -> "
                 + ("REPRODUCED" if report["all_identical"] else "NOT reproduced")
                 + f"  (regenerated images in {report['out_dir']})")
    return "\n".join(lines)


def reproduce_from_config(cfg) -> dict:
    """`python generate.py reproduce=<...> [model.path=<moved weights>]` (the composed config:
    only its location keys are used)."""
    overrides = _location_overrides(task_overrides(cfg))
    locations = {override_key(o): OmegaConf.select(cfg, override_key(o)) for o in overrides}
    report = reproduce(cfg.reproduce, cfg.output_dir, locations=locations)
    print(format_report(report))
    return report
