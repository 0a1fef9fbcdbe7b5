"""Sub-commands of ``ultrafed``; each module has ``add_parser(subparsers)`` and sets ``func``.

Heavy imports (torch, Prefect, MLflow) stay inside the handlers so ``ultrafed --help`` is fast.
"""
