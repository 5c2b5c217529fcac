"""InPlace-ABN (specs/inplace_abn.md): ``ABN`` (pure PyTorch), ``InPlaceABN`` / ``InPlaceABNSync`` (compiled
extension, built by ``make build-abn``), ``norm_layer`` for the models, ``legacy`` for the seeds' old API."""
from common.abn import _backend
from common.abn.abn import ABN, InPlaceABN, InPlaceABNSync
from common.abn.functional import inplace_abn, inplace_abn_sync
from common.errors import UserError

NORMS = ("inplace_abn", "abn", "auto", "bn")


def extension_available():
    """Whether the compiled extension is built, up to date and importable (never compiles)."""
    return _backend.available()


def norm_layer(norm="auto"):
    """The In-Place ABN class for ``norm``: "inplace_abn" = compiled InPlaceABNSync (as the originals), "abn" =
    the pure-PyTorch reference ``ABN`` (same math and state_dict), "bn" = "abn" (the older name), "auto" =
    "inplace_abn" when the extension is built, else "abn"."""
    if norm not in NORMS:
        raise UserError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
    if norm in ("abn", "bn") or (norm == "auto" and not extension_available()):
        return ABN
    if not extension_available():
        raise UserError(f"norm='inplace_abn' needs the compiled InPlace-ABN extension ({_backend.load()[1]}); "
                        f"{_backend.BUILD_HINT}, or use norm='abn'")
    return InPlaceABNSync


__all__ = ["ABN", "InPlaceABN", "InPlaceABNSync", "extension_available", "inplace_abn", "inplace_abn_sync",
           "norm_layer"]
