"""An exponential moving average of the LoRA weights (``trainer.ema``), kept by diffusers'
``EMAModel`` next to the weights it follows (fp32, one copy of the adapter: small).

Updated after every ``every``-th optimizer step with diffusers' decay, ``min(decay, (1 + n) /
(10 + n))`` at the n-th update (the first update copies the weights), so early EMA weights are
not stuck at the initialisation. Its state travels in ``trainer_state.ckpt``: a resumed run
continues the same average. Checkpoints export it as ``lora_ema.safetensors``,
``lora_kohya_ema.safetensors`` and ``lora_diffsynth_ema.ckpt`` and, with validation on, render
the story with it into ``<checkpoint>/ema/``.
"""

from __future__ import annotations

from contextlib import contextmanager

import lightning as L

from kolors_story.config import EmaSettings


class EmaCallback(L.Callback):
    def __init__(self, settings: EmaSettings):
        self.settings = settings
        self.ema = None
        self._seen_step = 0
        self._pending: dict | None = None  # a resumed state, applied once the parameters exist

    @property
    def state_key(self) -> str:
        return "kolors_story.ema"

    @staticmethod
    def _params(pl_module):
        return [p for p in pl_module.parameters() if p.requires_grad]

    def on_fit_start(self, trainer, pl_module):
        from diffusers.training_utils import EMAModel

        self.ema = EMAModel(self._params(pl_module), decay=float(self.settings.decay))
        if self._pending is not None:
            self.ema.load_state_dict(self._pending)
            self.ema.to(device=self._params(pl_module)[0].device)
            self._pending = None
        self._seen_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step == self._seen_step:  # still accumulating gradients
            return
        self._seen_step = step
        if step % max(1, int(self.settings.every)) == 0:
            self.ema.step(self._params(pl_module))

    @contextmanager
    def applied(self, pl_module):
        """The EMA weights in the LoRA for the duration (saving, rendering, scoring), then the raw ones back."""
        params = self._params(pl_module)
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)

    def state_dict(self) -> dict:
        return {} if self.ema is None else self.ema.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict:
            return
        if self.ema is None:  # restored before fit starts: applied in on_fit_start
            self._pending = state_dict
        else:
            self.ema.load_state_dict(state_dict)
