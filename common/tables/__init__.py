"""Benchmark tables: results.json schema, reported numbers as data, renderer, computed Params/FLOPs."""
from common.tables.schema import (
    RESULT_FIELDS,
    code_version,
    find_results,
    make_result,
    read_results,
    write_results,
)

__all__ = ["RESULT_FIELDS", "code_version", "find_results", "make_result", "read_results", "write_results"]
