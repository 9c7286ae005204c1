"""Consistent self-attention across a story's scenes (``coherence.sharing``), in two passes.

Pass 1 renders the reference scenes one at a time, in scene order, and records, in the chosen
UNet self-attention layers, the tokens each layer attends over (a fixed random subset of them,
``token_ratio``), per UNet call and per CFG half. The first reference renders as it would alone;
each further one also attends to the tokens of the references before it, so the references agree
with each other too. Pass 2 renders every other scene; in those same layers its queries attend to
its own tokens *and* all the recorded reference tokens of the same call, so the character's
features flow from the references into every panel. Each scene reads the same recorded tokens
whatever batch it is rendered in: the result does not depend on batching.

The idea is StoryDiffusion's consistent self-attention (scenes attend to each other's tokens in
the up-block self-attention, its reference images to each other's); here the references are
recorded once instead of being rendered together with every batch, which is what makes it
batch-independent and lets best-of, hires and reproduction see the same references.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kolors_story.config import SharingSettings
from kolors_story.errors import SettingsError


def check_sharing(s: SharingSettings, scene_count: int) -> None:
    if not 0.0 <= float(s.strength) <= 1.0:
        raise SettingsError(f"coherence.sharing.strength={s.strength}: use a number in [0, 1] (0 = off)")
    if not 0.0 <= float(s.start) < float(s.end) <= 1.0:
        raise SettingsError(f"coherence.sharing.start={s.start}, end={s.end}: need 0 <= start < end <= 1 "
                            "(fractions of the denoising, 0 = pure noise)")
    if not 0.0 < float(s.token_ratio) <= 1.0:
        raise SettingsError(f"coherence.sharing.token_ratio={s.token_ratio}: use a share in (0, 1]")
    if s.record_device not in ("cpu", "device"):
        raise SettingsError(f"coherence.sharing.record_device={s.record_device!r}: use cpu or device")
    bad = [n for n in (s.reference_scenes or []) if not 1 <= int(n) <= scene_count]
    if bad:
        raise SettingsError(f"coherence.sharing.reference_scenes={list(s.reference_scenes)}: scenes are 1..{scene_count}")
    if not list(s.blocks):
        raise SettingsError("coherence.sharing.blocks is empty: name UNet blocks, e.g. [up_blocks]")


@dataclass
class TokenBank:
    """Reference tokens by (UNet call, layer, CFG half), then by scene position."""

    device: torch.device | None  # None: keep them where they were computed
    parts: dict = field(default_factory=dict)
    _joined: dict = field(default_factory=dict)

    def put(self, key: tuple, scene: int, tokens: torch.Tensor) -> None:
        # ``tokens`` is already a copy (an indexed subset): only the device may change
        self.parts.setdefault(key, {})[scene] = tokens.detach() if self.device is None else tokens.detach().to(self.device)
        self._joined.pop(key, None)

    def get(self, key: tuple, device, dtype) -> torch.Tensor:
        """All references' tokens of ``key``, in scene order, as ``[tokens, channels]``."""
        if key not in self._joined:
            if key not in self.parts:
                raise RuntimeError(f"consistent self-attention: nothing recorded for UNet call {key[0]} in {key[1]} "
                                   "(the reference pass ran a different schedule)")
            self._joined[key] = torch.cat([self.parts[key][s] for s in sorted(self.parts[key])])
        return self._joined[key].to(device=device, dtype=dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for by_scene in self.parts.values() for t in by_scene.values())


