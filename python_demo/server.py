"""Serve a model over the OpenAI Chat Completions API, with a chat page at /.

    python python_demo/server.py -m llama3.2-11b-vision_int4_512seq.bmodel [--port 8000] [--api_key KEY]
    python python_demo/server.py --backend onnx -m build/onnx-dir --devid 0,1

Binds 127.0.0.1 unless --host says otherwise; the key may also come from MLLAMA_API_KEY.
The logic lives in mllama_tpu/serve/ (see its __init__).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

if __name__ == "__main__":
    # Before the heavy imports: on the simulator this process restarts once with its yield preload.
    from mllama_tpu.cmodel_yield import exec_with_preload

    exec_with_preload([str(Path(__file__).resolve()), *sys.argv[1:]])

from mllama_tpu.errors import cli_main  # noqa: E402
from mllama_tpu.serve.cli import main  # noqa: E402

if __name__ == "__main__":
    cli_main(main)
