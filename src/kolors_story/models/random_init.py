"""Random models of the real classes, from an architecture dict: Kolors' components (ChatGLM3,
UNet, VAE, scheduler, tokenizer), the aesthetic predictor and CLIP. Deterministic for a seed and
independent of each library's own initialisation. The stand-in models (``kolors_story.tiny``) and
the bench are built from these, at any size from tiny to real.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from kolors_story.models.architectures import KOLORS_SCHEDULER_CONFIG, REAL_PREPROCESSOR_SETTINGS


def diffsynth_files(*parts: str, required: str) -> Path:
    """A folder of tokenizer files shipped inside the diffsynth wheel (located, not imported:
    importing diffsynth is slow). It carries the real ChatGLM3 and CLIP ViT-L/14 tokenizers."""
    import importlib.util

    spec = importlib.util.find_spec("diffsynth")
    root = Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else Path("?")
    folder = root.joinpath(*parts)
    if not (folder / required).exists():
        raise FileNotFoundError(f"{required} is not in {folder}; reinstall diffsynth==1.1.9 (pip install -e .)")
    return folder


def chatglm_tokenizer_dir() -> Path:
    """The real ChatGLM3 tokenizer (tokenizer.model) for the random Kolors models."""
    return diffsynth_files("tokenizer_configs", "kolors", "tokenizer", required="tokenizer.model")


def clip_tokenizer_dir() -> Path:
    """openai/clip-vit-large-patch14's vocab.json/merges.txt: ``CLIPProcessor.from_pretrained``
    insists on a tokenizer even though scoring only uses the image half."""
    folder = diffsynth_files("tokenizer_configs", "stable_diffusion", "tokenizer", required="vocab.json")
    if not (folder / "merges.txt").exists():
        raise FileNotFoundError(f"merges.txt is not in {folder}; reinstall diffsynth==1.1.9 (pip install -e .)")
    return folder


def init_parameters(model: torch.nn.Module, generator: torch.Generator, std: float = 0.05,
                    fan_in_scaled: bool = True) -> None:
    """Deterministic initialisation independent of the global RNG and of each library's defaults.

    Norm weights 1, biases 0 (ChatGLM leaves its norm weights uninitialised: NaN images otherwise),
    the rest normal with ``std`` (capped at 1/sqrt(fan_in) when ``fan_in_scaled``).
    """
    for name, p in model.named_parameters():
        with torch.no_grad():
            p.copy_(random_value(name, tuple(p.shape), generator, std, fan_in_scaled))


def random_value(name: str, shape: tuple[int, ...], generator: torch.Generator, std: float = 0.05,
                 fan_in_scaled: bool = True) -> torch.Tensor:
    """The float32 value :func:`init_parameters` gives the parameter ``name`` of ``shape``."""
    if "norm" in name and name.endswith("weight"):
        return torch.ones(shape)
    if name.endswith("bias"):
        return torch.zeros(shape)
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
    scale = min(std, fan_in**-0.5) if fan_in_scaled else std
    return torch.randn(shape, generator=generator) * scale


def build_components(text_encoder_config: dict, unet_config: dict, vae_config: dict, seed: int = 0) -> dict:
    """Random Kolors components of these architectures in memory (fp32, CPU), deterministic for
    ``seed``, with the real scheduler and the real ChatGLM3 tokenizer."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from diffusers.pipelines.kolors import ChatGLMModel, ChatGLMTokenizer
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig

    gen = torch.Generator().manual_seed(seed)
    text_encoder = ChatGLMModel(ChatGLMConfig(**text_encoder_config),
                                empty_init=False)
    init_parameters(text_encoder, gen, std=0.02, fan_in_scaled=False)
    unet = UNet2DConditionModel(**unet_config)
    init_parameters(unet, gen)
    vae = AutoencoderKL(**vae_config)
    init_parameters(vae, gen)
    scheduler = EulerDiscreteScheduler.from_config(
        {k: v for k, v in KOLORS_SCHEDULER_CONFIG.items() if not k.startswith("_")}
    )
    tokenizer = ChatGLMTokenizer.from_pretrained(str(chatglm_tokenizer_dir()))
    return dict(text_encoder=text_encoder, unet=unet, vae=vae, scheduler=scheduler, tokenizer=tokenizer)


