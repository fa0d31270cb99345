"""The server's malloc thresholds: applied on glibc, and left alone when the environment sets them."""

from __future__ import annotations

import platform
import sys

import pytest

from midx_service.allocator import ENVIRONMENT_VARIABLES, keep_freed_buffers

ON_GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


@pytest.fixture(autouse=True)
def _no_operator_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENVIRONMENT_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.skipif(not ON_GLIBC, reason="mallopt is a glibc function")
def test_thresholds_apply_on_glibc() -> None:
    assert keep_freed_buffers() is True


@pytest.mark.parametrize("name", ENVIRONMENT_VARIABLES)
def test_environment_setting_wins(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv(name, "131072")

    assert keep_freed_buffers() is False
