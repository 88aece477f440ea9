"""The container image, built for real with podman from the repository's Dockerfile and run.

The base stands in for python:3.11-slim-bookworm (scripts/build-python-base, from Debian packages) and
is kept between runs; the Dockerfile is used as it is, with only PYTHON_IMAGE pointing at that base.
The figures (base and build time, image size) are reported in the test summary.
"""

from __future__ import annotations

import base64
import shutil
import time
import tomllib
import uuid
from pathlib import Path

import pytest
import yaml

from tests.components import wait_for
from tests.podman_tools import IMAGE_FIGURES, IMAGE_REPOSITORY, Podman, build_image, local_certificates
from tools.chart_sync import CHART, REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
UID = 10001
HEARTBEAT = "/tmp/worker-heartbeat"


def report(request: pytest.FixtureRequest, figure: str) -> None:
    """Add a figure to the test's properties (and so to the summary line conftest prints)."""
    request.node.user_properties.append(("figure", figure))


def test_image_runs_as_a_numeric_non_root_user_and_is_labelled_with_version_and_source(
    podman: Podman, image: str, request: pytest.FixtureRequest
) -> None:
    for figure in request.config.stash.get(IMAGE_FIGURES, []):
        report(request, figure)
    inspected = podman.inspect("image", image)
    size = int(inspected["Size"])
    report(request, f"image size {size / 1e6:.0f} MB")
    assert inspected["Config"]["User"] == f"{UID}:{UID}"
    ids = podman.run("run", "--rm", "--network", "none", "--entrypoint", "id", image, "-u").stdout.split()
    assert ids == [str(UID)]
    labels = inspected["Config"]["Labels"]
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert labels["org.opencontainers.image.version"] == version
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert labels["org.opencontainers.image.source"] == chart["sources"][0]
    # The size budget: the slim base (about 180 MB from Debian packages) plus the venv.
    assert size < 400e6, f"image is {size / 1e6:.0f} MB"


@pytest.mark.parametrize("command", ["worker", "exporter"])
def test_both_entry_points_start_on_a_read_only_root_and_stop_cleanly_on_sigterm(
    podman: Podman, image: str, command: str
) -> None:
    # Writable: only /tmp and the data folder, as the chart mounts them.
    name = f"ej-{command}-{uuid.uuid4().hex[:8]}"
    podman.run(
        "run", "--detach", "--name", name, "--read-only", "--network", "none",
        "--tmpfs", "/tmp", "--volume", "/var/lib/embedding-jobs",
        "--env", f"EMBEDDING_JOBS_HEARTBEAT_FILE={HEARTBEAT}",
        image, command,
    )  # fmt: skip
    try:
        if command == "worker":
            probe = ["python", "-m", "worker.heartbeat", "--max-age", "60", HEARTBEAT]
        else:
            probe = ["python", "-c", "import urllib.request as r; r.urlopen('http://127.0.0.1:8080/readyz', timeout=2)"]
        wait_for(
            lambda: podman.run("exec", name, *probe, check=False).returncode == 0,
            timeout=60,
            what=f"the {command}'s health check inside the container",
            interval=0.5,
        )
        written = podman.run("exec", name, "touch", "/opt/venv/written", check=False)
        assert written.returncode != 0
        assert "Read-only file system" in written.stderr
        assert podman.run("exec", name, "id", "-u").stdout.strip() == str(UID)
        podman.run("stop", "--time", "30", name)
        state = podman.inspect("container", name)["State"]
        assert state["ExitCode"] == 0, podman.run("logs", name).stderr[-2000:]
    finally:
        podman.run("rm", "--force", "--volumes", name, check=False)


def test_image_holds_none_of_the_host_s_own_certificates(podman: Podman, image: str) -> None:
    # The build trusts them to reach the package index; they must stay out of every layer.
    certificates = local_certificates()
    needles: dict[str, list[bytes]] = {}
    for name, body in certificates.items():
        der = base64.b64decode(body)
        # A full PEM line and a stretch of the DER bytes, from the middle (the start is common to all).
        needles[name] = [body[128:192].encode(), der[len(der) // 2 : len(der) // 2 + 48]]
    root = Path(podman.run("image", "mount", image).stdout.strip())
    try:
        scanned = 0
        for path in root.rglob("*"):
            if path.is_symlink() or not path.is_file() or path.stat().st_size > 64_000_000:
                continue
            data = path.read_bytes()
            scanned += 1
            for name, patterns in needles.items():
                assert not any(pattern in data for pattern in patterns), f"{name} is in {path.relative_to(root)}"
        assert scanned > 1000, f"only {scanned} files under {root}"
        assert (root / "etc/ssl/certs/ca-certificates.crt").is_file()
    finally:
        podman.run("image", "unmount", image, check=False)


def test_a_source_change_rebuilds_on_the_cached_dependency_layer(
    podman: Podman, image: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    context = tmp_path / "context"
    for name in ("Dockerfile", ".dockerignore", "requirements.lock", "pyproject.toml", "README.md"):
        (context / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, context / name)
    for package in ("jobs", "worker", "exporter", "embedding_jobs"):
        shutil.copytree(REPO / package, context / package, ignore=shutil.ignore_patterns("__pycache__"))
    with (context / "jobs" / "__init__.py").open("a") as module:
        # Unique, so that no earlier run's layer matches it.
        module.write(f"# a change to the source: {uuid.uuid4().hex}\n")
    tag = f"{IMAGE_REPOSITORY}:test-{uuid.uuid4().hex[:12]}"
    started = time.monotonic()
    try:
        output = build_image(podman, tag, context).stdout
        report(request, f"rebuild after a source change {time.monotonic() - started:.0f}s")
        steps = output.split("STEP ")
        install = next(step for step in steps if "--require-hashes" in step)
        assert "Using cache" in install, install
        wheel = next(step for step in steps if "pip wheel" in step)
        assert "Using cache" not in wheel, "the source change did not reach the build"
    finally:
        podman.run("rmi", "--force", tag, check=False)
