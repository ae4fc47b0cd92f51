"""Evaluation: semantic segmentation metrics (and the folder scores of inference/evaluate.py) and COCO box/mask AP."""
