"""The model work of csplatform, and nothing of Django: the prompt renderer, model loading,
fine-tuning, GGUF export, evaluation metrics and the inference engines.

Usable from a plain script; the Django apps call it, it never calls them (an import-linter
contract in `make test` checks that).
"""
