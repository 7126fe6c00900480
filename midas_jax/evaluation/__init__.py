"""Evaluation: reasoning primitives (`primitives`), few-shot and fine-tune accuracy, val loss."""
