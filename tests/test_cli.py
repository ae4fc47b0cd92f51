"""The CLIs' quiet TensorFlow start-up: the notices TensorFlow writes during its import (on some CPUs
whatever TF_CPP_MIN_LOG_LEVEL says) are dropped, every other line of stderr is kept."""
from __future__ import annotations

import subprocess
import sys

import pytest

from enki_seg import cli
from conftest import ROOT

NOISE = (
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
    "I0000 00:00:1796120145.398422   18321 port.cc:153] oneDNN custom operations are on. You may see slightly "
    "different numerical results due to floating-point round-off errors.\n"
    "I0000 00:00:1796120243.100443   18585 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use "
    "available CPU instructions in performance-critical operations.\n"
    "To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild TensorFlow with the "
    "appropriate compiler flags.\n"
)


def test_start_up_notices_are_dropped_and_other_lines_kept():
    real = "E0000 some_kernel.cc:12] Could not load dynamic library 'libcudart.so.12'\nTraceback: boom\n"
    assert cli.without_start_up_noise(NOISE + real + NOISE) == real
    assert cli.without_start_up_noise("") == ""


@pytest.mark.slow  # imports TensorFlow in a subprocess
def test_quiet_import_writes_no_notices_but_keeps_later_stderr():
    code = (
        "import sys\n"
        "from enki_seg import cli\n"
        "cli.quiet_tensorflow()\n"
        "tf = cli.import_tensorflow()\n"
        "print('after import', file=sys.stderr, flush=True)\n"
        "assert cli.import_tensorflow() is tf\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "oneDNN custom operations" not in result.stderr and "InitializeLog" not in result.stderr
    assert result.stderr.strip().endswith("after import")