def save_random_text_encoder(folder: Path, config: dict, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                             shard_bytes: int = 2 * 10**9) -> Path:
    """A random ChatGLM3 of ``config`` written as the release ships it (``pytorch_model-*.bin`` shards,
    an index, config and tokenizer files) without ever holding the whole model: at real size 12.5 GB
    in bf16 is written on a machine that could not hold it twice. The weights are those of
    :func:`build_components` (same draws, same rule) cast to ``dtype``."""
    import json

    from accelerate import init_empty_weights
    from diffusers.pipelines.kolors import ChatGLMModel, ChatGLMTokenizer
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig

    chatglm_config = ChatGLMConfig(**config, torch_dtype=str(dtype).removeprefix("torch."))
    with init_empty_weights(include_buffers=False):  # parameters on the meta device, buffers real
        shapes = ChatGLMModel(chatglm_config, empty_init=False)
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shards: list[list[str]] = [[]]  # the tensor names of each shard
    pending: dict[str, torch.Tensor] = {}
    for name, p in shapes.named_parameters():
        value = random_value(name, tuple(p.shape), gen, std=0.02, fan_in_scaled=False).to(dtype)
        if pending and sum(t.nbytes for t in pending.values()) + value.nbytes > shard_bytes:
            _write_shard(folder, len(shards), pending)  # full: to disk before the next one grows
            shards.append([])
            pending = {}
        pending[name] = value
        shards[-1].append(name)
    persistent = shapes.state_dict()
    buffers = {name: b for name, b in shapes.named_buffers() if name in persistent}
    pending.update(buffers)
    shards[-1] += list(buffers)
    _write_shard(folder, len(shards), pending)
    names = [f"pytorch_model-{i:05d}-of-{len(shards):05d}.bin" for i in range(1, len(shards) + 1)]
    for i, target in enumerate(names, start=1):
        (folder / f"shard-{i}.bin").rename(folder / target)
    weight_map = {key: names[i] for i, keys in enumerate(shards) for key in keys}
    total = sum(p.numel() for p in shapes.parameters()) * dtype.itemsize
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
    chatglm_config.save_pretrained(folder)
    ChatGLMTokenizer.from_pretrained(str(chatglm_tokenizer_dir())).save_pretrained(folder)
    return folder


def _write_shard(folder: Path, number: int, tensors: dict[str, torch.Tensor]) -> None:
    torch.save(tensors, folder / f"shard-{number}.bin")


def build_clip_processor():
    """A ``CLIPProcessor`` with the real ViT-L/14 preprocessing and the real CLIP tokenizer."""
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizerFast

    image_processor = CLIPImageProcessor(**REAL_PREPROCESSOR_SETTINGS)
    tokenizer = CLIPTokenizerFast.from_pretrained(str(clip_tokenizer_dir()))
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_predictor(config: dict, seed: int = 0):
    """A randomly initialised ``AestheticsPredictorV2Linear`` of ``config``, deterministic for ``seed``."""
    from aesthetics_predictor import AestheticsPredictorV2Linear
    from transformers import CLIPVisionConfig

    # transformers initialises from the global RNG: fork it so the seed fixes the weights without
    # disturbing the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AestheticsPredictorV2Linear(CLIPVisionConfig(**config))
    return model.eval()


def build_clip(config: dict, seed: int = 0):
    """A randomly initialised ``CLIPModel`` (both towers) of ``config``, deterministic for ``seed``."""
    from transformers import CLIPConfig, CLIPModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(**{k: v for k, v in config.items() if k != "architectures"}))
    return model.eval()
