"""igpt_jax: Image GPT (Chen et al., "Generative Pretraining from Pixels", 2020) in JAX/Flax NNX."""

import os

# gs:// paths through gcsfs for every etils.epath user in this process (ours, Orbax's, TFDS's): one client that
# works on pods and against a local GCS emulator alike. See igpt_jax/workdir/storage.py. An explicit setting wins.
os.environ.setdefault("EPATH_USE_TF", "false")

__version__ = "0.1.0"
