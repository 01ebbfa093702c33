"""The pool's start-up and replica lifecycle under faults: min_replicas, failed starts (backoff, node avoidance),
parallel shutdown, on a simulated multi-node Ray cluster (`ray.cluster_utils.Cluster`, fake GPUs)."""

from __future__ import annotations

import pytest

from eagle_ray.job.config import ConfigError, load_job_config
from eagle_ray.pool import PooledTargetModel


@pytest.mark.parametrize("replicas,min_replicas", [(2, 0), (2, 3), (0, 2)])
def test_min_replicas_out_of_range_is_refused_before_anything_starts(replicas, min_replicas):
    with pytest.raises(ValueError, match=rf"min_replicas must be in \[1, replicas={replicas}\], got {min_replicas}"):
        PooledTargetModel("/nonexistent", engine="hf", replicas=replicas, min_replicas=min_replicas)
    with pytest.raises(ConfigError, match="target.min_replicas: out of range"):
        load_job_config(overrides=[f"target.replicas={replicas}", f"target.min_replicas={min_replicas}"])
