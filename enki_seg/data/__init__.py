"""Data: the record format, image I/O, tiling, COCO input, normalization, labels, demo data. Never imports model code."""
