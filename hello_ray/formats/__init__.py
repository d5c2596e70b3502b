"""Artifact formats: one module per file format, its writer and its reader together, and its file
names spelled once (DESIGN.md). Stages write through these modules, the report and the jobs read
through them. They sit just above the store: they import ``hello_ray.store`` and nothing above it.
"""
