"""Ray job entrypoint: the quantize stage of a ModelPipeline manifest.

Submit it to a running Ray cluster (the manifest and work directory must be reachable from the
cluster; on Kubernetes the operator mounts a shared volume and sets these for a RayJob):

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/quantize.py --manifest examples/quickstart.yaml --workdir /tmp/kubeforge

The data stage and the stage whose model it quantizes (finetune, else pretrain) must have finished
in that work directory first. llm-compressor schemes run in the quantize environment: on a laptop
`.venv-quantize` (built by `bash infra/local/install.sh quantize`), in a cluster `/opt/venv-quantize`
of the quantize image (infra/images/Dockerfile.quantize), or the interpreter KUBEFORGE_PYTHON_QUANTIZE names.
The last line it prints on stdout is JSON: {"stage": ..., "directory": ..., "mlflow_run_id": ...}.
"""

import sys

from kubeforge.entrypoint import main

if __name__ == "__main__":
    sys.exit(main("quantize"))
