"""``python -m kolors_story.tiny.pretrain_ip``: pre-train the tiny Kolors-IP-Adapter-Plus on
the pre-trained tiny Kolors, so that ``coherence.reference`` visibly carries a reference image's
look into the other panels on ``model=tiny`` (a random adapter only adds noise).

What it does, deterministically for ``--seed`` (same machine, versions and ``--threads``):
1. loads the pre-trained tiny Kolors (``model.tiny.weights=pretrained``) and the tiny random
   IP-Adapter-Plus of seed 0 through the project's own ``load_adapter`` (diffusers'
   ``load_ip_adapter``); the UNet, VAE, text encoder and CLIP image encoder stay frozen;
2. draws captioned base scenes twice each (two drawings of one caption differ in jitter): one
   drawing is the target, the other the reference image, as IP-Adapter's own training pairs an
   image with itself; half the captions are dropped, so the adapter has to carry the content,
   and a tenth of the references are the empty image, so classifier-free guidance works;
3. trains the resampler and every ``to_k_ip`` / ``to_v_ip`` on the project's denoising loss
   (``KolorsLoraModule.compute_loss``, the UNet called as the pipeline calls it);
4. writes ``ip_adapter_plus_general.safetensors`` (fp16, IP-Adapter-Plus' own key names: the
   release file's layout, found by loading a probe file of distinct values through diffusers'
   loader) and ``image_encoder/`` into ``--out`` (default: the copy shipped in the package), with
   ``PRETRAINED_IP.json`` (sha256 of both weight files, the settings, the losses).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from kolors_story.config import OptimSettings, ReferenceSettings
from kolors_story.files import atomic_path, save_safetensors
from kolors_story.models.ip_adapter import ENCODER_FOLDER, WEIGHT_NAME, file_shapes
from kolors_story.models.prompts import MAX_SEQUENCE_LENGTH
from kolors_story.tiny.ip_adapter import TINY_IP_VERSION, ensure_tiny_ip_adapter
from kolors_story.tiny.pretrain import SIZE, TIME_IDS, _fp16, _pixels
from kolors_story.tiny.scenes import draw_scene, random_scene
from kolors_story.tiny.shipped import PRETRAINED_IP_DIR, PRETRAINED_IP_RECORD, pretrained_ip_hashes


def _pretrained_pipe():
    from kolors_story.config.compose import compose_settings
    from kolors_story.models.loading import load_pipeline
    from kolors_story.tiny import provide_model

    model = compose_settings("generate", ["model=tiny", "model.tiny.weights=pretrained", "model.tiny.seed=0"]).model
    return load_pipeline(provide_model(model))


def adapter_parameters(unet) -> dict[str, torch.nn.Parameter]:
    """The loaded adapter's parameters by diffusers name: the resampler and the to_k_ip / to_v_ip."""
    return {n: p for n, p in unet.named_parameters()
            if n.startswith("encoder_hid_proj.image_projection_layers") or "_ip." in n}


def file_key_map(pipe, folder: Path, generator: torch.Generator) -> dict[str, tuple[str, int | None]]:
    """Which file key (and which half of a fused ``to_kv``) each loaded parameter comes from: a
    probe file of distinct random values is loaded through the project's ``load_adapter``
    (diffusers' converter) and every parameter is found in it by value."""
    from kolors_story.generate.reference import load_adapter

    shapes = file_shapes(folder / WEIGHT_NAME)
    probe = {k: torch.randn(s, generator=generator) for k, s in shapes.items()}
    save_safetensors(probe, folder / WEIGHT_NAME)
    load_adapter(pipe, ReferenceSettings(path=str(folder)), torch.float32, "cpu")
    by_value = {}
    for key, value in probe.items():
        parts = value.chunk(2, dim=0) if "to_kv" in key else (value,)
        for half, part in enumerate(parts):
            by_value[tuple(part.flatten()[:4].tolist())] = (key, half if len(parts) == 2 else None, part)
    mapping = {}
    for name, param in adapter_parameters(pipe.unet).items():
        key, half, part = by_value[tuple(param.detach().flatten()[:4].tolist())]
        if not torch.equal(param.detach(), part):
            raise RuntimeError(f"probe mismatch for {name} ({key})")
        mapping[name] = (key, half)
    if sorted({k for k, _ in mapping.values()}) != sorted(shapes):
        raise RuntimeError("the loaded adapter does not cover every key of the file")
    return mapping


def to_file_state(unet, mapping: dict[str, tuple[str, int | None]]) -> dict[str, torch.Tensor]:
    """The trained adapter under the release file's key names (``to_kv`` fused again)."""
    params = adapter_parameters(unet)
    halves: dict[str, dict[int, torch.Tensor]] = {}
    state = {}
    for name, (key, half) in mapping.items():
        if half is None:
            state[key] = params[name].detach().clone()
        else:
            halves.setdefault(key, {})[half] = params[name].detach()
    for key, parts in halves.items():
        state[key] = torch.cat([parts[0], parts[1]], dim=0)
    return state


def load_file_state(unet, mapping: dict[str, tuple[str, int | None]], state: dict[str, torch.Tensor]) -> None:
    params = adapter_parameters(unet)
    with torch.no_grad():
        for name, (key, half) in mapping.items():
            value = state[key] if half is None else state[key].chunk(2, dim=0)[half]
            params[name].copy_(value)


