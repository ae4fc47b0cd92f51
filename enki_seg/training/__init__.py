"""Training: the loop both trainers share, distribution, run folder and state, schedules, losses."""
