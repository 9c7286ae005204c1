"""The bench's table (what the README shows): one row per measure, A, B and B/A."""

from __future__ import annotations


def _fmt_s(x: float) -> str:
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"


def _flops_rows(table, f: dict) -> None:
    tf, scale = f["tflop"], f"{f['resolution']}²"
    table.add_row("flops", f"UNet fwd / fwd+bwd, LoRA r{f['lora_rank']} ({scale})",
                  f"{tf['unet_forward']:.2f} TFLOP", f"{tf['unet_forward_backward']:.2f} TFLOP",
                  f"{f['step_ratio']['forward_backward_over_forward']:.2f}x")
    table.add_row("flops", "UNet fwd+bwd: no ckpt / grad checkpointing", f"{tf['unet_forward_backward']:.2f} TFLOP",
                  f"{tf['unet_forward_backward_checkpointed']:.2f} TFLOP",
                  f"{tf['unet_forward_backward_checkpointed'] / tf['unet_forward_backward']:.2f}x")
    table.add_row("flops", f"ChatGLM encode ({f['tokens']} tok) / VAE encode ({scale})",
                  f"{tf['text_encoder_256_tokens']:.2f} TFLOP", f"{tf['vae_encode']:.2f} TFLOP", "")
    cs = f["cache_saving"]
    table.add_row("flops", "cache saves per step (FLOPs, no ckpt / ckpt)", f"{cs['flops_pct_no_checkpointing']:.1f} %",
                  f"{cs['flops_pct_checkpointing']:.1f} %", "")
    r = f["resident_gb"]
    table.add_row("flops", "resident fp16 params: cached / encode every step", f"{r['cached']:.2f} GB",
                  f"{r['encode_every_step']:.2f} GB", f"{r['encode_every_step'] / r['cached']:.2f}x")
    a = f["activation_gb"]
    table.add_row("flops", f"UNet step activations: no ckpt / ckpt ({f['activation_dtype']})",
                  f"{a['no_checkpointing']:.2f} GB", f"{a['checkpointing']:.2f} GB",
                  f"{a['checkpointing'] / a['no_checkpointing']:.2f}x")


def _train_rows(table, sec: dict) -> None:
    table.add_row("train", "cache read + collate per step (share of a cached step)",
                  f"{sec['cache_read_ms_per_step']:.1f} ms", f"{100 * sec['cache_read_share_of_step']:.1f} %", "")
    p = sec["peak_step_mb"]
    table.add_row("train", "peak step memory: no ckpt / grad checkpointing", f"{p['cached']:.0f} MB",
                  f"{p['cached_checkpointing']:.0f} MB", f"{p['cached_checkpointing'] / p['cached']:.2f}x")
    r = sec["resident_mb"]
    table.add_row("train", "resident params: cached / encode every step", f"{r['cached']:.0f} MB",
                  f"{r['encode_every_step']:.0f} MB", f"{r['encode_every_step'] / r['cached']:.2f}x")


def _data_rows(table, d: dict) -> None:
    table.add_row("data", f"preflight / prepare_dataset (preflight + filter={d['filter']})",
                  f"{d['preflight']['images_per_s']:.1f} img/s", f"{d['prepare']['images_per_s']:.1f} img/s", "")
    par = d.get("preflight_parallel")
    if par:
        table.add_row("data", f"preflight of {par['images']} images in 1 / {par['workers']} processes "
                      f"(dataset.workers; same result: {par['same_result']})", f"{par['serial_images_per_s']:.1f} img/s",
                      f"{par['images_per_s']:.1f} img/s", f"{par['speedup']:.2f}x")
    if d["prepare"].get("filter_images_per_s"):
        table.add_row("data", "data-juicer recipe alone (dj-process subprocess)", "",
                      f"{d['prepare']['filter_images_per_s']:.1f} img/s", "")
    table.add_row("data", "cache build / cache reuse", f"{d['cache_build']['images_per_s']:.1f} img/s",
                  f"{d['cache_reuse']['images_per_s']:.1f} img/s", "")
    shard = d.get("cache_build_sharded")
    if shard:
        table.add_row("data", f"cache build in 1 / {shard['processes']} processes (cache.devices; same files: "
                      f"{shard['same_files']})", f"{d['cache_build']['images_per_s']:.1f} img/s",
                      f"{shard['images_per_s']:.1f} img/s", f"{shard['speedup']:.2f}x")


