"""``python -m kolors_story.tiny.pretrain``: pre-train the tiny Kolors' VAE and UNet on the
drawn base scenes (``data.base_scenes``), so that ``model=tiny`` renders recognisable pictures and
a LoRA's effect can be seen.

What it does, deterministically for ``--seed`` (same machine, same library versions, same
``--threads`` -> the same bytes):
1. builds the random tiny Kolors of seed 0 (its ChatGLM3 stays as it is: frozen, as in Kolors);
2. trains the VAE as an autoencoder (MSE of the posterior mean's decode + a small KL term) on
   drawn scenes, a quarter of them in grey, then sets ``scaling_factor`` to 1 / the std of the
   latents;
3. encodes the captioned base scenes as the cache does (posterior mean x scaling factor, the
   pipeline's own ``encode_prompt`` at 256 tokens) and trains every UNet parameter with the
   project's own denoising loss (``KolorsLoraModule.compute_loss``: Kolors' 1100-step schedule,
   epsilon target, the micro-conditioning the pipeline passes), with 10 % empty captions so that
   classifier-free guidance works, and an EMA of the weights;
4. writes ``unet.safetensors`` and ``vae.safetensors`` (fp16) and ``PRETRAINED.json`` (their
   sha256, the settings, the losses) into ``--out`` (default: the copy shipped in the package,
   which ``model.tiny.weights=pretrained`` loads and verifies), and a grid of base renders.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from kolors_story.config import OptimSettings
from kolors_story.files import atomic_path, file_sha256, save_safetensors
from kolors_story.models.architectures import KOLORS_SCHEDULER_CONFIG
from kolors_story.models.prompts import MAX_SEQUENCE_LENGTH
from kolors_story.tiny.architectures import pretrained_unet_config, pretrained_vae_config
from kolors_story.tiny.kolors import build_tiny_components
from kolors_story.tiny.scenes import draw_scene, random_scene
from kolors_story.tiny.shipped import (
    PRETRAINED_DIR,
    PRETRAINED_RECORD,
    PRETRAINED_VERSION,
)

SIZE = 64  # the tiny model's native resolution (8 x 8 latents)
TIME_IDS = [SIZE, SIZE, 0, 0, SIZE, SIZE]  # original size, crop top-left, target size: what the pipeline passes


def _pixels(images) -> torch.Tensor:
    a = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()


def _vae_image(rng: np.random.Generator):
    """A base scene, in grey one time in four (greys and paper tones must be representable too)."""
    image = draw_scene(random_scene(rng), rng, SIZE)
    return image.convert("L").convert("RGB") if rng.random() < 0.25 else image


def train_vae(vae, steps: int, batch: int, seed: int, lr: float = 3e-3) -> list[float]:
    rng = np.random.default_rng([seed, 1])
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    vae.train()
    for step in tqdm(range(steps), desc="pretrain: VAE", unit="step", dynamic_ncols=True):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        x = _pixels([_vae_image(rng) for _ in range(batch)])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.mean).sample  # the posterior mean is what the cache stores
        loss = torch.nn.functional.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    vae.eval()
    return losses


def text_layers(text_encoder) -> dict[str, torch.nn.Parameter]:
    """The ChatGLM3 transformer layers the pre-training trains (the token embeddings stay the
    random ones of seed 0): a random encoder carries almost no caption information to the last
    token, whose state is Kolors' pooled embedding."""
    return {n: p for n, p in text_encoder.named_parameters() if n.startswith("encoder.")}


