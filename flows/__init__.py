"""Prefect flows: wiring only (the pipeline, pretraining, the registry, the scheduled deployments)."""
