"""Run as a process (or one of two): prints sha256 digests of the global batches of steps START..20 as JSON.

Used by tests/test_data.py to check that 1 process x 8 devices, 2 processes x 4 devices and a run resumed at step 10
read byte-identical global batches. Usage: python batch_digests.py NUM_PROCESSES PROCESS_ID PORT START OUT_JSON
"""

import hashlib
import json
import os
import sys

num_processes, process_id, port, start, out = (
    int(sys.argv[1]),
    int(sys.argv[2]),
    sys.argv[3],
    int(sys.argv[4]),
    sys.argv[5],
)
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 // num_processes}"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402

if num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id)

from helpers import fashion_config  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from igpt_jax import sharding  # noqa: E402
from igpt_jax.data import get_source, pipeline  # noqa: E402

config = fashion_config(image_size=8)
mesh = sharding.make_mesh(config)
source = get_source(config)
prefetch = pipeline.Prefetcher(lambda s: pipeline.global_batch(source, "train", config, s, mesh), start)
digests = {}
for step in range(start, 21):
    images = prefetch.get(step)["images"]
    full = multihost_utils.process_allgather(images, tiled=True)
    digests[step] = hashlib.sha256(full.tobytes()).hexdigest()
prefetch.close()
if jax.process_index() == 0:
    with open(out, "w") as f:
        json.dump({"devices": jax.device_count(), "processes": jax.process_count(), "digests": digests}, f)
