"""Thin Prefect ``@task`` wrappers around the library (``ultrafed/``): retries, timeouts, names."""
