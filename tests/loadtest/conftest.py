"""Puts loadtest/ on sys.path, where locust puts it when it loads loadtest/locustfile.py."""

import sys
from pathlib import Path

LOADTEST_DIR = Path(__file__).resolve().parents[2] / "loadtest"
if str(LOADTEST_DIR) not in sys.path:
    sys.path.insert(0, str(LOADTEST_DIR))
