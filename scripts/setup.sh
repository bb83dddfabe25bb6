#!/bin/bash
# Set up a fresh Debian 12 machine for spaceguard's demo and tests; idempotent and fast
# (well under 2 s) once done:
#   1. apt packages (only the missing ones; services are not started by the install),
#   2. a venv at .venv made with the first python3 on PATH that is >= 3.11
#      (re-made if broken),
#   3. `pip install -e '.[test]'` into it, skipped while pyproject.toml is unchanged.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
say() { echo "setup: $*"; }

# Two runs at once (say a developer's and a test's) must not race on apt or pip.
lock=/tmp/spaceguard-setup-$(echo "$repo" | md5sum | cut -c1-8).lock
exec 9>"$lock"
flock 9

# -- 1. Debian packages --------------------------------------------------------------
packages=(systemd dbus rclone prometheus prometheus-alertmanager e2fsprogs util-linux
          procps python3 python3-venv python3-pip libfaketime
          # the shipped units' test (tests/integration/test_privilege.py): a real polkitd,
          # and the libraries the package runs on with Debian's /usr/bin/python3
          polkitd python3-dbus-next python3-sdnotify python3-pyinotify
          python3-prometheus-client)
missing=()
for p in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  [[ $status == "install ok installed" ]] || missing+=("$p")
done
if ((${#missing[@]})); then
  say "installing ${missing[*]}"
  sudo=()
  if ((EUID != 0)); then
    command -v sudo >/dev/null || { say "need root (or sudo) for apt-get" >&2; exit 1; }
    sudo=(sudo)
  fi
  # A package's maintainer scripts must not start its daemon on this host (prometheus
  # and alertmanager would take their ports): policy-rc.d says no while we install.
  policy=/usr/sbin/policy-rc.d; own_policy=
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null
    "${sudo[@]}" chmod 755 "$policy"; own_policy=1
    trap 'if [[ -n $own_policy ]]; then "${sudo[@]}" rm -f "$policy"; fi' EXIT
  fi
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  if [[ -n $own_policy ]]; then "${sudo[@]}" rm -f "$policy"; own_policy=; fi
  say "apt packages installed"
fi

# -- 2. venv -----------------------------------------------------------------------
venv=$repo/.venv
py_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }
if [[ ! -x $venv/bin/python ]] || ! py_ok "$venv/bin/python" \
   || ! "$venv/bin/python" -c 'import pip' 2>/dev/null; then
  base=
  IFS=: read -ra path_dirs <<<"$PATH"
  for d in "${path_dirs[@]}"; do
    [[ -n $d && -x $d/python3 ]] && py_ok "$d/python3" && { base=$d/python3; break; }
  done
  if [[ -z $base ]]; then
    for name in python3.13 python3.12 python3.11; do
      cand=$(command -v "$name" || true)
      [[ -n $cand ]] && py_ok "$cand" && { base=$cand; break; }
    done
  fi
  [[ -n $base ]] || { say "no python3 >= 3.11 on PATH" >&2; exit 1; }
  say "creating .venv with $base ($("$base" -V 2>&1))"
  rm -rf "$venv"
  "$base" -m venv "$venv"
fi

# -- 3. the project, editable, with its test tools ------------------------------------
stamp=$venv/.spaceguard-setup
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $repo $("$venv/bin/python" -V 2>&1)"
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
  say "up to date ($("$venv/bin/python" -V 2>&1), .venv)"
  exit 0
fi
say "pip install -e '.[test]' into .venv"
rm -f "$stamp"
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]'
echo "$want" >"$stamp"
say "done"
