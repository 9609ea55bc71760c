"""Evaluation metrics (VQA accuracy, CIDEr-D) in pure Python/numpy."""
