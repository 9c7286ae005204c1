"""``python -m kolors_story.export <checkpoint | run | best.yaml> --name <Team>-KolorsTraining-<x> [--out <dir>]``:
a checkpoint's LoRA files named for the ModelScope upload, with the model card (see
kolors_story.generate.export)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kolors_story.errors import one_line_errors


def _checkpoint(source: Path) -> Path:
    from kolors_story.config.saved import resolve_checkpoint
    from kolors_story.records import last_checkpoint

    if source.is_dir() and any(source.glob("lora*")):
        return source  # a checkpoint folder itself
    last = last_checkpoint(source) if source.is_dir() else None
    return last if last is not None else resolve_checkpoint(source, "last").checkpoint  # a best.yaml


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    from kolors_story.generate.export import export_checkpoint

    parser = argparse.ArgumentParser(prog="python -m kolors_story.export",
                                     description="A checkpoint's LoRA files named for the ModelScope upload, with its model card.")
    parser.add_argument("source", type=Path, help="a checkpoints/step-XXXXXX folder, a run folder (its last) or a best.yaml")
    parser.add_argument("--name", required=True, help="the model's name: <Team>-KolorsTraining-<title>")
    parser.add_argument("--out", type=Path, default=Path("export"), help="where the <name>/ folder goes (default export/)")
    parser.add_argument("--force", action="store_true", help="replace an existing folder of that name")
    args = parser.parse_args(argv)
    folder = export_checkpoint(_checkpoint(args.source), args.name, args.out, overwrite=args.force)
    print(f"wrote {folder}: upload its files to https://modelscope.cn/models/create (name {args.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
