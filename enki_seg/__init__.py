"""enki_seg: the package behind the root CLIs (build_lmdb.py, train_unet.py, train_maskrcnn.py,
inference.py, evaluate.py) and the engine modules (imagereader.py, augment.py).

Rooms: ``data`` (record format, image I/O, tiling, COCO input, normalization, labels, demo data),
``training`` (the loop, distribution, run folder and state, schedules, losses, the two trainers),
``evaluation`` (semantic metrics, COCO AP), ``inference`` (the shared core, semantic, instance).
"""
