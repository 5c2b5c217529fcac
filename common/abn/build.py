"""Ahead-of-time build of the InPlace-ABN extension (specs/inplace_abn.md §5.5); run by ``make build-abn``.

Compiles csrc/ with torch.utils.cpp_extension + ninja into common/abn/_ext/: ``_C_cpu`` (CPU kernels) always,
``_C_cuda`` (CPU + CUDA kernels) when torch is a CUDA build and nvcc is found. A fingerprint of the sources,
torch version and flags is stored next to each library; an unchanged fingerprint skips the module in seconds.
Environment: ``CUDA_HOME`` (toolkit), ``TORCH_CUDA_ARCH_LIST`` (default "8.0;9.0"), ``MAX_JOBS``,
``ABN_WITH_CUDA=0`` (skip CUDA), ``ABN_CPU_ARCH=native-avx2|generic`` (default: avx2 if this CPU has it),
``ABN_VERBOSE=1`` (show the compiler commands). ``--force`` rebuilds from scratch.
"""
import argparse
import json
import os
import pathlib
import shutil
import sys
import time

import torch
from torch.utils import cpp_extension

from common.abn import _paths
from common.errors import UserError, main_guard

DEFAULT_ARCH_LIST = "8.0;9.0"


def _cpu_flags():
    choice = os.environ.get("ABN_CPU_ARCH", "auto")
    if choice not in ("auto", "native-avx2", "generic"):
        raise UserError(f"ABN_CPU_ARCH={choice!r} is not one of auto, native-avx2, generic; unset it or pick one")
    if choice == "auto":
        try:
            flags = pathlib.Path("/proc/cpuinfo").read_text()
        except OSError:
            flags = ""
        choice = "native-avx2" if (" avx2" in flags and " fma" in flags) else "generic"
    flags = ["-O3"]
    if choice == "native-avx2":
        flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return flags, choice


def _cuda_reason_skipped():
    if os.environ.get("ABN_WITH_CUDA", "1") == "0":
        return "ABN_WITH_CUDA=0"
    if not torch.backends.cuda.is_built():
        return f"torch {torch.__version__} is a CPU-only build"
    if _cuda_home() is None:
        home = os.environ.get("CUDA_HOME")
        where = f"CUDA_HOME={home} has no bin/nvcc or include/cuda_runtime.h" if home else "nvcc not found"
        return f"{where} (set CUDA_HOME to the CUDA toolkit, e.g. CUDA_HOME=/usr/local/cuda)"
    return None


def _cuda_home():
    """$CUDA_HOME if set, else /usr/local/cuda or torch's guess: the first toolkit with nvcc and its headers."""
    candidates = [os.environ["CUDA_HOME"]] if os.environ.get("CUDA_HOME") else ["/usr/local/cuda",
                                                                                   cpp_extension.CUDA_HOME]
    for home in candidates:
        if home and all((pathlib.Path(home) / p).exists() for p in ("bin/nvcc", "include/cuda_runtime.h")):
            return home
    return None


def _nvidia_wheel_includes():
    """Include dirs of the nvidia-* wheels (cuBLAS/cuSPARSE headers that torch's CUDA headers include)."""
    try:
        import nvidia
    except ImportError:
        return []
    found = []
    for root in getattr(nvidia, "__path__", []):
        for inc in sorted(pathlib.Path(root).glob("*/include")):
            if (inc / "cublas_v2.h").exists() or (inc / "cusparse.h").exists():
                found.append(str(inc))
    return found


def _build_one(name, cflags, cuda_cflags, includes, describe, force=False):
    """Build ``name`` unless its fingerprint is unchanged; returns (status, seconds)."""
    key = {
        **_paths.runtime_key(),
        "sources": _paths.source_digest(),
        "cflags": cflags,
        "cuda_cflags": cuda_cflags,
        "includes": includes,
        "arch": os.environ.get("TORCH_CUDA_ARCH_LIST") if name == "_C_cuda" else None,
        "describe": describe,
    }
    lib = _paths.library_path(name)
    if not force and lib.exists() and _paths.read_stamp(name) == key:
        return "up to date", 0.0
    build_dir = _paths.BUILD_DIR / name
    if force:
        shutil.rmtree(build_dir, ignore_errors=True)
    build_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        _compile(name, cflags, cuda_cflags, includes, build_dir)
    except (RuntimeError, OSError) as err:
        print(err, file=sys.stderr)
        raise UserError(f"compiling {name} failed (compiler output above); check the compiler, CUDA_HOME and "
                        f"TORCH_CUDA_ARCH_LIST, or set ABN_WITH_CUDA=0 to build the CPU part only") from None
    tmp = lib.with_suffix(".so.tmp")
    shutil.copy2(build_dir / f"{name}.so", tmp)
    os.replace(tmp, lib)
    stamp = _paths.stamp_path(name)
    stamp.with_suffix(".tmp").write_text(json.dumps(key, indent=1))
    os.replace(stamp.with_suffix(".tmp"), stamp)
    return "built", time.perf_counter() - start


def _compile(name, cflags, cuda_cflags, includes, build_dir):
    cpp_extension.load(
        name=name,
        sources=[str(p) for p in _paths.sources(name)],
        extra_cflags=cflags,
        extra_cuda_cflags=cuda_cflags,
        extra_include_paths=includes,
        build_directory=str(build_dir),
        with_cuda=name == "_C_cuda",
        is_python_module=True,
        verbose=os.environ.get("ABN_VERBOSE", "0") == "1",
    )


@main_guard
def main(argv=None):
    parser = argparse.ArgumentParser(description="Build the InPlace-ABN extension into common/abn/_ext.")
    parser.add_argument("--force", action="store_true", help="rebuild even if the fingerprint is unchanged")
    args = parser.parse_args(argv)
    if not _paths.CSRC_DIR.is_dir():
        raise UserError(f"the InPlace-ABN sources {_paths.CSRC_DIR} are missing; run from a full checkout")
    _paths.EXT_DIR.mkdir(parents=True, exist_ok=True)
    cflags, cpu_arch = _cpu_flags()
    status, secs = _build_one("_C_cpu", cflags, [], [], f"cpu:{cpu_arch}", args.force)
    print(f"build-abn: CPU part ({cpu_arch}) {status}" + (f" in {secs:.0f} s" if secs else ""), flush=True)

    reason = _cuda_reason_skipped()
    if reason is not None:
        print(f"build-abn: CUDA part skipped: {reason}; CUDA tensors will need a rebuild with nvcc", flush=True)
        return
    os.environ["CUDA_HOME"] = cpp_extension.CUDA_HOME = _cuda_home()
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    arch = os.environ["TORCH_CUDA_ARCH_LIST"]
    cuda_flags = ["-O3", "-DWITH_CUDA"]
    status, secs = _build_one("_C_cuda", cflags + ["-DWITH_CUDA"], cuda_flags, _nvidia_wheel_includes(),
                              f"cuda:{cpu_arch}:{os.environ['CUDA_HOME']}", args.force)
    print(f"build-abn: CUDA part (archs {arch}, CUDA_HOME={os.environ['CUDA_HOME']}) {status}"
          + (f" in {secs:.0f} s" if secs else ""), flush=True)


if __name__ == "__main__":
    sys.exit(main())
