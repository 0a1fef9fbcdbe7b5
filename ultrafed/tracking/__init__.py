"""Tracking: MLflow runs, weights as artifacts, the Model Registry with lineage, promotion.

Submodules (import them directly; this package imports nothing heavy itself):
  runs      configure_tracking, ensure_experiment, parent/round/site runs, code_commit
  store     put_state / get_state: weights as run artifacts with sha256
  registry  register_encoder, register_task_model, load_encoder, latest_version,
            list_versions, promotion gates (mlflow/registry.yaml) and promote()
  lineage   the Lineage record, chain(), verify()
  pictures  reconstruction grids, loss curves, per-site bars (matplotlib, headless)
  server    start/stop a local ``mlflow server`` by PID
"""
