from openrlaif.models.registry import SHORT_NAMES, resolve_model_path

__all__ = ["SHORT_NAMES", "resolve_model_path"]
