"""Checks shared by the segmentation models: the input-size rule every encoder-decoder imposes.

This module imports nothing heavy, so a trainer or an inference script can check a tile size
before it builds anything.
"""
from __future__ import annotations



# Keras' default 0.99 averages the batch statistics over ~100 steps; early in training, or with a
# test interval every few dozen steps as on small microscopy sets, the moving statistics then lag the
# weights and test predictions swing from interval to interval. 0.9 (PyTorch's default) tracks them.
BN_MOMENTUM = 0.9

def check_input_size(height: int | None, width: int | None, size_multiple: int) -> None:
    """Raise ValueError unless ``height`` and ``width`` are multiples of ``size_multiple``.

    An encoder-decoder that pools ``n`` times by 2 must see sides divisible by ``2**n``; otherwise
    a skip connection and the upsampled map differ by a pixel and Keras fails deep inside a
    Concatenate with a message that names neither the input size nor the fix.

    Args:
        height, width: the input's spatial size in pixels; None (a dimension unknown while a graph
            is traced) is not checked.
        size_multiple: the model's ``size_multiple`` (``2**number_of_poolings``).

    Raises:
        ValueError: naming the size, the multiple, and the nearest valid sizes below and above.
    """
    if size_multiple < 1:
        raise ValueError(f"size_multiple must be >= 1, got {size_multiple}")
    sides = [int(s) if s is not None else None for s in (height, width)]
    for side in sides:
        if side is not None and side < 1:
            raise ValueError(f"input {_size(sides)} has an empty side")
    if all(s is None or s % size_multiple == 0 for s in sides):
        return

    def rounded(up: bool) -> list[int | None]:
        if up:
            return [None if s is None else -(-s // size_multiple) * size_multiple for s in sides]
        return [None if s is None else s // size_multiple * size_multiple for s in sides]

    smaller, larger = rounded(False), rounded(True)
    if any(s == 0 for s in smaller):
        suggestion = f"pad to {_size(larger)}"
    else:
        suggestion = f"crop to {_size(smaller)} or pad to {_size(larger)}"
    raise ValueError(f"input {_size(sides)} (height x width) is not a multiple of the model's size "
                     f"multiple {size_multiple}; {suggestion}")


def _size(sides: list[int | None]) -> str:
    return "x".join("?" if s is None else str(s) for s in sides)


class InputSizeCheck:
    """Mixin for functional segmentation models: a clear error for inputs of the wrong size.

    The class using it sets ``size_multiple``. Eager calls and graphs traced with a static spatial
    shape (tf.data tiles of one size) are checked when called; shapes unknown while tracing are
    not, so trainers and inference should also call ``check_input`` with the tile size up front.
    """

    size_multiple: int

    def check_input(self, height: int | None, width: int | None) -> None:
        """Raise ValueError unless ``height`` x ``width`` fits this model (see ``check_input_size``)."""
        check_input_size(height, width, self.size_multiple)

    def call(self, inputs, training=None, mask=None, **kwargs):
        shape = getattr(inputs, "shape", None)
        if shape is not None and len(shape) == 4:
            self.check_input(shape[1], shape[2])
        return super().call(inputs, training=training, mask=mask, **kwargs)
