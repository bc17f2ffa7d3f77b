"""8 fake CPU devices for every test, set before JAX loads so every sharding path runs on a laptop or CI."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

pytest_plugins = ["gcs_emulator"]  # `gcs` and `gcs_here`: a GCS API on 127.0.0.1
