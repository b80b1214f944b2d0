"""Integrations with model libraries. Each lives in its own subpackage and is imported on demand:
`ism_ext.integrations.hf` (transformers) registers the ``"ism"`` attention when imported."""
