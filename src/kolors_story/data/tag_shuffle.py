"""Caption variants for training: tag shuffling with the first tags kept in place.

A caption is read as comma-separated tags (``,`` or ``，``). The dataset's ``caption_prefix``
(trigger words) and the first ``keep_tokens`` tags after it always stay first; the other tags are
reordered. The cache stores a fixed number of such orders per caption, the caption as written
being the first; the trainer picks one per sample from the sample's own seed (so a resumed run
sees the same captions), or the empty caption with probability ``dataset.caption_dropout``.
"""

from __future__ import annotations

import random
import re

TAG_SPLIT = re.compile(r"\s*[,，]\s*")


def caption_variants(caption: str, *, prefix: str = "", keep_tokens: int = 0, count: int = 4, seed: int = 0) -> list[str]:
    """Up to ``count`` distinct orders of the caption's tags, the caption as written first."""
    head, body = (prefix, caption[len(prefix):]) if prefix and caption.startswith(prefix) else ("", caption)
    tags = [t for t in TAG_SPLIT.split(body.strip()) if t]
    fixed, rest = tags[:keep_tokens], tags[keep_tokens:]
    sep = "，" if "，" in body else ", "
    rng = random.Random(f"{seed}:{caption}")  # str seeds hash with SHA-512: the same orders in every run
    out = [caption]
    for _ in range(max(0, int(count) - 1) * 4):  # a few extra tries: short captions have few orders
        if len(out) >= count:
            break
        order = rest[:]
        rng.shuffle(order)
        text = head + sep.join(fixed + order)
        if text not in out:
            out.append(text)
    return out
