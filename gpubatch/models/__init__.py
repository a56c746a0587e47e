"""Model backends behind one interface, found by name through a lazy registry."""

from gpubatch.models.base import BACKENDS, Model, backend_class, get_model, resolve_backend

__all__ = ["BACKENDS", "Model", "backend_class", "get_model", "resolve_backend"]
