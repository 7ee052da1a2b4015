"""Ray job entrypoint: one stage of a ModelPipeline manifest (any stage of `kubeforge.stages`).

Submit it to a running Ray cluster (the manifest and work directory must be reachable from the
cluster; on Kubernetes the operator mounts a shared volume and sets these for a RayJob):

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/stage.py data --manifest examples/quickstart.yaml --workdir /tmp/kubeforge
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/stage.py pretrain --manifest examples/quickstart.yaml --workdir /tmp/kubeforge

A stage needs the stages it reads to have finished in that work directory first (`kubeforge validate`
lists a manifest's stages in order). The last line it prints on stdout is JSON:
{"stage": ..., "directory": ..., "mlflow_run_id": ...}.
"""

import sys

from kubeforge.entrypoint import main

if __name__ == "__main__":
    sys.exit(main())
