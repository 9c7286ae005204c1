"""The X/Y grid of a sweep (``evaluate.py sweep=<dir> grid.x=lora.rank grid.y=lora.alpha``): which
swept keys make its axes, and which image of which checkpoint fills each cell."""

# No ``from __future__ import annotations`` here: OmegaConf reads these annotations at runtime.
from dataclasses import dataclass
from typing import Optional


@dataclass
class GridSettings:
    x: Optional[str] = None  # a swept key (as in the runs' .hydra/overrides.yaml, e.g. lora.rank): one column per value -> grid.png; null: no grid
    y: Optional[str] = None  # a second swept key: one row per value; null: a single row
    scene: Optional[int] = None  # 1..8: that scene's image in each cell instead of the whole story panel
    checkpoint: str = "best"  # which checkpoint of each run: best (its best-ranked), last, or step-XXXXXX
