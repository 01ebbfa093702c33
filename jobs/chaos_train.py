"""Chaos training, bounded (a few minutes on 2 cores): replicas and a draft worker are killed during a
run; the sample log must show every sample reached the trainer exactly once. Exits 1 if not.

    python jobs/chaos_train.py                      # 2 SGLang TP-2 replicas, 3 replica faults, 1 worker kill
    python jobs/chaos_train.py --help
"""

import sys

from eagle_ray.job.chaos import main

if __name__ == "__main__":
    sys.exit(main())
