"""Generate the Python gRPC code for proto/midx/v1/sampler.proto into client/midx_client/_proto.

Run `python scripts/gen_proto.py` after editing the .proto file and commit the result; the generated
files are never edited by hand. `--check` regenerates into a temporary directory and exits with status
1 when the checked-in files differ, so CI catches a stale checkout.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTO_FILES = ["midx/v1/sampler.proto"]
OUTPUT_DIR = ROOT / "client" / "midx_client" / "_proto"

INIT_TEXT = '"""Generated gRPC code for the midx.v1 protocol; regenerate with scripts/gen_proto.py."""\n'

# protoc writes absolute imports (`from midx.v1 import sampler_pb2`); the generated modules live in
# one flat package, so the imports are made package-relative.
_ABSOLUTE_IMPORT = re.compile(r"^from midx\.v1 import (\w+_pb2)", re.MULTILINE)


def generate(destination: Path) -> None:
    """Write the generated modules, their .pyi stubs and an __init__.py into `destination`."""
    with tempfile.TemporaryDirectory() as raw_dir:
        raw = Path(raw_dir)
        arguments = [
            "grpc_tools.protoc",
            f"--proto_path={PROTO_ROOT}",
            f"--python_out={raw}",
            f"--pyi_out={raw}",
            f"--grpc_python_out={raw}",
            *PROTO_FILES,
        ]
        status = protoc.main(arguments)
        if status != 0:
            raise SystemExit(f"protoc failed with status {status}")

        destination.mkdir(parents=True, exist_ok=True)
        for generated in sorted((raw / "midx" / "v1").iterdir()):
            text = _ABSOLUTE_IMPORT.sub(r"from . import \1", generated.read_text())
            (destination / generated.name).write_text(text)
        (destination / "__init__.py").write_text(INIT_TEXT)


def stale_files(expected_dir: Path, actual_dir: Path) -> list[str]:
    """Return the names that are missing, extra or different in `actual_dir`."""
    expected = {path.name for path in expected_dir.iterdir() if path.is_file()}
    actual = {path.name for path in actual_dir.iterdir() if path.is_file()} if actual_dir.is_dir() else set()
    differing = {
        name for name in expected & actual if not filecmp.cmp(expected_dir / name, actual_dir / name, shallow=False)
    }
    return sorted((expected ^ actual) | differing)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit with status 1 if the checked-in code is out of date")
    args = parser.parse_args()

    if not args.check:
        if OUTPUT_DIR.exists():
            shutil.rmtree(OUTPUT_DIR)
        generate(OUTPUT_DIR)
        print(f"wrote {OUTPUT_DIR.relative_to(ROOT)}")
        return 0

    with tempfile.TemporaryDirectory() as fresh_dir:
        fresh = Path(fresh_dir)
        generate(fresh)
        stale = stale_files(fresh, OUTPUT_DIR)
    if stale:
        print(
            f"generated code in {OUTPUT_DIR.relative_to(ROOT)} is out of date ({', '.join(stale)}); "
            "run `python scripts/gen_proto.py` and commit the result",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
