"""A NIST-style reader, written for comparison only: how NIST's ImageReader does the work.

Per example, as in usnistgov/semantic-segmentation-unet's imagereader.py/augment.py: read the
record, skimage ``rotate`` (bilinear) for image and mask, then a second skimage ``warp`` for
scale/jitter/reflection, the mask rounded back to integers after bilinear interpolation, a scalar-
sigma ``scipy.ndimage.gaussian_filter``, noise in float64, per-tile z-score, one-hot encoding of the
mask; whole batches are pickled through a ``multiprocessing.Queue``. One global RNG per worker.
Not part of the product; bench/reader_bench.py measures the project's reader against it.
"""
from __future__ import annotations

import multiprocessing
import queue
import time

import numpy as np


def _augment_nist(rng, image, mask):
    import scipy.ndimage
    import skimage.transform

    image = image.astype(np.float32)
    mask = mask.astype(np.float32)
    angle = rng.uniform(0, 360)
    image = skimage.transform.rotate(image, angle, order=1, preserve_range=True, mode="reflect")
    mask = np.round(skimage.transform.rotate(mask, angle, order=1, preserve_range=True, mode="reflect"))
    h, w = mask.shape
    scale_x, scale_y = rng.uniform(0.9, 1.1, size=2)
    jitter_x, jitter_y = rng.uniform(-0.1, 0.1, size=2) * (w, h)
    flip_x = -1 if rng.random() < 0.5 else 1
    flip_y = -1 if rng.random() < 0.5 else 1
    tform = skimage.transform.AffineTransform(scale=(scale_x * flip_x, scale_y * flip_y),
                                              translation=(jitter_x, jitter_y))
    image = skimage.transform.warp(image, tform, order=1, preserve_range=True, mode="reflect")
    mask = np.round(skimage.transform.warp(mask, tform, order=1, preserve_range=True, mode="reflect"))
    sigma = rng.uniform(0, 2)
    image = scipy.ndimage.gaussian_filter(image, sigma)  # scalar sigma: blurs across channels too
    span = float(image.max() - image.min())
    image = image + rng.normal(0, rng.uniform(0, 0.02) * span, size=image.shape)  # float64
    return image, mask


def _zscore(image):
    image = image.astype(np.float32)
    for c in range(image.shape[-1]):
        std = image[..., c].std()
        image[..., c] -= image[..., c].mean()
        if std > 1.0:
            image[..., c] /= std
    return image


def _worker(path, batch_size, num_classes, augment, out_queue, stop, worker_seed):
    from enki_seg.data import records

    rng = np.random.default_rng(worker_seed)
    db = records.Database(path)
    n = len(db)
    while not stop.is_set():
        images, masks = [], []
        for _ in range(batch_size):
            example = db.read(int(rng.integers(n)))
            image, mask = example.image, example.semantic_mask
            if augment:
                image, mask = _augment_nist(rng, image[..., 0], mask)
                image = image[..., None]
            images.append(_zscore(image))
            # one-hot as uint8: cheaper to pickle than NIST's float, so the baseline errs in its favour
            masks.append(np.eye(num_classes, dtype=np.uint8)[mask.astype(np.int64)])
        batch = (np.stack(images), np.stack(masks))
        while not stop.is_set():
            try:
                out_queue.put(batch, timeout=0.1)
                break
            except queue.Full:
                pass


def throughput(path: str, workers: int, augment: bool, batch_size: int = 8, num_classes: int = 2,
               seconds: float = 4.0, warmup_batches: int = 3) -> float:
    """Examples/s delivered to a consumer that only takes batches off the queue."""
    ctx = multiprocessing.get_context("fork")
    out_queue = ctx.Queue(maxsize=2 * workers + 2)
    stop = ctx.Event()
    procs = [ctx.Process(target=_worker, args=(path, batch_size, num_classes, augment, out_queue, stop, w),
                         daemon=True) for w in range(workers)]
    for p in procs:
        p.start()
    try:
        for _ in range(warmup_batches):
            out_queue.get(timeout=60)
        count = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            out_queue.get(timeout=60)
            count += batch_size
        return count / (time.perf_counter() - start)
    finally:
        stop.set()
        try:
            while True:
                out_queue.get_nowait()
        except queue.Empty:
            pass
        for p in procs:
            p.join(2)
            if p.is_alive():
                p.kill()
                p.join()
