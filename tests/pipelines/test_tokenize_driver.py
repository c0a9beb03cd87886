"""The tokenize driver (pipelines/tokenize/driver.py)."""

from __future__ import annotations

import os


def test_tokenize_driver_does_not_import_torch():
    # the driver only reads configs and schedules; torch's import (~1.5 s) belongs to the workers
    import subprocess
    import sys
    code = ("import sys, pipelines.cli, pipelines.cli.tokenize, pipelines.tokenize.driver, "
            "pipelines.tokenize.worker; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert out.stdout.strip() == "False"
