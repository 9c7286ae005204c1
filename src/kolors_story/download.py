"""`python -m kolors_story.download [kolors vae scorer] [--dir models]`: see kolors_story.models.download."""

import sys

from kolors_story.models.download import main

if __name__ == "__main__":
    sys.exit(main())
