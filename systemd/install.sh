#!/usr/bin/env bash
# Install edge-agent as a systemd service:  sudo systemd/install.sh
#   creates the edge-agent user, a virtualenv in /opt/edge-agent (dependencies from
#   requirements.lock, hashes checked), /etc/edge-agent with an example config and empty
#   credential files (kept if present), the unit, and prints next steps.
# A gateway without internet, or a fleet: use the Debian package instead (make deb; README).
# Uninstall (keeps /var/lib/edge-agent and /etc/edge-agent):  sudo systemd/install.sh --uninstall
# Options for packaging and tests: --root DIR (install under DIR), --no-user, --no-systemctl.
set -euo pipefail

root="" ; make_user=1 ; use_systemctl=1 ; action=install
while [ $# -gt 0 ]; do
    case "$1" in
        --root) root="$2"; shift 2 ;;
        --no-user) make_user=0; shift ;;
        --no-systemctl) use_systemctl=0; shift ;;
        --uninstall) action=uninstall; shift ;;
        *) echo "unknown option: $1" >&2; exit 2 ;;
    esac
done
src="$(cd "$(dirname "$0")/.." && pwd)"
prefix="$root/opt/edge-agent"
etc="$root/etc/edge-agent"
unit_dir="$root/etc/systemd/system"
have_systemd() { [ "$use_systemctl" = 1 ] && [ -d /run/systemd/system ]; }

if [ "$action" = uninstall ]; then
    if have_systemd; then systemctl disable --now edge-agent.service || true; fi
    rm -f "$unit_dir/edge-agent.service"
    rm -rf "$prefix"
    if have_systemd; then systemctl daemon-reload; fi
    echo "edge-agent removed; kept $etc (config, credentials) and $root/var/lib/edge-agent (outbox)"
    exit 0
fi

if [ -z "$root" ] && dpkg-query -W -f='${db:Status-Status}' edge-agent 2>/dev/null | grep -qx installed; then
    echo "the edge-agent Debian package is installed; upgrade it with a newer package," \
         "or remove it (dpkg --remove edge-agent) before using this script" >&2
    exit 1
fi
python="$("$src/packaging/check-python.sh" "${PYTHON:-python3}")"

if [ "$make_user" = 1 ] && ! id edge-agent >/dev/null 2>&1; then
    useradd --system --home-dir /var/lib/edge-agent --no-create-home \
        --shell /usr/sbin/nologin edge-agent
fi
group=$([ "$make_user" = 1 ] && echo edge-agent || id -gn)

# Earlier versions of this script put the virtualenv in /opt/edge-agent/venv; the unit now
# runs /opt/edge-agent/bin/edge-agent, as in the Debian package.
rm -rf "$prefix/venv"
mkdir -p "$prefix"
"$python" -m venv "$prefix"
"$prefix/bin/pip" install -q --upgrade pip
"$prefix/bin/pip" install -q --require-hashes -r "$src/requirements.lock"
# Build from a clean copy of the sources, stamped with the commit: a stale build/ left in a
# checkout would otherwise end up in the installed package.
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
cp -r "$src/pyproject.toml" "$src/README.md" "$src/agent" "$stage/"
rm -f "$stage/agent/_build.py"
PYTHONPATH="$src" "$python" -m agent.core.buildinfo --stamp "$stage" >/dev/null
"$prefix/bin/pip" install -q --no-cache-dir --no-deps "$stage"
install -m 0644 "$src/README.md" "$prefix/README.md"
install -d -m 0755 "$prefix/docs"
install -m 0644 "$src/docs/operating.md" "$src/docs/reference.md" "$src/docs/design.md" "$prefix/docs/"

install -d -m 0750 -g "$group" "$etc"
if [ ! -f "$etc/config.toml" ]; then
    install -m 0640 -g "$group" "$src/config.example.toml" "$etc/config.toml"
    echo "wrote $etc/config.toml from the example: set gateway_id, [mqtt] and [forward]"
else
    echo "kept the existing $etc/config.toml"
fi
for cred in cloud-token mqtt-password; do
    [ -f "$etc/$cred" ] || install -m 0640 -g "$group" /dev/null "$etc/$cred"
done
# The outbox's directory (systemd's StateDirectory= makes it too, but check-config runs first).
install -d -m 0750 -o "$([ "$make_user" = 1 ] && echo edge-agent || id -un)" -g "$group" \
    "$root/var/lib/edge-agent"

install -d "$unit_dir"
install -m 0644 "$src/systemd/edge-agent.service" "$unit_dir/edge-agent.service"
if have_systemd; then systemctl daemon-reload; fi

cat <<EOT
$("$prefix/bin/edge-agent" --version) installed in $prefix.
Next steps:
  1. edit $etc/config.toml (gateway_id, [mqtt], [forward].url); put the cloud token in
     $etc/cloud-token and the broker password, if any, in $etc/mqtt-password
  2. $prefix/bin/edge-agent check-config --connect --config $etc/config.toml
  3. systemctl enable --now edge-agent
  4. $prefix/bin/edge-agent status      (or: journalctl -u edge-agent -f)
EOT
