"""Bearer tokens mapped to the tenants they may read; compared in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from jobs.model import validate_tenant_id

ALL_TENANTS = "*"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the tenants they may see, or every tenant (operators)."""

    tenants: frozenset[str]
    operator: bool = False

    def may_read(self, tenant_id: str) -> bool:
        """True when this caller may see tenant_id's jobs."""
        return self.operator or tenant_id in self.tenants


OPEN_ACCESS = Principal(tenants=frozenset(), operator=True)


class TokenAuth:
    """Checks `Authorization: Bearer TOKEN` headers against configured tokens."""

    def __init__(self, tokens: Mapping[str, Principal]) -> None:
        self._tokens = [(_token_bytes(token), principal) for token, principal in tokens.items()]

    @property
    def enabled(self) -> bool:
        """False when no tokens are configured: every caller is an operator (local use)."""
        return bool(self._tokens)

    @classmethod
    def parse(cls, spec: str) -> TokenAuth:
        """Parse 'TOKEN=tenant-a,tenant-b;OPS=*'; ValueError names the malformed entry."""
        tokens: dict[str, Principal] = {}
        for position, entry in enumerate(filter(None, (e.strip() for e in spec.split(";"))), start=1):
            token, sep, tenants = entry.partition("=")
            token = token.strip()
            if not sep or not token:
                raise ValueError(f"api token entry {position} must look like TOKEN=tenant-a,tenant-b or TOKEN=*")
            if len(token) < 16:
                raise ValueError(f"api token entry {position} is shorter than 16 characters")
            names = {t.strip() for t in tenants.split(",") if t.strip()}
            if not names:
                raise ValueError(f"api token entry {position} names no tenant (use * for all)")
            if ALL_TENANTS in names:
                tokens[token] = Principal(tenants=frozenset(), operator=True)
            else:
                for name in names:
                    validate_tenant_id(name)
                tokens[token] = Principal(tenants=frozenset(names))
        return cls(tokens)

    def authenticate(self, authorization: str | None) -> Principal | None:
        """The caller's principal, or None when the header carries no valid token."""
        if not self.enabled:
            return OPEN_ACCESS
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented:
            return None
        candidate = _token_bytes(presented.strip())
        found: Principal | None = None
        # Compare against every token so the time taken does not reveal which one matched.
        for token, principal in self._tokens:
            if hmac.compare_digest(candidate, token):
                found = principal
        return found


def check_bearer(expected: str, authorization: str | None) -> bool:
    """True when expected is empty (open) or the header carries exactly that bearer token."""
    if not expected:
        return True
    scheme, _, presented = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(_token_bytes(presented.strip()), _token_bytes(expected))


def _token_bytes(token: str) -> bytes:
    """A token as bytes for compare_digest, for any str at all.

    aiohttp decodes header bytes that are not UTF-8 to lone surrogates (surrogateescape), as
    os.environ does for settings; plain encode() raises on those, which made such a header a 500.
    surrogatepass encodes every str, and distinct strs to distinct bytes.
    """
    return token.encode("utf-8", "surrogatepass")
