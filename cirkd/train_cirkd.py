"""CIRKD ``train_cirkd.py`` @ 60f4425–2d8ad0f (specs/cirkd.md §0, §1.3): the CIRKD trainer under its later name,
the same program as ``cirkd/train_kd.py`` (same flags, defaults and files)."""
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cirkd.train_kd import main  # noqa: E402

if __name__ == "__main__":
    main()