def _describe(pick: dict) -> str:
    if not pick["fits"]:
        return f"does not fit ({pick['worst_stage']} {pick['peak_gb']:.1f} GB)"
    chosen = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in pick["chosen"].items()) or "defaults"
    return f"{pick['peak_gb']:.1f} GB: {chosen}"


def _plan_rows(table, plan: dict) -> None:
    for run, per_gpu in plan["runs"].items():
        for gpu, pick in per_gpu.items():
            table.add_row("plan", f"{run} on {gpu} (memory=auto)", _describe(pick), "", "")
    for name, cost in (plan.get("adapters") or {}).items():
        table.add_row("plan", f"train lora.type={name} on 24 GB: trainable params / train-step peak",
                      f"{cost['params'] / 1e6:.1f} M ({cost['fp32_mb']:.0f} MB fp32)",
                      f"{cost['train_step_gb']:.2f} GB", f"whole run {cost['peak_gb']:.1f} GB")
    for name, cost in (plan.get("rewards") or {}).items():
        flops = (f"{cost['reward_tflop']:.1f} / {cost['plain_tflop']:.1f} TFLOP", f"{cost['ratio']:.1f}x the FLOPs") \
            if "ratio" in cost else ("", "(FLOPs: full bench)")
        table.add_row("plan", f"reward={name} on 24 GB: step peak / FLOPs vs a plain 1024² LoRA step",
                      f"{cost['reward_step_gb']:.2f} GB", *flops)
    char = plan.get("character")
    if char:
        worst = max(char["stages_gb"].values(), default=0.0)
        minutes = " / ".join(f"{m:.1f}" for m in (char.get("minutes_per_round") or {}).values())
        table.add_row("plan", f"character=auto on 24 GB: loop peak / one round ({char['candidates']} renders + "
                      f"{char['steps']} LoRA steps)", f"{worst:.2f} GB",
                      f"{char['round_tflop']:.0f} TFLOP" if "round_tflop" in char else "(FLOPs: full bench)",
                      f"{minutes} min (A10 / 4090)" if minutes else "")


def _select_rows(table, sec: dict) -> None:
    search = sec["search"]
    found = " / ".join(f"{100 * search[f'n{n}']['heuristic_finds_brute_force']:.0f} %" for n in (2, 3, 4))
    gain = " / ".join(f"{search[f'n{n}']['objective_gain_over_per_scene']:+.2f}" for n in (2, 3, 4))
    table.add_row("select", "coordinate ascent finds the brute-force story (N=2/3/4)", found, "", "")
    table.add_row("select", "objective gain over per-scene choice (N=2/3/4)", gain, "", "")
    table.add_row("select", "coordinate ascent at N=8 (8^8 stories), gain", _fmt_s(search["n8"]["seconds"]),
                  f"{search['n8']['objective_gain_over_per_scene']:+.2f}", "")


def _coherence_rows(table, c: dict) -> None:
    res = f"{c['resolution']}²"
    table.add_row("coherence", f"UNet call with CFG ({res}): plain / reading 1 reference's shared tokens",
                  f"{c['unet_call_tflop']['plain']:.2f} TFLOP", f"{c['unet_call_tflop']['reading']:.2f} TFLOP",
                  f"{c['reading_over_plain']:.2f}x")
    table.add_row("coherence", f"IP-Adapter on the device / shared tokens per reference ({c['steps']} steps)",
                  f"{c['ip_adapter_gb']:.2f} GB", f"{c['shared_tokens_gb_per_reference']:.2f} GB", "")


def _gb_pair(none: dict, other: dict, key: str) -> tuple[str, str, str]:
    a, b = none.get(key), other.get(key)
    if a is None or b is None:
        return "-", "-", ""
    return f"{a:.2f} GB", f"{b:.2f} GB", f"{b / a:.2f}x"


