"""Secrets and TLS contexts for the broker and the cloud."""

from __future__ import annotations

import logging
import os
import ssl
from pathlib import Path

from pydantic import SecretStr

log = logging.getLogger(__name__)


class TokenSource:
    """The cloud bearer token; a token file is re-read when it changes (rotation, no restart)."""

    def __init__(self, inline: SecretStr | None, path: Path | None) -> None:
        self._inline = inline.get_secret_value() if inline is not None else None
        self._path = path
        self._stamp: tuple[float, int] | None = None
        self._token: str | None = None

    def __call__(self) -> str | None:
        if self._inline is not None:
            return self._inline
        if self._path is None:
            return None
        try:
            st = os.stat(self._path)
        except OSError as e:
            log.warning("cannot read the cloud token file %s: %s", self._path, e.strerror)
            return self._token
        stamp = (st.st_mtime, st.st_size)
        if stamp != self._stamp:
            lines = self._path.read_text(encoding="utf-8").splitlines()
            token = lines[0].strip() if lines else ""
            if self._stamp is not None and token != self._token:
                log.info("cloud token file %s changed: using the new token", self._path)
            self._stamp, self._token = stamp, token or None
        return self._token


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
