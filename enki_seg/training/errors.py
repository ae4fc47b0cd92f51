"""TrainError: the one error type of training. Its message names the flag or file and the fix; the
trainers' main() logs it as one line and exits with ``exit_codes.BAD_INPUT``."""
from __future__ import annotations


class TrainError(RuntimeError):
    """A problem found before or during training; the message says what to do."""
