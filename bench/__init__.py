"""Benchmarks: each module's ``main()`` prints ratios against a baseline measured in the same run."""
