"""Names of the evaluation protocol, spelled once for the runners, the importer and the report.

``bench/run_protocol.py`` (reduced CPU protocol) and ``bench/gpu_protocol.py`` (full protocol on
a lent GPU, imported by ``bench/import_results.py``) write results under these variant, task and
status names; :mod:`ultrafed.report` reads them back. Standard library only: the GPU machine
has no MLflow.
"""
from __future__ import annotations

EXPERIMENT = "ultrafed-results"  # MLflow experiment of every result run (apart from the demos)
RESULT_KIND = "result"           # ultrafed.kind tag of a result run
CPU_PROTOCOL = "cpu-tiny64"      # bench/run_protocol.py's preset; its runs tag no protocol

# Variants: encoders pretrained (or not) differently, then fine-tuned the same way.
FEDERATED, CENTRAL, PLAIN_MAE, SCRATCH = "ultramim-fed", "ultramim-central", "mae-fed", "scratch"
# The ablations: UltraMIM without one of its three parts (variant, the part left out).
ABLATIONS: tuple[tuple[str, str], ...] = (("no-smat-fed", "SMAT"), ("no-mic-fed", "MIC"), ("no-tgm-fed", "TGM"))
BASELINE_PREFIX = "baseline-"    # + resnet18, handcrafted-lr, unet: models without a ViT encoder
VARIANT_ORDER: tuple[str, ...] = (FEDERATED, CENTRAL, PLAIN_MAE, *(a for a, _ in ABLATIONS), SCRATCH,
                                  "baseline-resnet18", "baseline-handcrafted-lr", "baseline-unet")

# Tasks: the fine-tuning tasks, the pretraining step, and "all" for a whole GPU job that did not run.
TASKS: tuple[str, ...] = ("busi-cls", "busi-seg", "ddti-seg", "hc18-seg")
PRETRAIN_TASK = "pretrain"
JOB_TASK = "all"
# The reported (and model-selection) metric of each kind of task.
PRIMARY_METRIC: dict[str, str] = {"cls": "auroc", "seg": "dice"}

# A result's status, and the MLflow run status it ends with (a failed result is a FAILED run).
STATUSES: tuple[str, ...] = ("ok", "failed", "skipped")
RUN_STATUS: dict[str, str] = {"ok": "FINISHED", "failed": "FAILED", "skipped": "KILLED"}


def task_kind(task: str) -> str:
    """``cls`` for a diagnosis task (``*-cls``), ``seg`` for every other (segmentation)."""
    return "cls" if task.endswith("-cls") else "seg"


def primary_metric(task: str) -> str:
    """Macro AUROC for diagnosis, mean per-image Dice for segmentation."""
    return PRIMARY_METRIC[task_kind(task)]


def is_baseline(variant: str) -> bool:
    """A from-scratch CNN or hand-crafted model (no ViT encoder, no pretraining)."""
    return variant.startswith(BASELINE_PREFIX)
