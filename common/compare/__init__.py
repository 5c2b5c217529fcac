"""``python -m common.compare PROTOCOL``: every method of a protocol x seeds through ``common.distill``, one report.

A protocol (DESIGN.md "Layout": one teacher, one student, data, schedule, evaluation, budget) is what a
comparison holds fixed; only the method varies. :mod:`.protocol` reads and checks a protocol file and builds
each run's command, :mod:`.launch` runs the commands (locally or on SLURM through submitit), :mod:`.report`
aggregates the runs' ``results.json`` into ``compare.{md,csv,json,png}``.
"""
