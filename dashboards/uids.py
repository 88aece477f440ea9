"""Dashboard UIDs: the dashboards are saved under them and alert annotations link to them."""

from __future__ import annotations

from typing import Final

OVERVIEW: Final = "embedding-jobs-overview"
TENANT: Final = "embedding-jobs-tenant"
