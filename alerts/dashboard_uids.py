"""Dashboard UIDs: the dashboards are saved under them and alert annotations link to them.

Here rather than in dashboards/ because dashboards are built from the rules (dashboards import
alerts), so the rules can name the dashboards without importing them back.
"""

from __future__ import annotations

from typing import Final

OVERVIEW: Final = "embedding-jobs-overview"
TENANT: Final = "embedding-jobs-tenant"
