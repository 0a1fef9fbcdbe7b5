"""UltraFed: federated UltraMIM pretraining of an ultrasound ViT encoder (the pure library).

Nothing in this package imports Prefect: ``tasks/`` wraps it, ``flows/`` composes it.
"""
__version__ = "0.1.0"
