"""Fine-tune a registered encoder on a task, log it to MLflow and register the task model."""
from __future__ import annotations

from typing import Any, Mapping

from prefect import task

TASK_MODEL_SUFFIX = {"cls": "classifier", "seg": "segmenter"}


def task_model_name(task_name: str) -> str:
    """``busi-cls`` -> ``busi-classifier`` (the names mlflow/registry.yaml's gates match)."""
    from ultrafed.data.tasks import get_task

    spec = get_task(task_name)
    return f"{task_name.rsplit('-', 1)[0]}-{TASK_MODEL_SUFFIX[spec.kind]}"


def finetune_and_register(cfg: Mapping[str, Any], task_name: str, root: str, encoder_uri: str | None, *,
                          evaluate_test: bool, progress: bool = False, register: bool = True) -> dict[str, Any]:
    """The fine-tuning step without Prefect (the CLI and the task share it)."""
    from ultrafed.config import from_dict
    from ultrafed.data.tasks import get_task
    from ultrafed.engine.finetune import finetune_from_config
    from ultrafed.tracking.registry import load_encoder, register_task_model
    from ultrafed.tracking.runs import code_commit, end_run, ensure_experiment, log_metrics

    import mlflow
    from mlflow.tracking import MlflowClient

    c = from_dict(cfg)
    spec = get_task(task_name)
    encoder = load_encoder(encoder_uri) if encoder_uri else None
    res = finetune_from_config(task_name, root, encoder, c, evaluate_test=evaluate_test, progress=progress)
    exp = ensure_experiment(c.tracking.experiment)
    run_id = MlflowClient().create_run(exp, run_name=f"finetune-{task_name}", tags={
        "ultrafed.kind": "finetune", "ultrafed.task": task_name, "ultrafed.encoder_uri": encoder_uri or "scratch"}).info.run_id
    metrics = {f"val_{k}": float(v) for k, v in res.val.items()}
    if res.test:
        metrics.update({f"test_{k}": float(v) for k, v in res.test.items()})
    metrics["wall_s"] = res.wall_s
    log_metrics(run_id, {k: v for k, v in metrics.items() if v == v})
    for h in res.history:
        for k, v in h.items():
            if isinstance(v, (int, float)) and v == v and k != "epoch":
                mlflow.tracking.MlflowClient().log_metric(run_id, f"epoch_{k}", float(v), step=int(h.get("epoch", 0)))
    out: dict[str, Any] = {"task": task_name, "val": res.val, "test": res.test, "wall_s": res.wall_s,
                           "run_id": run_id, "model_uri": None, "name": None, "version": None}
    if register and encoder_uri:
        v = register_task_model(res.model, name=task_model_name(task_name), encoder_uri=encoder_uri, run_id=run_id,
                                metrics={k: v for k, v in metrics.items() if v == v}, task=task_name,
                                class_names=list(spec.classes) if spec.classes else None, img_size=c.finetune.img_size,
                                probabilities=spec.kind == "cls",
                                lineage={"params_hash": c.params_hash(), "code_commit": code_commit(), "seed": c.seed,
                                         "data": {"task": task_name, "selection": "val", "report": "test" if evaluate_test else None,
                                                  "img_size": c.finetune.img_size, "epochs": c.finetune.epochs}})
        out.update(model_uri=v.uri, name=v.name, version=int(v.version))
    end_run(run_id)
    return out


@task(name="finetune", task_run_name="finetune-{task_name}", retries=0)
def finetune_task(cfg: Mapping[str, Any], task_name: str, root: str, encoder_uri: str, *,
                  evaluate_test: bool = True) -> dict[str, Any]:
    """Fine-tune, evaluate (val for selection, test once) and register the task model."""
    return finetune_and_register(cfg, task_name, root, encoder_uri, evaluate_test=evaluate_test)


@task(name="promote", task_run_name="promote-{name}-v{version}")
def promote_task(name: str, version: int, alias: str, reason: str) -> dict[str, Any]:
    """Set the alias if every gate holds; a refusal is a result (with reasons), not a crash."""
    from ultrafed.tracking.promotion import PromotionRefused, promote

    try:
        results = promote(name, version, alias, reason=reason)
        return {"name": name, "version": version, "alias": alias, "promoted": True,
                "gates": [f"{r.gate}: ok" for r in results]}
    except PromotionRefused as e:
        failed = [f"{r.gate}: {r.detail}" for r in e.results if not r.passed]
        return {"name": name, "version": version, "alias": alias, "promoted": False, "gates": failed}
