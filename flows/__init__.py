"""Prefect flows that compose the tasks in ``tasks/`` into UltraFed's pipeline.

Importing this package sets the environment Prefect and MLflow need on a small machine
(before either is imported), so every entry point behaves the same way.
"""
from flows.settings import apply_runtime_env

apply_runtime_env()
