"""Data: image reading, site folders, the synthetic cohort, manifests and quality checks."""
