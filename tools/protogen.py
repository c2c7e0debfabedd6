"""Generate the Python stubs of ``proto/credscope/v1`` into ``credscope/v1`` (``make proto``).

``--check`` generates into a temporary folder and fails, listing the differences, when the committed
stubs are stale (``make proto-check``, run by CI). Uses grpcio-tools' bundled protoc, so no system
protoc is needed.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUT_PACKAGE = Path("credscope") / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out_root: Path) -> list[Path]:
    """Run protoc on every proto file; return the generated files relative to ``out_root``."""
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "credscope" / "v1").glob("*.proto"))
    include = str(resources.files("grpc_tools") / "_proto")
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out_root}", f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(p.relative_to(out_root) for p in (out_root / OUT_PACKAGE).iterdir()
                  if p.name.endswith(GENERATED_SUFFIXES))


def committed(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in (root / OUT_PACKAGE).iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.protogen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check that the committed stubs are fresh")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        fresh = generate(out)
        if args.check:
            stale = [str(p) for p in fresh if not (ROOT / p).exists() or not filecmp.cmp(out / p, ROOT / p, shallow=False)]
            extra = [str(p) for p in committed(ROOT) if p not in fresh]
            if stale or extra:
                print("generated stubs are stale; run `make proto` and commit:", *stale, *extra, sep="\n  ")
                return 1
            print(f"{len(fresh)} generated stubs are fresh")
            return 0
        for p in committed(ROOT):
            if p not in fresh:
                (ROOT / p).unlink()
        for p in fresh:
            shutil.copyfile(out / p, ROOT / p)
        print(f"generated {len(fresh)} files into {OUT_PACKAGE}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
