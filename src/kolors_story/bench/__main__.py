"""``python -m kolors_story.bench [--quick] [--only SECTION] [--repeats N] [--out bench.json]``."""

import os
import sys

# Before torch loads OpenMP: on a CPU shared with other jobs, OpenMP's default spin-waiting threads
# make every op up to 10-20x slower (measured here: a bench LoRA step 0.55 s passive vs 6-8 s
# spinning, with 2 threads and 4 other busy processes). Set OMP_WAIT_POLICY to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from kolors_story.bench.run import main

sys.exit(main())
