#!/usr/bin/env bash
# Sets up what is missing, then runs the main job: the bundled tiny model exported, compiled
# to an int4 bmodel (cached after the first run) and answering questions about the sample
# images through the C++ engine (on the BM1684X simulator when there is no chip).
#   ./run_demo.sh                                   the tiny model on assets/samples
#   ./run_demo.sh -m NAME.bmodel -t TOKEN_CONFIG -i IMAGE [pipeline.py flags]   your model
#   ./run_demo.sh --serve [server.py flags]          the tiny model over the OpenAI API + chat page
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
"$ROOT/scripts/setup_env.sh"
exec "$ROOT/.venv/bin/python" -m mllama_tpu.demo "$@"
