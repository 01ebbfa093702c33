"""The `ray job submit` entrypoint: train an EAGLE-3 draft against a pool of target replicas.

    python jobs/train_eagle3.py                                  # tiny default, local Ray
    python jobs/train_eagle3.py --config configs/llama3.1-8b-1node-8gpu.yaml training.max_steps=2000
    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \\
        python jobs/train_eagle3.py --config configs/llama3.1-8b-1node-8gpu.yaml
    python jobs/train_eagle3.py --help                           # every option with its default
"""

import sys

from eagle_ray.job.run import main

if __name__ == "__main__":
    sys.exit(main())
