"""A `shortrt` command run in a child process whose tensor writes are slowed down, so a test can
signal it while it is writing a checkpoint (tests/test_checkpoint_writer.py, tests/test_heal.py)."""
from __future__ import annotations

import subprocess
import sys
import time

SLOW_WRITE = """
import sys, time
import shortrt.safetensors_writer as w
original = w.write_safetensors
def slow(path, tensors, metadata=None):
    for t in tensors:
        read = t.read
        t.read = lambda read=read: (time.sleep(0.05), read())[1]
    print("WRITING", flush=True)
    return original(path, tensors, metadata)
w.write_safetensors = slow
from shortrt.cli import main
sys.exit(main(sys.argv[1:]))
"""


def start_slow_write(argv) -> subprocess.Popen:
    """Start `shortrt ARGV...`; returns once it is part-way through writing the checkpoint."""
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITE, *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.strip() == "WRITING", proc.stderr.read()
    time.sleep(0.2)  # some tensors written, the staging directory full of a partial checkpoint
    return proc
