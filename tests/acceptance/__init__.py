"""Whole-process acceptance tests: real worker processes, real SQLite files, real signals."""
