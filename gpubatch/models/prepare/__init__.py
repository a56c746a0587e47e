"""Preparing the model a run uses: quantization, sampling, the validation gate, batch-size tuning."""

from gpubatch.models.prepare.resolve import PreparedModel, prepare_model

__all__ = ["PreparedModel", "prepare_model"]
