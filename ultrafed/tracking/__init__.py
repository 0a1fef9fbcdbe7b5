"""Tracking: MLflow runs, weights as artifacts, the Model Registry with lineage, promotion.

Submodules (import them directly; this package imports nothing heavy itself):
  runs      configure_tracking, ensure_experiment, parent/round/site runs, code_commit
  store     put_state / get_state: weights as run artifacts with sha256
  names     tag keys, the lineage artifact's path, models:/ URIs (a leaf: imports nothing of ours)
  registry  register_encoder, register_task_model, load_encoder, latest_version, list_versions
  lineage   the Lineage record, chain(), verify()
  promotion the gates of mlflow/registry.yaml, evaluate_gates() and promote()
  pictures  reconstruction grids, loss curves, per-site bars (matplotlib, headless)
  server    start/stop a local ``mlflow server`` by PID
"""
