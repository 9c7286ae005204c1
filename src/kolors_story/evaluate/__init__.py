"""Evaluation: the competition's aesthetic scorer (``scorer``), what a story's scores add up to
(``summary``: the 6.0 gate, coherence), scoring a folder of images (``folder``: ``evaluate.py
images=``) and ranking a sweep's checkpoints (``leaderboard``: ``evaluate.py sweep=``)."""
