"""Ray job entrypoint: the promote stage of a ModelPipeline manifest (gates, approval, aliases).

Submit it to a running Ray cluster (the manifest and work directory must be reachable from the
cluster; on Kubernetes the operator mounts a shared volume and sets these for a RayJob):

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/promote.py --manifest examples/quickstart.yaml --workdir /tmp/kubeforge

Every earlier stage of the same manifest must have finished in that work directory first. With
`promotion.approval`, the job waits until `kubeforge models approve <model> <version>` is run.
The last line it prints on stdout is JSON: {"stage": ..., "directory": ..., "mlflow_run_id": ...}.
"""

import sys

from kubeforge.entrypoint import main

if __name__ == "__main__":
    sys.exit(main("promote"))
