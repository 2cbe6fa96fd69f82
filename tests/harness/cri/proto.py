"""Compile runtime_v1.proto into build/cri/ with grpcio-tools and import the result.

`scripts/setup.sh` runs `python -m tests.harness.cri.proto` (WITH_RUNTIMES=1); `load()`
compiles again whenever the .proto is newer than the generated code, so a stale build
never runs.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[3]
PROTO = Path(__file__).with_name("runtime_v1.proto")
OUT_DIR = REPO / "build" / "cri"
GENERATED = ("runtime_v1_pb2.py", "runtime_v1_pb2_grpc.py")


def is_stale(out_dir: Path = OUT_DIR) -> bool:
    outputs = [out_dir / name for name in GENERATED]
    return any(not p.exists() or p.stat().st_mtime < PROTO.stat().st_mtime for p in outputs)


def compile_proto(out_dir: Path = OUT_DIR) -> None:
    from grpc_tools import protoc  # a test dependency (pyproject's test extra)

    out_dir.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"
    rc = protoc.main(["grpc_tools.protoc", f"-I{PROTO.parent}", f"-I{include}",
                      f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", str(PROTO)])
    if rc != 0:
        raise RuntimeError(f"protoc failed on {PROTO} (exit {rc})")


def load(out_dir: Path = OUT_DIR) -> tuple[ModuleType, ModuleType]:
    """(messages module, stubs module), compiled first when missing or stale."""
    if is_stale(out_dir):
        compile_proto(out_dir)
    if str(out_dir) not in sys.path:
        sys.path.insert(0, str(out_dir))   # the stubs module imports the messages by bare name
    return importlib.import_module("runtime_v1_pb2"), importlib.import_module("runtime_v1_pb2_grpc")


if __name__ == "__main__":
    compile_proto()
    print(f"compiled {PROTO.name} into {OUT_DIR}")
