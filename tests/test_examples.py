"""Examples are run as users run them (the fast ones; the SmolLM2 one is the demo's cousin)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_compress_mlp_example():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "compress_mlp.py")], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "identical outputs" in result.stdout


def test_reparametrize_finetune_example_quick():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "reparametrize_finetune.py"), "--quick"],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "monarch b=4" in result.stdout and "untouched: True" in result.stdout
