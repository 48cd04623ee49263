"""The one reader of secrets: a value given inline, by environment variable or by file.

A file wins over a variable, a variable over an inline value, so a deployment can move a secret out of
the config file (into ``.env`` or a Docker/Kubernetes secret mounted as a file) without editing it.
Secrets are returned, never logged; errors name the setting and the file, never the value.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from pydantic import SecretStr


class SecretError(ValueError):
    """A secret file that cannot be read or is empty; the message names the setting and the file."""


def read_secret(*, value: SecretStr | str | None = None, env: str | None = None, file: str | os.PathLike | None = None,
                environ: Mapping[str, str] | None = None, what: str = "secret file") -> str | None:
    """The secret from ``file``, else the environment variable named ``env``, else ``value``; None when unset."""
    if file:
        try:
            text = Path(file).read_text().strip()
        except OSError as e:
            raise SecretError(f"{what}={file}: cannot read the file ({e.strerror or e})") from None
        if not text:
            raise SecretError(f"{what}={file}: the file is empty")
        return text
    if env:
        return ((os.environ if environ is None else environ).get(env) or "").strip() or None
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    return value


def secret_from_environ(var: str, environ: Mapping[str, str] | None = None) -> str | None:
    """``$VAR_FILE`` (a file that holds the secret) or else ``$VAR``: the convention of container secrets."""
    env = os.environ if environ is None else environ
    return read_secret(env=var, file=env.get(f"{var}_FILE"), environ=env, what=f"{var}_FILE")
