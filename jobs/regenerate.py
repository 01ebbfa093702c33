"""The `ray job submit` entrypoint of `eagle-ray regenerate`: chat data rewritten with the target's own answers.

    python jobs/regenerate.py --out regen.jsonl                     # ShareGPT on the train job's tiny target
    python jobs/regenerate.py --target /ckpt --replicas 8 --data chats.jsonl --out regen.jsonl
    python jobs/regenerate.py --help

It runs `eagle_ray.job.regenerate.main`, as `eagle-ray regenerate` does.
"""

import sys

from eagle_ray.job.regenerate import main

if __name__ == "__main__":
    sys.exit(main())
