"""Loads the prebuilt InPlace-ABN extension from common/abn/_ext (never compiles; specs/inplace_abn.md §5.5).

``_C_cuda`` (CPU + CUDA kernels) is preferred, ``_C_cpu`` is the fallback. A library whose fingerprint does not
match this torch / these sources counts as absent, so a stale build asks for ``make build-abn`` instead of
crashing inside the kernels.
"""
import functools
import importlib.machinery
import importlib.util

from common.abn import _paths
from common.errors import UserError

BUILD_HINT = "run `make build-abn` (python -m common.abn.build) to compile it"


def _stale_reason(name):
    stamp = _paths.read_stamp(name)
    if stamp is None:
        return f"{name} has no build stamp"
    for key, value in _paths.runtime_key().items():
        if stamp.get(key) != value:
            return f"{name} was built for {key} {stamp.get(key)}, this is {value}"
    digest = _paths.source_digest()
    if digest is not None and stamp.get("sources") != digest:
        return f"{name} is older than the sources in csrc/"
    return None


def _import(name):
    path = _paths.library_path(name)
    if not path.exists():
        return None, f"{path} does not exist"
    reason = _stale_reason(name)
    if reason is not None:
        return None, reason
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, str(path), loader=loader)
    module = importlib.util.module_from_spec(spec)
    try:
        loader.exec_module(module)
    except ImportError as err:
        return None, f"{path} cannot be loaded ({err})"
    return module, None


@functools.cache
def load():
    """(module or None, reason why it is missing)."""
    reasons = []
    for name in ("_C_cuda", "_C_cpu"):
        module, reason = _import(name)
        if module is not None:
            return module, None
        reasons.append(reason)
    return None, "; ".join(reasons)


def available():
    return load()[0] is not None


def for_tensor(x):
    """The extension module able to run on ``x``'s device, or a UserError saying how to build it."""
    module, reason = load()
    if module is None:
        raise UserError(f"the InPlace-ABN extension is not built ({reason}); {BUILD_HINT}")
    if x.is_cuda and not module.with_cuda:
        raise UserError("the InPlace-ABN extension was built without CUDA but got a CUDA tensor; "
                        "run `make build-abn` with CUDA_HOME pointing at the CUDA toolkit")
    return module
