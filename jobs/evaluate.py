"""The `ray job submit` entrypoint of `eagle-ray evaluate`: a draft export's measured acceptance on a target.

    python jobs/evaluate.py --draft ~/eagle_ray_runs/eagle3-tiny/draft      # the train job's default run and target
    python jobs/evaluate.py --draft DIR --target /ckpt --matrix --prompts 64 --json eval.json
    python jobs/evaluate.py --help

It runs `eagle_ray.job.evaluate.main`, as `eagle-ray evaluate` does.
"""

import sys

from eagle_ray.job.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
