"""Coverage-guided fuzzing of vhostnet (not shipped): targets, corpus, runner.

``python -m fuzz.run --seconds N [--target NAME]``; see README ("Fuzzing and sanitizers").
"""
