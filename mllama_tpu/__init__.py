"""mllama-tpu: run Llama-3.2-Vision (Mllama) on a Sophgo BM1684X.

export (mllama_tpu.export) -> compile (mllama_tpu.compile) -> engines (mllama_tpu.engines) -> chat.
"""
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
