"""Export a Mllama checkpoint to static-shape ONNX pieces + manifest.json + token_config/."""
from mllama_tpu.export.driver import export_model

__all__ = ["export_model"]