def _text_encoder_rows(table, sec: dict) -> None:
    for model in sec["models"]:
        name, schemes = model["name"], model["schemes"]
        none = schemes["none"]
        for scheme, r in schemes.items():
            if scheme == "none":
                continue
            table.add_row("text_encoder", f"{name}: weights as the plan counts them, none / {scheme}",
                          *_gb_pair(none, r, "weights_gb"))
            table.add_row("text_encoder", f"{name}: peak RSS encoding, none / {scheme}",
                          *_gb_pair(none, r, "peak_rss_encode_gb"))
            table.add_row("text_encoder", f"{name}: peak RSS loading, none / {scheme}",
                          *_gb_pair(none, r, "peak_rss_load_gb"))
            table.add_row("text_encoder", f"{name}: load, none / {scheme}", _fmt_s(none["load_s"]),
                          _fmt_s(r["load_s"]), f"{r['load_s'] / none['load_s']:.2f}x")
            table.add_row("text_encoder", f"{name}: encode per prompt, none / {scheme}",
                          _fmt_s(none["encode_s_per_prompt"]), _fmt_s(r["encode_s_per_prompt"]),
                          f"{r['encode_s_per_prompt'] / none['encode_s_per_prompt']:.2f}x")
            for story, q in r["stories"].items():
                table.add_row("text_encoder", f"{name}: {scheme} vs none, {story}: cosine mean / worst prompt, "
                              "rel. error", f"{q['cosine_mean']:.5f} / {q['cosine_min']:.5f}",
                              f"{q['relative_error']:.4f}", "")
        for scheme, why in model["skipped"].items():
            table.add_row("text_encoder", f"{name}: {scheme} not run here", why.split(": use")[0][:90], "", "")


def _peers_rows(table, sec: dict) -> None:
    for r in sec["rows"]:
        per = "median step" if r["name"] == "training step" else "whole process"
        mark = {k: "" if r["met"][k] else " MISSED" for k in ("time", "memory")}
        table.add_row("peers", f"{r['name']} ({per}): {r['peer']} / this project", _fmt_s(r["peer_seconds"]),
                      _fmt_s(r["seconds"]), f"{r['ratios']['time']:.2f}x (goal {r['goals']['time']:.2f}x){mark['time']}")
        table.add_row("peers", f"{r['name']}: peak anonymous memory", f"{r['peer_peak_anon_gib']:.1f} GiB",
                      f"{r['peak_anon_gib']:.1f} GiB",
                      f"{r['ratios']['memory']:.2f}x (goal {r['goals']['memory']:.2f}x){mark['memory']}")
    per_scene = sec.get("scene_batch_seconds_per_scene")
    if per_scene:
        table.add_row("peers", f"UNet call with CFG per scene, scene batch {' / '.join(per_scene)}",
                      " / ".join(f"{v:.2f}" for v in per_scene.values()) + " s", "", "")


def render_table(result: dict):
    """The rich table of a bench result."""
    from rich.table import Table

    table = Table(title=f"kolors-story bench ({'quick' if result.get('quick') else 'full'})", show_lines=False)
    for col, justify in (("section", "left"), ("measure", "left"), ("A", "right"), ("B", "right"), ("B / A", "right")):
        table.add_column(col, justify=justify)
    s = result.get("sections", {})
    ok = {name: sec for name, sec in s.items() if isinstance(sec, dict) and "error" not in sec}
    if "flops" in ok:
        _flops_rows(table, ok["flops"])
    for name in ("train", "generate", "score", "select"):
        if name not in ok:
            continue
        for c in ok[name]["comparisons"]:
            table.add_row(name, f"{c['name']} (per {c['per']})", _fmt_s(c["a_median"]),
                          _fmt_s(c["b_median"]), f"{c['ratio_b_over_a']:.2f}x")
        if name == "train":
            _train_rows(table, ok[name])
        if name == "select":
            _select_rows(table, ok[name])
    if "coherence" in ok:
        _coherence_rows(table, ok["coherence"])
    if "data" in ok:
        _data_rows(table, ok["data"])
    if "plan" in ok:
        _plan_rows(table, ok["plan"])
    if "text_encoder" in ok:
        _text_encoder_rows(table, ok["text_encoder"])
    if "peers" in ok:
        _peers_rows(table, ok["peers"])
    for name, sec in s.items():
        if isinstance(sec, dict) and "error" in sec:
            table.add_row(name, "FAILED", sec["error"][:80], "", "")
    return table
