"""Secrets and TLS contexts for the broker and the cloud."""

from __future__ import annotations

import logging
import os
import ssl
from pathlib import Path

from pydantic import SecretStr

from agent.config.settings import token_problem
from agent.core.ratelimit import RateLimitedLog

log = logging.getLogger(__name__)


class TokenSource:
    """The cloud bearer token; a token file is re-read when it changes (rotation, no restart).

    A token is checked when read: a UTF-8 BOM and surrounding whitespace are stripped, and a
    token that cannot be an HTTP header value is refused. Then the last good token stays in use
    and `problem` says what is wrong (shown in /readyz; logged, rate-limited) until a good one
    comes. The rule is agent/config/settings.py's `token_problem`, which refuses a bad inline token
    when the config is loaded."""

    def __init__(self, inline: SecretStr | None, path: Path | None) -> None:
        self._path = path
        self._stamp: tuple[float, int] | None = None
        self._token: str | None = None
        self._warn = RateLimitedLog(log, interval_s=60.0)
        self.problem: str | None = None
        self._inline: str | None = None
        if inline is not None:
            token = inline.get_secret_value().strip()
            why = token_problem(token)
            if why is None:
                self._inline = token
            else:
                self.problem = f"forward.token {why}; sending without a token"
                log.warning("%s", self.problem)

    def __call__(self) -> str | None:
        if self._inline is not None or self._path is None:
            return self._inline
        try:
            st = os.stat(self._path)
        except OSError as e:
            self._stamp = None  # read it again once it is back, even unchanged
            self._refuse(f"cannot read the cloud token file {self._path}: {e.strerror}")
            return self._token
        stamp = (st.st_mtime, st.st_size)
        if stamp != self._stamp:
            self._stamp = stamp
            self._read(self._path)
        return self._token

    def _read(self, path: Path) -> None:
        try:
            # utf-8-sig: a BOM (Windows editors) is not part of the token.
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except OSError as e:
            self._stamp = None
            self._refuse(f"cannot read the cloud token file {path}: {e.strerror}")
            return
        except UnicodeDecodeError:
            self._refuse(f"the cloud token file {path} is not UTF-8 text")
            return
        token = lines[0].strip() if lines else ""
        why = token_problem(token)
        if why is not None:
            self._refuse(f"the cloud token in {path} {why}")
            return
        if self._token is not None and token != self._token:
            log.info("cloud token file %s changed: using the new token", path)
        if self.problem is not None:
            log.info("cloud token file %s is good again", path)
        self._token, self.problem = token, None

    def _refuse(self, problem: str) -> None:
        self.problem = problem + (
            "; keeping the previous token" if self._token else "; sending without a token"
        )
        # Keyed by the problem: a new problem is logged at once, a repeated one once a minute.
        self._warn.warning(self.problem, "%s", self.problem)


def client_tls_context(
    *, ca_file: Path | None, cert_file: Path | None, key_file: Path | None
) -> ssl.SSLContext:
    """TLS >= 1.2 with certificate and hostname verification (the CA file, else the system
    store), and a client certificate for mTLS when given."""
    ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None and key_file is not None:
        ctx.load_cert_chain(str(cert_file), str(key_file))
    return ctx
