"""``python -m kolors_story.story new <path> [--force]``: write a commented 8-scene story template."""

from __future__ import annotations

import argparse
import sys

from kolors_story.errors import one_line_errors
from kolors_story.story.template import write_template


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kolors_story.story", description=__doc__.split(":")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    new = sub.add_parser("new", help="write an 8-scene template (.yaml with comments, .json or .csv)")
    new.add_argument("path", help="the story file to write, e.g. my_story.yaml")
    new.add_argument("--force", action="store_true", help="replace an existing file")
    args = parser.parse_args(argv)
    path = write_template(args.path, overwrite=args.force)
    print(f"wrote {path}: edit the 8 scenes, then python generate.py story.file={path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
