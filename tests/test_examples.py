"""Every example in examples/ is run by a test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_counter_demo() -> None:
    out = subprocess.run([sys.executable, "-m", "examples.counter.demo"], cwd=ROOT, capture_output=True, text=True,
                         timeout=180, env=dict(os.environ, COLUMNS="120"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "every value is exact" in out.stdout
    assert "bank total 5000 (deposited 5000): conserved" in out.stdout
    assert out.stdout.count("│ ok │") == 25
    assert "200 payments by durable calls" in out.stdout
    assert "190 paid, 10 declined (insufficient funds) as expected" in out.stdout
    assert "100 moves by transactions" in out.stdout
    assert "90 moved, 10 declined (insufficient funds, nothing moved) as expected" in out.stdout
    assert "WRONG" not in out.stdout
