"""Evaluation: the competition's aesthetic scorer (``scorer``), what a story's scores add up to
(``summary``: the 6.0 gate, coherence), scoring a folder of images (``folder``: ``evaluate.py
images=``), ranking a sweep's checkpoints (``leaderboard``: ``evaluate.py sweep=``), and what people
look at without W&B: curves, progress sheets and the X/Y grid (``plots``, ``grid``), the run and
sweep ``report.html`` (``run_report``, ``sweep_report``, ``templates/``)."""
