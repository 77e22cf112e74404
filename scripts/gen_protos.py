"""Regenerates the Python code beside every .proto under protos/.

Usage:
    python scripts/gen_protos.py           # write the generated files
    python scripts/gen_protos.py --check   # exit 1 if the committed files are stale
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def _generate(out: Path) -> None:
    import grpc_tools
    from grpc_tools import protoc

    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    well_known = str(Path(grpc_tools.__file__).parent / "_proto")
    bin_dir = Path(sys.executable).parent
    args = [
        "protoc",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"-I{PROTOS}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def _generated_files(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*") if p.name.endswith(GENERATED_SUFFIXES)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if the committed code is stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        _generate(out)
        fresh = _generated_files(out)
        committed = _generated_files(PROTOS)
        if args.check:
            stale = sorted(str(p) for p in fresh ^ committed)
            stale += sorted(str(p) for p in fresh & committed if not filecmp.cmp(out / p, PROTOS / p, shallow=False))
            if stale:
                print("generated code is stale; run `make gen`:", *stale, sep="\n  ", file=sys.stderr)
                return 1
            print(f"generated code is fresh ({len(fresh)} files)")
            return 0
        for old in committed - fresh:
            (PROTOS / old).unlink()
        for rel in fresh:
            (PROTOS / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / rel, PROTOS / rel)
        print(f"wrote {len(fresh)} files under {PROTOS.relative_to(ROOT)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
