"""Orchestration: plans, Ray tasks and the job drivers. Config objects stop here; below, plain arguments."""