def _training_pairs(pipe, scenes: int, seed: int):
    """Captions, target latents (as the cache stores them) and the reference images' CLIP hidden
    states (what IP-Adapter-Plus reads), for ``scenes`` base scenes drawn twice each."""
    rng = np.random.default_rng([seed, 3])
    base = [random_scene(rng) for _ in range(scenes)]
    targets, references = [], []
    for scene in tqdm(base, desc="pretrain IP: drawing scene pairs", unit="pair"):
        targets.append(draw_scene(scene, rng, SIZE))
        references.append(draw_scene(scene, rng, SIZE))
    vae = pipe.vae
    with torch.no_grad():
        latents = torch.cat([vae.encode(_pixels(targets[i : i + 64])).latent_dist.mean
                             for i in range(0, scenes, 64)]) * float(vae.config.scaling_factor)
        hidden = torch.cat([pipe.encode_image(references[i : i + 64], "cpu", 1, output_hidden_states=True)[0]
                            for i in range(0, scenes, 64)])
        empty = pipe.encode_image(references[:1], "cpu", 1, output_hidden_states=True)[1]  # the zero image
    return base, latents, hidden, empty


def train_adapter(pipe, base, latents, hidden, empty, steps: int, batch: int, seed: int, lr: float,
                  text_dropout: float, image_dropout: float) -> list[float]:
    from kolors_story.models.architectures import KOLORS_SCHEDULER_CONFIG
    from kolors_story.train.module import KolorsLoraModule

    unet = pipe.unet
    unet.requires_grad_(False)
    params = list(adapter_parameters(unet).values())
    for p in params:
        p.requires_grad_(True)
    module = KolorsLoraModule(unet, {k: v for k, v in KOLORS_SCHEDULER_CONFIG.items() if not k.startswith("_")},
                              OptimSettings(lr=lr))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed + 4)
    time_ids = torch.tensor(TIME_IDS, dtype=torch.float32).repeat(batch, 1)
    losses = []
    unet.train()
    for step in tqdm(range(steps), desc="pretrain IP: resampler + to_k_ip/to_v_ip", unit="step", dynamic_ncols=True):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(len(base), (batch,), generator=gen)
        no_text = torch.rand(batch, generator=gen) < text_dropout
        no_image = torch.rand(batch, generator=gen) < image_dropout
        captions = ["" if d else base[i].caption for i, d in zip(idx.tolist(), no_text.tolist())]
        with torch.no_grad():
            embeds, _, pooled, _ = pipe.encode_prompt(prompt=captions, device="cpu", num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False,
                                                      max_sequence_length=MAX_SEQUENCE_LENGTH)
        image = torch.where(no_image[:, None, None], empty.expand(batch, -1, -1), hidden[idx])
        loss = module.compute_loss({"latents": latents[idx], "prompt_embeds": embeds, "pooled_prompt_embeds": pooled,
                                    "add_time_ids": time_ids, "image_embeds": image[:, None]},
                                   torch.randint(2**31 - 1, (batch,), generator=gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
    unet.eval()
    return losses


def pretrain_ip(out: Path, *, scenes: int, steps: int, batch: int, seed: int, threads: int, lr: float = 1e-3,
                text_dropout: float = 0.5, image_dropout: float = 0.1) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    pipe = _pretrained_pipe()
    with tempfile.TemporaryDirectory() as tmp:
        start = ensure_tiny_ip_adapter(Path(tmp) / "start", seed=0, weights="random")
        from safetensors.torch import load_file

        start_state = load_file(str(start / WEIGHT_NAME))
        probe = Path(shutil.copytree(start, Path(tmp) / "probe"))
        mapping = file_key_map(pipe, probe, torch.Generator().manual_seed(seed + 5))
        load_file_state(pipe.unet, mapping, start_state)  # training starts from the random tiny adapter
        base, latents, hidden, empty = _training_pairs(pipe, scenes, seed)
        losses = train_adapter(pipe, base, latents, hidden, empty, steps, batch, seed, lr, text_dropout, image_dropout)
        out.mkdir(parents=True, exist_ok=True)
        if (out / ENCODER_FOLDER).exists():
            shutil.rmtree(out / ENCODER_FOLDER)
        shutil.copytree(start / ENCODER_FOLDER, out / ENCODER_FOLDER)  # the frozen tiny CLIP of seed 0
    with atomic_path(out / WEIGHT_NAME) as tmp_file:
        save_safetensors(_fp16(to_file_state(pipe.unet, mapping)), tmp_file,
                         {"kolors_story": f"pre-trained tiny Kolors-IP-Adapter-Plus v{TINY_IP_VERSION}"})
    record = {
        "version": TINY_IP_VERSION,
        "command": f"python -m kolors_story.tiny.pretrain_ip --scenes {scenes} --steps {steps} --batch {batch} "
                   f"--seed {seed} --threads {threads}",
        "sha256": pretrained_ip_hashes(out),
        "torch": torch.__version__,
        "seconds": round(time.perf_counter() - t0, 1),
        "loss_first100": float(np.mean(losses[:100])) if losses else None,
        "loss_last100": float(np.mean(losses[-100:])) if losses else None,
    }
    with atomic_path(out / PRETRAINED_IP_RECORD) as tmp_file:
        tmp_file.write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kolors_story.tiny.pretrain_ip",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=PRETRAINED_IP_DIR, help="where the adapter goes (default: the shipped copy)")
    parser.add_argument("--scenes", type=int, default=2048, help="scene pairs (target + reference drawing)")
    parser.add_argument("--steps", type=int, default=1500, help="optimizer steps")
    parser.add_argument("--batch", type=int, default=32, help="pairs per step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the bytes depend on it)")
    args = parser.parse_args(argv)
    record = pretrain_ip(args.out, scenes=args.scenes, steps=args.steps, batch=args.batch, seed=args.seed,
                         threads=args.threads)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
