"""Dump the training job's supervision to disk, to train drafts later without a live pool.

Same config, same data, same target as `jobs/train_eagle3.py` (it is that job with
`offline.mode=dump`); train from the dump with the same config plus `offline.mode=from_dump`:

    python jobs/dump_supervision.py --config configs/llama3.1-8b-1node-8gpu.yaml offline.dir=/data/sup
    python jobs/train_eagle3.py --config configs/llama3.1-8b-1node-8gpu.yaml offline.mode=from_dump \\
        offline.dir=/data/sup

It dumps the batches training would consume (`training.max_steps` x `training.num_workers`), one
safetensors file per batch plus a manifest. Rerun the same command after a crash: finished
batches are verified and skipped, the rest dumped; nothing is written twice.
"""

import sys

from eagle_ray.job.dump import main

if __name__ == "__main__":
    sys.exit(main())
