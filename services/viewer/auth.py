"""Who may look and who may acknowledge: a read-only token and an operator token.

Tokens come from the environment (``PLANTSIGHT_VIEWER_TOKEN``, ``PLANTSIGHT_VIEWER_OPERATOR_TOKEN``) or
from files named by the same variables with ``_FILE`` (Docker/Kubernetes secrets). The API takes
``Authorization: Bearer <token>``; the page a login form or a ``?token=`` link, which sets an HTTP-only,
SameSite=Strict cookie. The cookie holds an HMAC of the token, never the token, so a browser's cookie
store does not hold the secret and rotating a token logs everyone out. Comparisons are constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from http.cookies import CookieError, SimpleCookie

from shared.secret import SecretError, secret_from_environ

READ, OPERATOR = "read", "operator"
COOKIE = "plantsight_session"
ENV = {READ: "PLANTSIGHT_VIEWER_TOKEN", OPERATOR: "PLANTSIGHT_VIEWER_OPERATOR_TOKEN"}


class TokenError(RuntimeError):
    """The viewer has no usable token: it refuses to start rather than serve cameras to anyone."""


def _token(var: str, environ: Mapping[str, str]) -> str | None:
    try:
        return secret_from_environ(var, environ)
    except SecretError as e:
        raise TokenError(str(e)) from None


class Tokens:
    def __init__(self, environ: Mapping[str, str] | None = None):
        env = os.environ if environ is None else environ
        self.tokens = {role: _token(var, env) for role, var in ENV.items()}
        if not any(self.tokens.values()):
            raise TokenError("the viewer needs a token: set PLANTSIGHT_VIEWER_TOKEN (read-only) and/or "
                             "PLANTSIGHT_VIEWER_OPERATOR_TOKEN (may acknowledge), or the same names with _FILE")
        for role, tok in self.tokens.items():
            if tok is not None and len(tok) < 16:
                raise TokenError(f"{ENV[role]} is shorter than 16 characters; use a long random token "
                                 "(e.g. `openssl rand -hex 24`)")

    def role_of_token(self, token: str | None) -> str | None:
        """OPERATOR, READ or None; the operator token also reads."""
        if not token:
            return None
        found = None
        for role in (OPERATOR, READ):  # check both, so timing does not say which one matched
            tok = self.tokens[role]
            if tok is not None and hmac.compare_digest(token.encode(), tok.encode()):
                found = found or role
        return found

    @staticmethod
    def _session(token: str) -> str:
        return hmac.new(token.encode(), b"plantsight-viewer-session", hashlib.sha256).hexdigest()

    def session_for(self, token: str) -> str:
        return self._session(token)

    def role_of_session(self, value: str | None) -> str | None:
        if not value:
            return None
        found = None
        for role in (OPERATOR, READ):
            tok = self.tokens[role]
            if tok is not None and hmac.compare_digest(value.encode(), self._session(tok).encode()):
                found = found or role
        return found

    def role(self, headers: Mapping[str, str]) -> tuple[str | None, str]:
        """(role, how): from a Bearer header first, else the session cookie."""
        auth = headers.get("Authorization") or ""
        if auth.lower().startswith("bearer "):
            return self.role_of_token(auth[7:].strip()), "bearer"
        cookie = headers.get("Cookie")
        if cookie:
            try:
                jar = SimpleCookie(cookie)
            except CookieError:
                return None, "cookie"
            if COOKIE in jar:
                return self.role_of_session(jar[COOKIE].value), "cookie"
        return None, ""

    def cookie_header(self, token: str, secure: bool = False) -> str:
        flags = "; Secure" if secure else ""
        return f"{COOKIE}={self.session_for(token)}; Path=/; HttpOnly; SameSite=Strict; Max-Age=43200{flags}"


LOGOUT_COOKIE = f"{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"