def train_unet(unet, pipe, latents, scenes, steps: int, batch: int, seed: int, lr: float = 1e-3,
               caption_dropout: float = 0.1, ema_decay: float = 0.999) -> tuple[dict, dict, list[float]]:
    """The UNet and the text encoder's layers together, on the project's denoising loss; the
    prompt embeddings come from the pipeline's own ``encode_prompt`` at every step (with grad)."""
    from kolors_story.train.module import KolorsLoraModule

    module = KolorsLoraModule(unet, {k: v for k, v in KOLORS_SCHEDULER_CONFIG.items() if not k.startswith("_")},
                              OptimSettings(lr=lr))
    text = text_layers(pipe.text_encoder)
    pipe.text_encoder.requires_grad_(False)
    for param in text.values():
        param.requires_grad_(True)
    unet.train()
    pipe.text_encoder.train()
    params = [*unet.parameters(), *text.values()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    ema_unet = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    ema_text = {k: v.detach().clone() for k, v in text.items()}
    gen = torch.Generator().manual_seed(seed + 2)
    time_ids = torch.tensor(TIME_IDS, dtype=torch.float32).repeat(batch, 1)
    losses = []
    for step in tqdm(range(steps), desc="pretrain: UNet + text layers", unit="step", dynamic_ncols=True):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 200) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        idx = torch.randint(len(scenes), (batch,), generator=gen)
        drop = torch.rand(batch, generator=gen) < caption_dropout
        captions = ["" if d else scenes[i].caption for i, d in zip(idx.tolist(), drop.tolist())]
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=captions, device="cpu", num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False,
                                                  max_sequence_length=MAX_SEQUENCE_LENGTH)
        batch_dict = {"latents": latents[idx], "prompt_embeds": embeds, "pooled_prompt_embeds": pooled,
                      "add_time_ids": time_ids}
        seeds = torch.randint(2**31 - 1, (batch,), generator=gen)
        loss = module.compute_loss(batch_dict, seeds)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in unet.state_dict().items():
                if v.dtype.is_floating_point:
                    ema_unet[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
            for k, v in text.items():
                ema_text[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
        losses.append(float(loss))
    unet.eval()
    pipe.text_encoder.eval()
    return ema_unet, ema_text, losses


def _fp16(state: dict) -> dict:
    return {k: v.detach().to(torch.float16).contiguous() for k, v in state.items()}


def pretrain(out: Path, *, scenes: int, vae_steps: int, unet_steps: int, seed: int, threads: int,
             batch: int = 32) -> dict:
    from diffusers import KolorsPipeline

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    # the text encoder every tiny model of seed 0 has; the UNet and VAE of the pre-trained configs
    parts = build_tiny_components(0, unet_config=pretrained_unet_config(), vae_config=pretrained_vae_config())
    unet, vae = parts["unet"], parts["vae"]
    vae_losses = train_vae(vae, vae_steps, 32, seed)
    rng = np.random.default_rng([seed, 2])
    base = [random_scene(rng) for _ in range(scenes)]
    images = [draw_scene(s, rng, SIZE) for s in tqdm(base, desc="pretrain: drawing scenes", unit="img")]
    with torch.no_grad():  # scale the latents to unit variance, as the real VAEs' scaling_factor does
        mean = torch.cat([vae.encode(_pixels(images[i : i + 64])).latent_dist.mean for i in range(0, len(images), 64)])
        vae.register_to_config(scaling_factor=float(1.0 / mean.std()))
        latents = mean * float(vae.config.scaling_factor)  # posterior mean x scaling factor, as the cache stores them
    pipe = KolorsPipeline(vae=None, text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"], unet=None,
                          scheduler=None, force_zeros_for_empty_prompt=False)
    ema_unet, ema_text, unet_losses = train_unet(unet, pipe, latents, base, unet_steps, batch, seed)
    out.mkdir(parents=True, exist_ok=True)
    files = {name: out / f"{name}.safetensors" for name in ("unet", "vae", "text_encoder")}
    for name, state in (("unet", ema_unet), ("vae", vae.state_dict()), ("text_encoder", ema_text)):
        with atomic_path(files[name]) as tmp:
            save_safetensors(_fp16(state), tmp, {"kolors_story": f"pre-trained tiny Kolors {name} v{PRETRAINED_VERSION}"})
    record = {
        "version": PRETRAINED_VERSION,
        "command": f"python -m kolors_story.tiny.pretrain --scenes {scenes} --vae-steps {vae_steps} "
                   f"--unet-steps {unet_steps} --batch {batch} --seed {seed} --threads {threads}",
        "sha256": {name: file_sha256(path) for name, path in files.items()},
        "vae_scaling_factor": float(vae.config.scaling_factor),
        "max_sequence_length": MAX_SEQUENCE_LENGTH,
        "torch": torch.__version__,
        "seconds": round(time.perf_counter() - t0, 1),
        "vae_loss_last100": float(np.mean(vae_losses[-100:])) if vae_losses else None,
        "unet_loss_last100": float(np.mean(unet_losses[-100:])) if unet_losses else None,
    }
    with atomic_path(out / PRETRAINED_RECORD) as tmp:
        tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return record


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kolors_story.tiny.pretrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=PRETRAINED_DIR, help="where the weights go (default: the shipped copy)")
    parser.add_argument("--scenes", type=int, default=4096, help="captioned base scenes the UNet learns")
    parser.add_argument("--vae-steps", type=int, default=1000, help="VAE optimizer steps (batch 32)")
    parser.add_argument("--unet-steps", type=int, default=3000, help="UNet + text layer optimizer steps")
    parser.add_argument("--batch", type=int, default=32, help="captioned scenes per UNet step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the bytes depend on it)")
    args = parser.parse_args(argv)
    record = pretrain(args.out, scenes=args.scenes, vae_steps=args.vae_steps, unet_steps=args.unet_steps,
                      seed=args.seed, threads=args.threads, batch=args.batch)
    print(json.dumps(record, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
