"""Experiments built from the trainer and evaluation: the side-by-side comparison (`compare`)."""
