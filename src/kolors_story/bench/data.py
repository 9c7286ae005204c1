"""Section ``data``: data stage throughput (preflight, in one process and in ``dataset.workers=2``
processes, the data-juicer recipe, cache build, cache reuse)."""

from __future__ import annotations

import time

from kolors_story.bench.timing import BenchContext, compose_settings
from kolors_story.bench.train import bench_model


def _preflight_rows(ctx: BenchContext, candidates: list) -> dict:
    """Preflight in one process, then in ``dataset.workers=2`` spawned processes (start-up included) on
    the demo set repeated to a size where it matters (quick: the 24 images once)."""
    from kolors_story.data.preflight import preflight

    n = len(candidates)
    ctx.log(f"data: preflight of {n} images ...")
    t0 = time.perf_counter()
    pre = preflight(candidates, ctx.workdir / "preflight-bench", progress=False)
    dt = time.perf_counter() - t0
    out = {"preflight": {"images": n, "kept": len(pre.kept), "seconds": dt, "images_per_s": n / dt}}
    workers, many = 2, candidates * (1 if ctx.quick else 10)
    timings = {}
    for w in (1, workers):
        t0 = time.perf_counter()
        result = preflight(many, ctx.workdir / f"preflight-bench-{w}", progress=False, workers=w)
        timings[w] = (time.perf_counter() - t0, [s.staged.read_bytes() for s in result.kept])
    out["preflight_parallel"] = {"workers": workers, "images": len(many), "images_per_s": len(many) / timings[workers][0],
                                 "serial_images_per_s": len(many) / timings[1][0],
                                 "speedup": timings[1][0] / timings[workers][0],
                                 "same_result": timings[1][1] == timings[workers][1]}
    return out


def _timed(fn) -> tuple[object, float]:
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


def _cache_rows(ctx: BenchContext, model, prepared, data_dir) -> dict:
    """The cache build, its reuse, and (full bench) the build in ``cache.devices=2`` processes."""
    from kolors_story.data.cache import build_cache

    ctx.log("data: cache build (VAE latents + ChatGLM embeddings) and reuse ...")
    m = len(prepared.items)
    _, dt = _timed(lambda: build_cache(model, prepared, data_dir=data_dir, resolution=ctx.resolution))
    out = {"cache_build": {"images": m, "seconds": dt, "images_per_s": m / dt}}
    again, dt = _timed(lambda: build_cache(model, prepared, data_dir=data_dir, resolution=ctx.resolution))
    out["cache_reuse"] = {"images": m, "seconds": dt, "images_per_s": m / dt,
                          "files_reused": again.stats.get("files_reused") if hasattr(again, "stats") else None}
    if not ctx.quick:  # cache.devices=2: spawned processes (start-up included), same bytes as one
        ctx.log("data: cache build in 2 processes ...")
        sharded = ctx.workdir / "data-sharded"
        _, dt = _timed(lambda: build_cache(model, prepared, data_dir=sharded, resolution=ctx.resolution, devices=2))
        one, two = (sorted((p.name, p.read_bytes()) for p in (d / "cache" / "items").iterdir())
                    for d in (data_dir, sharded))
        out["cache_build_sharded"] = {"processes": 2, "images": m, "images_per_s": m / dt,
                                      "speedup": out["cache_build"]["seconds"] / dt, "same_files": one == two}
    return out


def section_data(ctx: BenchContext) -> dict:
    from kolors_story.data import prepare_dataset
    from kolors_story.data.sources import list_source

    data_dir = ctx.workdir / "data-demo"
    filter_name = "none" if ctx.quick else "default"
    job = compose_settings("train", ["dataset=demo", f"filter={filter_name}", f"data_dir={data_dir}",
                                     f"dataset.resolution={ctx.resolution}"])
    model = bench_model(ctx)
    out: dict = {"model": ctx.model_name, "filter": filter_name}
    listing, out["source_seconds"] = _timed(lambda: list_source(job.dataset))  # draws the demo images the first time
    n = len(listing.candidates)
    out.update(_preflight_rows(ctx, listing.candidates))
    ctx.log(f"data: prepare_dataset (preflight + filter={filter_name} + train/ folder) ...")
    prepared, dt = _timed(lambda: prepare_dataset(job.dataset, job.filter, data_dir, progress=False))
    filter_seconds = (prepared.report.get("filter") or {}).get("seconds")
    out["prepare"] = {"images": n, "kept": len(prepared.items), "seconds": dt, "images_per_s": n / dt,
                      "filter_seconds": filter_seconds}
    if filter_seconds:
        out["prepare"]["filter_images_per_s"] = n / filter_seconds
    out.update(_cache_rows(ctx, model, prepared, data_dir))
    return out
