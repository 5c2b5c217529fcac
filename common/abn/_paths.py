"""Where the InPlace-ABN extension lives and how a build is fingerprinted (shared by build and loader)."""
import hashlib
import json
import pathlib
import sys

import torch

PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
EXT_DIR = PACKAGE_DIR / "_ext"
BUILD_DIR = EXT_DIR / "build"
CSRC_DIR = PACKAGE_DIR.parent.parent / "csrc"
MODULES = ("_C_cpu", "_C_cuda")


def library_path(name):
    return EXT_DIR / f"{name}.so"


def stamp_path(name):
    return BUILD_DIR / f"{name}.stamp.json"


def sources(name):
    """The csrc files compiled into module ``name`` (headers included in the fingerprint)."""
    files = ["abn.cpp", "abn_cpu.cpp", "bindings.cpp"]
    if name == "_C_cuda":
        files.append("abn_cuda.cu")
    return [CSRC_DIR / f for f in files]


def source_digest():
    """SHA-256 over every file in csrc/ (None when the sources are not shipped)."""
    if not CSRC_DIR.is_dir():
        return None
    h = hashlib.sha256()
    for path in sorted(CSRC_DIR.iterdir()):
        if path.is_file():
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def runtime_key():
    return {"torch": torch.__version__, "python": sys.version.split()[0]}


def read_stamp(name):
    try:
        return json.loads(stamp_path(name).read_text())
    except (OSError, ValueError):
        return None
