"""Pipelines: the file (spec), what will run (plan), running it (runner), publishing and the report."""
