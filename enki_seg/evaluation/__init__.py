"""Evaluation: semantic segmentation metrics and COCO box/mask AP."""
