"""`helm test`: the release's Service answers /readyz and serves the exporter's metrics.

Run by the test pod as `python -c` with the chart's own image, so it uses the standard library only.
EMBEDDING_JOBS_TEST_URL is the Service's base URL; EMBEDDING_JOBS_METRICS_TOKEN, when set, is sent to /metrics.
"""

import os
import sys
import time
import urllib.error
import urllib.request

BASE = os.environ["EMBEDDING_JOBS_TEST_URL"].rstrip("/")
TOKEN = os.environ.get("EMBEDDING_JOBS_METRICS_TOKEN", "")
# `helm test` often runs right after an install: give a pod that is still starting some time.
DEADLINE = time.monotonic() + float(os.environ.get("EMBEDDING_JOBS_TEST_WAIT", "60"))


def get(path, headers):
    request = urllib.request.Request(BASE + path, headers=headers)  # noqa: S310 (the release's own URL)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 (the release's own URL)
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")
    except OSError as exc:
        return 0, str(exc)


def check():
    problems = []
    status, body = get("/readyz", {})
    if status != 200:
        problems.append(f"GET {BASE}/readyz answered {status or 'nothing'}: {body[:300]}")
    status, body = get("/metrics", {"Authorization": f"Bearer {TOKEN}"} if TOKEN else {})
    if status != 200:
        problems.append(f"GET {BASE}/metrics answered {status or 'nothing'}: {body[:300]}")
    elif "# TYPE embedding_" not in body:
        problems.append(f"GET {BASE}/metrics has no embedding_* metric family")
    return problems


problems = check()
while problems and time.monotonic() < DEADLINE:
    time.sleep(2)
    problems = check()
for problem in problems:
    print(f"FAIL {problem}", file=sys.stderr)
if not problems:
    print(f"ok: {BASE}/readyz is ready and {BASE}/metrics serves the exporter's metrics")
sys.exit(1 if problems else 0)
