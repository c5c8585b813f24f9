#!/bin/sh
# Usage: packaging/check-python.sh PYTHON
# Exits 0 and prints the interpreter's real path if edge-agent supports it, else says why and
# exits 1. Every install path (make venv, systemd/install.sh, make deb) runs it first, so an
# unsupported interpreter fails here with one clear line rather than halfway through an install.
# Supported: CPython 3.11 (Debian 12) and 3.12 (Ubuntu 24.04). 3.10 (Ubuntu 22.04) is not: the
# code relies on asyncio.TaskGroup / asyncio.timeout, tomllib and typing.Self (docs/operating.md, "Python").
set -eu
python="${1:-python3}"
if ! command -v "$python" >/dev/null 2>&1; then
    echo "edge-agent: no Python interpreter '$python' here; install python3.11 or python3.12" >&2
    exit 1
fi
ver="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
case "$ver" in
    3.11|3.12) ;;
    *)
        hint=""
        [ "$ver" = 3.10 ] && hint=" (Ubuntu 22.04: apt-get install python3.11 python3.11-venv and use python3.11)"
        echo "edge-agent: $python is Python $ver; edge-agent needs Python 3.11 or 3.12$hint" >&2
        exit 1 ;;
esac
"$python" -c 'import os, sys; print(os.path.realpath(sys.executable))'
