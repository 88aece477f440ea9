"""podman for the image and pod tests: the project's containers.conf, the base image, the image build.

Every podman call goes through `Podman.run`, which points CONTAINERS_CONF at tests/podman/containers.conf
(the settings this kind of machine needs) instead of changing /etc. The base image stands in for
python:3.11-slim-bookworm, built from Debian packages by scripts/build-python-base, and is kept between
runs; the image itself is built from the repository's Dockerfile with only PYTHON_IMAGE changed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.components import missing
from tools.chart_sync import REPO

CONTAINERS_CONF = REPO / "tests" / "podman" / "containers.conf"
BUILD_BASE = REPO / "scripts" / "build-python-base"
BASE_IMAGE = "localhost/python:3.11-slim-bookworm"
# The label scripts/build-python-base puts on the base, and so on every image built from it.
BASE_LABEL = "org.embedding-jobs.base-recipe"
IMAGE_REPOSITORY = "localhost/embedding-jobs"
# Debian packages and the binaries they bring: podman itself, the runtime the containers.conf names,
# the pause binary `podman kube play` needs, and what bootstraps the base image.
TOOLS = {"podman": "podman", "runc": "runc", "catatonit": "catatonit", "mmdebstrap": "mmdebstrap"}
CATATONIT_PATHS = ("/usr/libexec/podman/catatonit", "/usr/bin/catatonit")
# Certificates a machine adds to its own trust store; none may end up in the image.
LOCAL_CA_DIR = Path("/usr/local/share/ca-certificates")
# Figures measured while the session's image fixture is set up (base and build times), for a test to report.
IMAGE_FIGURES = pytest.StashKey[list[str]]()


class PodmanError(RuntimeError):
    """A podman command that exited non-zero; the message holds its output."""


@dataclass(frozen=True)
class Podman:
    """The podman binary, always run with the project's containers.conf."""

    binary: str

    def run(
        self, *args: str, timeout: float = 120, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run podman with args; raise PodmanError on a non-zero exit when check is set."""
        env = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}
        result = subprocess.run(
            [self.binary, *args], capture_output=True, text=True, timeout=timeout, env=env, input=input, check=False
        )
        if check and result.returncode != 0:
            raise PodmanError(f"podman {' '.join(args)} exited {result.returncode}:\n{result.stdout}{result.stderr}")
        return result

    def inspect(self, kind: str, name: str) -> dict[str, Any]:
        """`podman KIND inspect NAME` as a dict (kind: image, container, pod)."""
        found = json.loads(self.run(kind, "inspect", name).stdout)
        return dict(found[0] if isinstance(found, list) else found)


def require_podman() -> Podman:
    """podman and the tools the tests need, working; else skip locally and fail under CI=true."""
    absent = [package for tool, package in TOOLS.items() if not _found(tool)]
    if absent:
        missing(
            f"{', '.join(absent)} not installed (scripts/install-test-deps installs them: "
            f"apt-get install --no-install-recommends {' '.join(absent)})"
        )
    if os.geteuid() != 0:
        missing("the image and pod tests run podman as root (the bootstrap of the base image needs it)")
    podman = Podman(str(shutil.which("podman")))
    info = podman.run("info", "--format", "{{.Host.OCIRuntime.Name}}", check=False)
    if info.returncode != 0:
        missing(f"podman does not work here: {info.stderr.strip()[-500:]}")
    return podman


def _found(tool: str) -> bool:
    if shutil.which(tool):
        return True
    return tool == "catatonit" and any(Path(path).is_file() for path in CATATONIT_PATHS)


def ensure_base(podman: Podman) -> float:
    """Build the base image unless this recipe's one is present; return the seconds it took."""
    started = time.monotonic()
    env = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}
    result = subprocess.run(
        [str(BUILD_BASE), BASE_IMAGE], capture_output=True, text=True, timeout=900, env=env, check=False
    )
    if result.returncode != 0:
        raise PodmanError(f"{BUILD_BASE.name} exited {result.returncode}:\n{result.stdout}{result.stderr}")
    return time.monotonic() - started


def build_image(podman: Podman, tag: str, context: Path = REPO) -> subprocess.CompletedProcess[str]:
    """Build the Dockerfile in context as tag, on the Debian-built base.

    pip in the build stage reaches the package index through the host's network and trusts the host's
    certificates for it: both are mounted for the RUN steps only, never copied into a layer.
    """
    return podman.run(
        "build",
        "--network",
        "host",
        "--volume",
        "/etc/ssl/certs:/etc/ssl/certs:ro",
        "--build-arg",
        f"PYTHON_IMAGE={BASE_IMAGE}",
        "--tag",
        tag,
        "--file",
        str(context / "Dockerfile"),
        str(context),
        timeout=900,
    )


def keep_cache_and_prune(podman: Podman, tag: str) -> None:
    """Tag the last build's two stages as the cache the next run starts from; remove every other leftover.

    Untagged images of earlier builds (each source change leaves a few) would otherwise pile up run after
    run; only images built on the Debian-built base (they carry its label) are pruned.
    """
    podman.run("tag", tag, f"{IMAGE_REPOSITORY}:cache")
    # The dependency layer lives in the build stage, which no tagged image descends from: tag it too.
    podman.run(
        "build", "--quiet", "--network", "none", "--target", "build", "--build-arg", f"PYTHON_IMAGE={BASE_IMAGE}",
        "--tag", f"{IMAGE_REPOSITORY}:build-cache", str(REPO), timeout=300, check=False,
    )  # fmt: skip
    podman.run("rmi", "--force", tag, check=False)
    podman.run("image", "prune", "--force", "--filter", f"label={BASE_LABEL}", check=False, timeout=300)


def local_certificates() -> dict[str, str]:
    """File name -> base64 body of every certificate the host added to its own trust store."""
    bodies: dict[str, str] = {}
    for path in sorted(LOCAL_CA_DIR.glob("*.crt")) if LOCAL_CA_DIR.is_dir() else []:
        text = path.read_text(errors="replace")
        for index, block in enumerate(text.split("-----BEGIN CERTIFICATE-----")[1:]):
            body = "".join(block.split("-----END CERTIFICATE-----")[0].split())
            bodies[f"{path.name}#{index}"] = body
    return bodies
