"""The client package loads where only the client extra is installed."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SERVER_ONLY = ["fastapi", "uvicorn", "redis", "prometheus_client", "pydantic_settings", "midx_service"]


def test_client_imports_without_server_packages():
    script = textwrap.dedent(
        f"""
        import importlib.abc
        import sys

        blocked = {SERVER_ONLY!r}

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in blocked:
                    raise ModuleNotFoundError(f"{{name}} is blocked in this test")
                return None

        sys.meta_path.insert(0, Block())
        import midx_client
        from midx_client import RestSamplerClient, SamplerClient, sampled_softmax_loss

        assert callable(sampled_softmax_loss)
        print(SamplerClient.__name__, RestSamplerClient.__name__)
        """
    )

    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)

    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.split() == ["SamplerClient", "RestSamplerClient"]
