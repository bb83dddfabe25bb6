#!/bin/bash
# Build spaceguard's Debian package on Debian 12, offline from Debian's own packages:
#   bash scripts/build-deb.sh [--out DIR] [--force] [--no-lint]
#
# 1. stages the project's files (git's view: tracked and untracked-but-not-ignored files of
#    the work tree) in build/deb/spaceguard-VERSION/, with packaging/debian/ copied to
#    debian/ at its top (the repository keeps the Debian directory under packaging/);
# 2. installs the missing build dependencies from debian/control with apt-get (nothing
#    when they are all there; services are not started by the install);
# 3. runs `dpkg-buildpackage -us -uc -b` there and copies the .deb to build/ (or --out DIR);
# 4. runs lintian on the .deb and on the source package (--no-lint: skip); it fails the
#    script on any error or warning.
# A .deb built from exactly the same staged files is reused (no rebuild) unless --force.
# The last line of the output is the .deb's path.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
# Debian's own tools and /usr/bin/python3 only: never a venv's, pyenv's or /usr/local's
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
unset PYTHONPATH PYTHONHOME PYTHONSTARTUP PYTHONUSERBASE VIRTUAL_ENV PYENV_VERSION
say() { echo "build-deb: $*" >&2; }
die() { say "$*"; exit 1; }

out=$repo/build force= lint=1
while (($#)); do
  case $1 in
    --out) [[ $# -ge 2 ]] || die "--out needs a directory"; out=$2; shift 2 ;;
    --out=*) out=${1#--out=}; shift ;;
    --force) force=1; shift ;;
    --no-lint) lint=; shift ;;
    -h|--help) sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
mkdir -p "$out"
out=$(cd "$out" && pwd)

# Two builds at once (a developer's and a test's) must not share the staging directory.
lock=/tmp/spaceguard-build-deb-$(echo "$repo" | md5sum | cut -c1-8).lock
exec 9>"$lock"
flock 9

# -- the version: debian/changelog and pyproject.toml must agree --------------------------
version=$(sed -n '1s/^spaceguard (\([^)]*\)).*/\1/p' packaging/debian/changelog)
[[ -n $version ]] || die "cannot read the version from packaging/debian/changelog"
py_version=$(sed -n 's/^version *= *"\([^"]*\)".*/\1/p' pyproject.toml | head -1)
[[ $version == "$py_version" ]] || die "packaging/debian/changelog says $version but" \
  "pyproject.toml says $py_version: add a changelog entry (dch -v $py_version)"

# -- 1. stage the sources ------------------------------------------------------------------
work=$repo/build/deb
src=$work/spaceguard-$version
rm -rf "$work"
mkdir -p "$src"
if git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  # files deleted in the work tree are still listed by --cached: keep only existing ones
  git -C "$repo" ls-files -z --cached --others --exclude-standard -- . ':!:packaging/debian' \
    | while IFS= read -r -d '' f; do [[ -f $f || -L $f ]] && printf '%s\0' "$f"; done \
    | tar --null -T - -cf - | tar -xf - -C "$src"
else
  tar --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./packaging/debian \
    --exclude='__pycache__' --exclude='*.egg-info' --exclude='./.*_cache' \
    --exclude=./.hypothesis -cf - . | tar -xf - -C "$src"
fi
cp -a packaging/debian "$src/debian"
digest=$(cd "$src" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum \
         | sha256sum | cut -d' ' -f1)
deb=$out/spaceguard_${version}_all.deb
stamp=$out/.spaceguard_${version}_all.deb.sources

# -- 2. build dependencies (and lintian) ---------------------------------------------------
installed() { [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) == "install ok installed" ]]; }
apt_get() {  # apt_get install PKG... | apt_get build-dep DIR: as scripts/setup.sh does it
  local sudo=() policy=/usr/sbin/policy-rc.d own_policy= rc=0
  if ((EUID != 0)); then
    command -v sudo >/dev/null || die "need root (or sudo) for apt-get"
    sudo=(sudo)
  fi
  # a package's maintainer scripts must not start a daemon on this host
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null
    "${sudo[@]}" chmod 755 "$policy"; own_policy=1
  fi
  "${sudo[@]}" apt-get update -qq || say "apt-get update failed: trying the lists there are"
  { "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 \
         -y -qq --no-install-recommends "$@" >/dev/null; } || rc=$?
  if [[ -n $own_policy ]]; then "${sudo[@]}" rm -f "$policy"; fi
  return "$rc"
}

reuse=
if [[ -z $force && -f $deb && -f $stamp && $(cat "$stamp") == "$digest" ]]; then
  reuse=1
  say "reusing $deb (built from the same files; --force rebuilds)"
fi
tools=()
[[ -z $reuse ]] && tools+=(dpkg-dev)
[[ -n $lint ]] && tools+=(lintian)
missing=()
for p in "${tools[@]}"; do installed "$p" || missing+=("$p"); done
if ((${#missing[@]})); then
  say "installing ${missing[*]}"
  apt_get install "${missing[@]}" || die "could not install ${missing[*]}"
fi
if [[ -z $reuse ]] && ! unmet=$(cd "$src" && dpkg-checkbuilddeps 2>&1); then
  say "installing build dependencies (${unmet#*: })"
  # `apt-get build-dep DIR` reads the staged debian/control
  apt_get build-dep "$src" || die "could not install the build dependencies"
  (cd "$src" && dpkg-checkbuilddeps) || die "build dependencies still unmet"
fi

# -- 3. build ------------------------------------------------------------------------------
if [[ -n $lint ]]; then  # the source package, for lintian only: made before the build
  (cd "$work" && dpkg-source -b "spaceguard-$version" >"$work/source.log" 2>&1) \
    || { cat "$work/source.log" >&2; die "dpkg-source -b failed"; }
fi
if [[ -z $reuse ]]; then
  rm -f "$stamp"
  say "dpkg-buildpackage -us -uc -b in $src (log: $work/build.log)"
  if ! (cd "$src" && dpkg-buildpackage -us -uc -b) >"$work/build.log" 2>&1; then
    tail -n 40 "$work/build.log" >&2
    die "dpkg-buildpackage failed (full log: $work/build.log)"
  fi
  cp "$work/spaceguard_${version}_all.deb" "$deb"
  echo "$digest" >"$stamp"
fi

# -- 4. lintian ------------------------------------------------------------------------------
if [[ -n $lint ]]; then
  targets=("$deb")
  [[ -f $work/spaceguard_$version.dsc ]] && targets+=("$work/spaceguard_$version.dsc")
  say "lintian ${targets[*]}"
  # --fail-on: any error or warning fails the build; info/pedantic tags are shown only
  root=(); ((EUID == 0)) && root=(--allow-root)
  if ! lintian "${root[@]}" --fail-on error,warning --display-info "${targets[@]}" >&2; then
    die "lintian found errors or warnings"
  fi
  say "lintian: no errors, no warnings"
fi
say "built $deb"
echo "$deb"
