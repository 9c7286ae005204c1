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
from PIL import Image

from kolors_story.config import GenerateSettings
from kolors_story.config.saved import recorded_job
from kolors_story.errors import UserError
from kolors_story.files import atomic_write_json, file_sha256
from kolors_story.generate.job import generate
from kolors_story.generate.loras import LoraSpec
from kolors_story.records import Manifest, load_manifest
from kolors_story.story import story_scenes


class ReproduceError(UserError, RuntimeError):
    """The recorded result cannot be regenerated as recorded (missing or changed inputs)."""


def recorded_loras(manifest: Manifest, folder: Path) -> list[LoraSpec]:
    """The LoRA files the manifest used: the bundle's copy first, else the recorded path; the
    file's sha256 must equal the recorded one (a changed LoRA cannot reproduce the images)."""
    specs = []
    for n, rec in enumerate(manifest.loras):
        places = [folder / rec.bundle_file] if rec.bundle_file else []
        places += [Path(rec.path), folder / rec.file]
        found, mismatched = None, []
        for place in places:
            if place.is_file():
                digest = file_sha256(place)
                if rec.sha256 in (None, digest):
                    found = place
                    break
                mismatched.append(f"{place} (sha256 {digest[:12]}...)")
        if found is None:
            detail = (f"found only files with other contents: {', '.join(mismatched)}" if mismatched
                      else f"looked in {', '.join(map(str, places))}")
            raise ReproduceError(
                f"LoRA #{n + 1} {rec.file} (sha256 {str(rec.sha256)[:12]}...) is not available: {detail}"
            )
        specs.append(LoraSpec(path=found, scale=float(rec.scale), bundle_file=rec.bundle_file))
    return specs


def recorded_reference_image(manifest: Manifest, folder: Path) -> Path | None:
    """The coherence reference image the story was conditioned on: the bundle's copy first, else the
    recorded path; its sha256 must equal the recorded one (another image cannot reproduce the story)."""
    rec = manifest.reference_image
    if rec is None:
        return None
    places = [folder / rec.bundle_file] if rec.bundle_file else []
    places += [Path(rec.image), folder / rec.name]
    for place in places:
        if place.is_file() and file_sha256(place) == rec.sha256:
            return place
    seen = [f"{p} (sha256 {file_sha256(p)[:12]}...)" for p in places if p.is_file()]
    raise ReproduceError(f"the coherence reference image {rec.name} (sha256 {rec.sha256[:12]}...) is not available: "
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


def manifest_problems(manifest: Manifest, folder: Path, job: GenerateSettings) -> list[str]:
    """Where the manifest disagrees with itself or with the files beside it: each scene record
    against what its own config implies (prompt, negative, seeds), each recorded sha256 against
    the image table and the file on disk. An edited manifest cannot claim a reproduction."""
    problems = []
    expected = story_scenes(job.story, job.sampler)
    scenes = manifest.scenes
    if len(scenes) != len(expected):
        problems.append(f"scenes: {len(scenes)} recorded, the recorded config gives {len(expected)}")
    stride = job.sampler.best_of.seed_stride
    for n, (rec, want) in enumerate(zip(scenes, expected)):
        chosen = int(rec.chosen_candidate or 0)
        implied = {"index": want.index, "prompt": want.prompt, "negative": want.negative,
                   "description": want.description, "scene_seed": want.seed, "seed": want.seed + chosen * stride,
                   "image": f"{want.index}.png"}
        problems += [f"scenes[{n}].{key}: recorded {getattr(rec, key)!r}, the recorded config gives {value!r}"
                     for key, value in implied.items() if getattr(rec, key) != value]
        table = manifest.images.get(rec.image)
        if rec.sha256 != table:
            problems.append(f"scenes[{n}].sha256 {str(rec.sha256)[:12]}... differs from images[{rec.image!r}] "
                            f"{str(table)[:12]}...")
        on_disk = folder / rec.image
        if on_disk.is_file() and file_sha256(on_disk) != rec.sha256:
            problems.append(f"scenes[{n}].sha256: {on_disk.name} on disk does not match the recorded sha256 "
                            "(the image was edited after generation)")
    return problems


def adapter_problems(recorded: Manifest, now: Manifest) -> list[str]:
    """The IP-Adapter weights used now must be the recorded ones (by sha256)."""
    if recorded.adapter_sha256 is not None and recorded.adapter_sha256 != now.adapter_sha256:
        return [f"coherence.reference adapter weights: sha256 {str(now.adapter_sha256)[:12]}... now, "
                f"{str(recorded.adapter_sha256)[:12]}... recorded (other IP-Adapter weights)"]
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
    choices = [int(s.chosen_candidate or 0) for s in manifest.scenes] if manifest.best_of else None
    out_dir = Path(out_dir)
    # On a CPU the thread count changes the order of float reductions (last-bit differences):
    # regenerate with the thread count the images were made with.
    threads = manifest.versions.get("torch_threads")  # versions is a free-form table of names
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
    for scene, new_path in zip(manifest.scenes, result.images):
        recorded = folder / scene.image
        row = {"image": scene.image, **compare_images(recorded, new_path)}
        if recorded.is_file():
            row["recorded_matches_manifest"] = file_sha256(recorded) == scene.sha256
        rows.append(row)
    identical = sum(r["status"] == "identical" for r in rows)
    problems = manifest_problems(manifest, folder, job) + adapter_problems(manifest, result.manifest)
    report = {
        "source": str(Path(str(source)).resolve()),
        "out_dir": str(out_dir),
        "model_hash_recorded": manifest.model.hash,
        "model_hash_now": result.manifest.model.hash,
        "tiny_model": result.manifest.tiny_model,
        "images": rows,
        "identical": identical,
        "total": len(rows),
        "manifest_problems": problems,
        "all_identical": identical == len(rows) and len(rows) == len(manifest.scenes) and not problems,
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
