"""The dashboard's session: the API token typed once into a login form, then a signed cookie.

The cookie holds `v1.<expiry>.<nonce>.<signature>`, the signature an HMAC-SHA256 under a key
derived from the API token. Nothing is kept on the server, so every API process accepts the
cookie; changing the token ends every session; and nobody without the token can forge or extend
one. The cookie is HttpOnly (page scripts never see it) and SameSite=Strict (other sites' pages
cannot make the browser send it). On top of that, every state-changing form carries a CSRF token,
an HMAC of the session's nonce, which a forged request cannot know.
"""

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

#: the cookie that carries the session
SESSION_COOKIE = "carwash_session"
#: how long a login lasts
SESSION_SECONDS_DEFAULT = 12 * 3600
#: the form field (or, for scripts, the header) that carries the CSRF token
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
_VERSION = "v1"


@dataclass(frozen=True, slots=True)
class UiSession:
    nonce: str
    expires_at: int
    csrf_token: str


class SessionSigner:
    """Issues and checks session cookies and CSRF tokens for one API token."""

    def __init__(
        self,
        api_token: str,
        *,
        lifetime_seconds: int = SESSION_SECONDS_DEFAULT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._token = api_token.encode("utf-8")
        # a key of its own, so a signature never doubles as anything the token itself signs
        self._key = hmac.new(self._token, b"carwash-jobs dashboard session", hashlib.sha256).digest()
        self._lifetime = lifetime_seconds
        self._clock = clock

    @property
    def lifetime_seconds(self) -> int:
        return self._lifetime

    def token_matches(self, given: str) -> bool:
        """In constant time, so response timing does not reveal how much of a guess was right."""
        return hmac.compare_digest(given.strip().encode("utf-8"), self._token)

    def issue(self) -> tuple[str, UiSession]:
        """A new session: the cookie value, and the session it stands for."""
        expires_at = int(self._clock()) + self._lifetime
        nonce = secrets.token_hex(16)
        body = f"{_VERSION}.{expires_at}.{nonce}"
        return f"{body}.{self._sign(body)}", self._session(nonce, expires_at)

    def read(self, cookie: str | None) -> UiSession | None:
        """The session a cookie stands for; None when it is missing, forged or expired."""
        if not cookie:
            return None
        body, _, signature = cookie.rpartition(".")
        if not hmac.compare_digest(signature.encode("ascii", "replace"), self._sign(body).encode("ascii")):
            return None
        version, _, rest = body.partition(".")
        expires_text, _, nonce = rest.partition(".")
        if version != _VERSION or not expires_text.isdigit() or not nonce:
            return None
        expires_at = int(expires_text)
        if expires_at <= self._clock():
            return None
        return self._session(nonce, expires_at)

    def csrf_valid(self, session: UiSession, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(
            given.encode("ascii", "replace"), session.csrf_token.encode("ascii")
        )

    def _session(self, nonce: str, expires_at: int) -> UiSession:
        return UiSession(nonce, expires_at, self._sign(f"csrf.{nonce}"))

    def _sign(self, text: str) -> str:
        return hmac.new(self._key, text.encode("utf-8"), hashlib.sha256).hexdigest()
