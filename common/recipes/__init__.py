"""One module per code lineage (DESIGN.md, Layout: recipes/): which models, losses, presets and log lines a
lineage's entry points assemble from the engine, models, losses, datasets and evaluation.

``psp``: IFVD, CWD, SKD (journal code); ``run``: what every trainer writes around its loop; ``options``: the
flags every entry point shares.
"""
