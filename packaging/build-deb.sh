#!/usr/bin/env bash
# Build the Debian package:  make deb   (= packaging/build-deb.sh)
#
# The package carries its own virtualenv in /opt/edge-agent, built here from the wheels pinned
# (with hashes) in requirements.lock, so installing it needs no network. A virtualenv links to
# the interpreter it was made with, so build on the distribution you ship to, with its own
# python3 (default /usr/bin/python3): the package then Depends on that exact pythonX.Y.
#
# Environment: PYTHON (the target interpreter, /usr/bin/python3), OUT (dist/), WHEEL_CACHE
# (build/wheels-<python>-<arch>: wheels downloaded once, reused offline), DEB_VERSION (default
# <version>+git<commits>.g<commit>), MAINTAINER. Prints the path of the .deb on its last line.
#
# Needs on the build machine: dpkg-deb, the interpreter's venv module (python3-venv), git, and
# the network on the first build (PyPI, to fill the wheel cache).
set -euo pipefail

src="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-/usr/bin/python3}"
out="${OUT:-$src/dist}"
maintainer="${MAINTAINER:-edge-agent maintainers <edge-agent@example.com>}"
prefix=/opt/edge-agent

die() { echo "build-deb: $*" >&2; exit 1; }

py="$("$src/packaging/check-python.sh" "$python")" || exit 1
case "$py" in
    /usr/bin/*) ;;
    *) die "$py is not a distribution interpreter (/usr/bin): the package's virtualenv links" \
        "to it, so a gateway would need the same file. Build with PYTHON=/usr/bin/python3 on" \
        "the distribution you ship to." ;;
esac
pyver="$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
"$py" -c 'import ensurepip, venv' 2>/dev/null \
    || die "$py has no venv/ensurepip: apt-get install python$pyver-venv"
command -v dpkg-deb >/dev/null || die "dpkg-deb not found: apt-get install dpkg-dev"
arch="$(dpkg --print-architecture)"
cache="${WHEEL_CACHE:-$src/build/wheels-py$pyver-$arch}"

mkdir -p "$src/build" "$out" "$cache"
work="$(mktemp -d "$src/build/deb.XXXXXX")"
trap 'rm -rf "$work"' EXIT
root="$work/root"

# 1. A clean copy of the sources, stamped with the commit and the package version.
mkdir -p "$work/src"
cp -r "$src/pyproject.toml" "$src/README.md" "$src/agent" "$work/src/"
find "$work/src" -name __pycache__ -prune -exec rm -rf {} +
rm -f "$work/src/agent/_build.py"
commit="$(PYTHONPATH="$src" "$py" -m agent.core.buildinfo --stamp "$work/src" >/dev/null \
    && sed -n "s/^COMMIT = '\(.*\)'$/\1/p" "$work/src/agent/_build.py")"
[ -n "$commit" ] || die "could not stamp the commit"
base="$(PYTHONPATH="$src" "$py" -c 'import agent; print(agent.__version__)')"
count="$(git -C "$src" rev-list --count HEAD 2>/dev/null || echo 0)"
version="${DEB_VERSION:-$base+git$count.g${commit//-/.}}"
# The same string is the Python distribution's version (a PEP 440 local version), so
# `pip freeze` in /opt/edge-agent names the build too.
sed -i "s/^version = \".*\"$/version = \"$version\"/" "$work/src/pyproject.toml"
grep -q "^version = \"$version\"$" "$work/src/pyproject.toml" || die "could not set the version"

# 2. The virtualenv, from the locked wheels only (downloaded into the cache once).
"$py" -m venv "$root$prefix"
venv_pip=("$root$prefix/bin/python" -m pip --disable-pip-version-check --quiet)
locked() {
    "${venv_pip[@]}" install --no-index --find-links "$cache" --no-compile --require-hashes \
        -r "$src/requirements.lock"
}
if ! locked 2>/dev/null; then
    echo "build-deb: fetching the locked wheels into $cache" >&2
    "${venv_pip[@]}" download --only-binary=:all: --require-hashes -r "$src/requirements.lock" \
        -d "$cache"
    locked
fi
"${venv_pip[@]}" wheel --no-deps -w "$work/wheel" "$work/src"
"${venv_pip[@]}" install --no-index --no-deps --no-compile --find-links "$work/wheel" \
    "edge-agent==$version"
# Nothing is ever pip-installed on a gateway: the package is the unit of change.
"${venv_pip[@]}" uninstall -y pip setuptools 2>/dev/null || "${venv_pip[@]}" uninstall -y pip
rm -f "$root$prefix"/bin/activate* "$root$prefix"/bin/Activate.ps1
find "$root$prefix" -name __pycache__ -prune -exec rm -rf {} +

# 3. The virtualenv was made in the staging tree; point it at its installed place.
grep -rlI --null "$root" "$root$prefix" | xargs -0 -r sed -i "s|$root$prefix|$prefix|g"
"$py" -m compileall -q --invalidation-mode checked-hash -s "$root" -p / "$root$prefix/lib" \
    >/dev/null
if grep -rl --binary-files=text "$work" "$root" >&2; then
    die "the files above still name the staging directory $work"
fi

# 4. The unit, the example config as a conffile, the docs, the maintainer scripts.
install -D -m 0644 "$src/systemd/edge-agent.service" "$root/lib/systemd/system/edge-agent.service"
install -d -m 0750 "$root/etc/edge-agent"
install -m 0640 "$src/config.example.toml" "$root/etc/edge-agent/config.toml"
install -m 0644 "$src/README.md" "$root$prefix/README.md"
install -d -m 0755 "$root$prefix/docs"
install -m 0644 "$src/docs/operating.md" "$src/docs/reference.md" "$src/docs/design.md" \
    "$root$prefix/docs/"
# The config's JSON Schema, for an editor on the gateway or beside it (docs/operating.md:
# "Editing the config"); written by the packaged agent itself, so it is the model of this very build.
install -d -m 0755 "$root/usr/share/edge-agent"
"$root$prefix/bin/python" -I -c 'import sys; from agent.cli.main import main; sys.exit(main(sys.argv[1:]))' \
    check-config --schema >"$root/usr/share/edge-agent/config.schema.json"
chmod 0644 "$root/usr/share/edge-agent/config.schema.json"
# `edge-agent status` and friends on the operator's PATH.
install -d -m 0755 "$root/usr/bin"
ln -s "$prefix/bin/edge-agent" "$root/usr/bin/edge-agent"
doc="$root/usr/share/doc/edge-agent"
install -d -m 0755 "$doc" "$root/usr/share/lintian/overrides"
install -m 0644 "$src/packaging/debian/lintian-overrides" "$root/usr/share/lintian/overrides/edge-agent"
{
    echo "edge-agent ($version) stable; urgency=medium"
    echo
    echo "  * Built from commit $commit with Python $pyver and requirements.lock."
    echo
    echo " -- $maintainer  $(date -R)"
} | gzip -9n >"$doc/changelog.gz"
# What the package bundles, and under which licences, read from the wheels' own metadata.
"$root$prefix/bin/python" -I - >"$doc/copyright" <<'PY'
from importlib.metadata import distributions

print("Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/")
print("Upstream-Name: edge-agent")
print("Comment: edge-agent and the Python distributions bundled in /opt/edge-agent:")
for d in sorted(distributions(), key=lambda d: d.metadata["Name"].lower()):
    m = d.metadata
    lic = m.get("License-Expression") or (m.get("License") or "").splitlines()[0:1]
    lic = lic if isinstance(lic, str) else (lic[0] if lic else "")
    classifiers = [c.rsplit(" :: ", 1)[-1] for c in m.get_all("Classifier") or [] if c.startswith("License ::")]
    print(f" {m['Name']} {d.version}: {lic or ', '.join(classifiers) or 'see its metadata'}")
print()
print("Files: *")
print("Copyright: the edge-agent authors, and the authors of each distribution listed above")
print("License: various")
print(" Each bundled distribution's licence is the one named above; its text is in the")
print(" distribution's .dist-info directory under /opt/edge-agent/lib.")
PY
install -d -m 0755 "$root/DEBIAN"
for script in preinst postinst prerm postrm; do
    sed -e "s|@PYTHON@|$py|g" -e "s|@PYVER@|$pyver|g" -e "s|@VERSION@|$version|g" \
        "$src/packaging/debian/$script" >"$root/DEBIAN/$script"
    chmod 0755 "$root/DEBIAN/$script"
done
echo /etc/edge-agent/config.toml >"$root/DEBIAN/conffiles"
cat >"$root/DEBIAN/control" <<EOF
Package: edge-agent
Version: $version
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $(du -sk --exclude=DEBIAN "$root" | cut -f1)
Depends: python$pyver, adduser, init-system-helpers (>= 1.54~), libc6 (>= 2.17)
Section: net
Priority: optional
Description: camera metadata from the site MQTT broker to the cloud, exactly once
 edge-agent subscribes to the cameras' MQTT topics, aggregates per-second
 chunks per camera and stream, buffers them durably in SQLite and forwards
 ordered batches to the cloud over HTTPS. Built from commit $commit
 for Python $pyver; its virtualenv with pinned dependencies is in $prefix.
EOF
chmod -R u+rwX,go+rX,go-w "$root$prefix" "$root/lib" "$root/usr"

deb="$out/edge-agent_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "$deb"