class SharingState:
    """What the shared-attention processors of one pipeline need to know about the current batch."""

    def __init__(self, settings: SharingSettings, num_train_timesteps: int, record_device: torch.device | None):
        self.settings = settings
        self.bank = TokenBank(record_device)
        self.num_train_timesteps = int(num_train_timesteps)
        self.mode = "idle"  # idle | record | read
        self.scenes: list[int] = []  # scene position of each image of the batch
        self.readers: list[bool] = []  # which images of the batch read the references
        self.call = -1  # UNet calls since the batch began (its stage 1, then its refine)
        self.active = False
        self._indices: dict[tuple[int, int], torch.Tensor] = {}

    def begin_batch(self, mode: str, scenes: list[int], readers: list[bool] | None = None) -> None:
        self.mode, self.scenes, self.call = mode, list(scenes), -1
        self.readers = list(readers) if readers is not None else [False] * len(scenes)

    def on_unet_call(self, _module, args, kwargs) -> None:
        """Forward pre-hook on the UNet: count the call, and share only inside the [start, end] window."""
        self.call += 1
        t = torch.as_tensor(args[1] if len(args) > 1 else kwargs["timestep"])
        # the meta device (memory/FLOP counting) has shapes but no values: counted as the first step
        progress = 0.0 if t.device.type == "meta" else 1.0 - float(t.flatten()[0]) / self.num_train_timesteps
        self.active = self.mode != "idle" and self.settings.start <= progress <= self.settings.end

    def token_indices(self, scene: int, n_tokens: int) -> torch.Tensor:
        """The fixed subset of a reference's tokens shared at this resolution (seeded, sorted)."""
        key = (scene, n_tokens)
        if key not in self._indices:
            g = torch.Generator().manual_seed(int(self.settings.seed) * 1_000_003 + scene * 1009 + n_tokens)
            keep = max(1, round(n_tokens * float(self.settings.token_ratio)))
            self._indices[key] = torch.randperm(n_tokens, generator=g)[:keep].sort().values
        return self._indices[key]


class SharedSelfAttention:
    """Wraps a self-attention layer's processor: records reference tokens (pass 1) or lets the
    reading scenes attend to them as well as to their own (pass 2); otherwise it is the inner
    processor unchanged."""

    def __init__(self, name: str, inner, state: SharingState):
        self.name, self.inner, self.state = name, inner, state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        st = self.state
        if not st.active or encoder_hidden_states is not None or hidden_states.ndim != 3:
            return out
        batch = len(st.scenes)
        halves = hidden_states.shape[0] // batch
        if halves * batch != hidden_states.shape[0]:
            raise RuntimeError(f"{self.name}: {hidden_states.shape[0]} rows for {batch} images")
        for half in range(halves):
            for j, scene in enumerate(st.scenes):
                row = half * batch + j
                key = (st.call, self.name, half)
                if st.readers[j]:  # read before recording: a reference reads only the ones before it
                    own = hidden_states[row : row + 1]
                    refs = st.bank.get(key, own.device, own.dtype)[None]
                    shared = self.inner(attn, own, torch.cat([refs, own], dim=1), None, temb, **kwargs)
                    out[row : row + 1] = torch.lerp(out[row : row + 1], shared, float(st.settings.strength))
                if st.mode == "record":
                    idx = st.token_indices(scene, hidden_states.shape[1]).to(hidden_states.device)
                    st.bank.put(key, scene, hidden_states[row, idx])
        return out


def install_sharing(unet, settings: SharingSettings, num_train_timesteps: int, device) -> tuple[SharingState, callable]:
    """Wrap the processors of the chosen self-attention layers; returns the state and an undo."""
    record_device = torch.device("cpu") if settings.record_device == "cpu" else None
    state = SharingState(settings, num_train_timesteps, record_device)
    original = unet.attn_processors
    blocks = tuple(str(b) for b in settings.blocks)
    wrapped = {name: (SharedSelfAttention(name, proc, state)
                      if name.endswith("attn1.processor") and name.startswith(blocks) else proc)
               for name, proc in original.items()}
    if not any(isinstance(p, SharedSelfAttention) for p in wrapped.values()):
        raise SettingsError(f"coherence.sharing.blocks={list(blocks)}: no self-attention layer of this UNet starts with "
                            f"these names (e.g. {next(iter(original))})")
    unet.set_attn_processor(wrapped)
    hook = unet.register_forward_pre_hook(state.on_unet_call, with_kwargs=True)

    def undo() -> None:
        hook.remove()
        unet.set_attn_processor(dict(original))

    return state, undo

