"""The Debian package (scripts/build-deb.sh, packaging/debian/) holds what is shipped, at
Debian's paths, and runs on Debian's own python3 and python3-* libraries.

One build per session (the script also reuses a .deb built from the same files, so a
second session costs a few seconds). The first build takes about 15 s on a 2-core VM, and
lintian about 5 s. Under CI=true a host that cannot build the package fails these tests.
"""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.debpackage import (
    DEBIAN_PATH,
    BuiltPackage,
    PackageError,
    build_package,
    missing_for_build,
)
from tests.sandbox import require

DEBIAN_PYTHON = "/usr/bin/python3"


@pytest.fixture(scope="session")
def package() -> BuiltPackage:
    missing = missing_for_build()
    require(not missing, "cannot build the Debian package: " + "; ".join(missing))
    try:
        return build_package()
    except PackageError as error:
        pytest.fail(str(error), pytrace=False)


@pytest.fixture(scope="session")
def unpacked(
    package: BuiltPackage, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path, Path]:
    """(the .deb's files, its control files, a copy of the tree it was built from)."""
    where = tmp_path_factory.mktemp("deb")
    # the staged tree is remade by every build-deb.sh run: keep (the parts of) the one
    # this .deb came from
    source = where / "source"
    for part in ("systemd", "packaging", "config", "daemon/spaceguard"):
        shutil.copytree(package.source / part, source / part, symlinks=True)
    return package.extract(where), package.control(where / "control"), source


def _units(source: Path) -> list[str]:
    return sorted(
        p.name for pattern in ("*.service", "*.socket") for p in (source / "systemd").glob(pattern)
    )


def test_files_at_debian_paths(package: BuiltPackage, unpacked: tuple[Path, Path, Path]) -> None:
    files, _, source = unpacked
    contents = package.contents()
    units = _units(source)
    assert "spaceguard.service" in units and "spaceguard.socket" in units
    expected = [f"/lib/systemd/system/{unit}" for unit in units] + [
        "/usr/bin/spaceguard",
        "/usr/bin/spaceguardctl",
        "/usr/share/polkit-1/rules.d/50-spaceguard.rules",
        "/usr/lib/sysusers.d/spaceguard.conf",
        "/usr/lib/tmpfiles.d/spaceguard.conf",
        "/etc/spaceguard/spaceguard.toml",
        "/usr/share/spaceguard/prometheus/spaceguard-rules.yml",
        "/usr/share/spaceguard/grafana/spaceguard-dashboard.json",
        "/usr/share/man/man8/spaceguard.8.gz",
        "/usr/share/man/man8/spaceguardctl.8.gz",
        "/usr/share/man/man5/spaceguard.toml.5.gz",
        # uncompressed: the units' Documentation= names this file
        "/usr/share/doc/spaceguard/README.md",
        "/usr/share/doc/spaceguard/copyright",
    ]
    expected += [
        f"/usr/share/spaceguard/examples/systemd/{p.name}"
        for p in (source / "systemd" / "examples").iterdir()
    ]
    expected += [
        f"/usr/lib/python3/dist-packages/spaceguard/{p.name}"
        for p in (source / "daemon" / "spaceguard").glob("*.py")
    ]
    missing = [path for path in expected if path not in contents]
    assert not missing, f"not in the package: {missing}"
    for path in ("/usr/bin/spaceguard", "/usr/bin/spaceguardctl"):
        assert contents[path].startswith("-rwxr-xr-x root/root"), contents[path]
    # every file under the paths Debian gives a package of this kind, none in /usr/local,
    # no test or bench code
    allowed = (
        "/etc/spaceguard/",
        "/lib/systemd/system/",
        "/usr/bin/",
        "/usr/lib/python3/dist-packages/",
        "/usr/lib/sysusers.d/",
        "/usr/lib/tmpfiles.d/",
        "/usr/share/doc/spaceguard/",
        "/usr/share/man/",
        "/usr/share/polkit-1/rules.d/",
        "/usr/share/spaceguard/",
    )
    strays = [
        path
        for path, line in contents.items()
        if not line.startswith("d") and not path.startswith(allowed)
    ]
    assert not strays, strays
    version = package.field("Version")
    top = {
        path.split("/")[5]
        for path in contents
        if path.startswith("/usr/lib/python3/dist-packages/") and path.count("/") > 5
    }
    assert top == {"spaceguard", f"spaceguard-{version}.dist-info"}, top

    # shipped unchanged: the units, the rule, sysusers, the config, the rules and dashboard
    same = {f"lib/systemd/system/{unit}": f"systemd/{unit}" for unit in units}
    for shipped, original in (
        ("usr/share/polkit-1/rules.d", "packaging/polkit/50-spaceguard.rules"),
        ("usr/lib/sysusers.d", "packaging/sysusers/spaceguard.conf"),
        ("etc/spaceguard", "config/spaceguard.toml"),
        ("usr/share/spaceguard/prometheus", "packaging/prometheus/spaceguard-rules.yml"),
        ("usr/share/spaceguard/grafana", "packaging/grafana/spaceguard-dashboard.json"),
    ):
        same[f"{shipped}/{Path(original).name}"] = original
    for installed, original in same.items():
        assert (files / installed).read_bytes() == (source / original).read_bytes(), installed
    for page in ("man8/spaceguard.8", "man8/spaceguardctl.8", "man5/spaceguard.toml.5"):
        text = gzip.decompress((files / "usr/share/man" / f"{page}.gz").read_bytes())
        assert text == (source / "packaging/man" / page.split("/")[1]).read_bytes(), page


def test_control_depends_and_conffile(
    package: BuiltPackage, unpacked: tuple[Path, Path, Path]
) -> None:
    _, control, _ = unpacked
    assert package.field("Package") == "spaceguard"
    assert package.field("Architecture") == "all"
    depends = [alternative.strip() for alternative in package.field("Depends").split(",")]
    names = {re.split(r"[ (]", item)[0] for item in depends}
    assert {
        "polkitd",
        "python3-dbus-next",
        "python3-sdnotify",
        "python3-pyinotify",
        "python3-prometheus-client",
        "systemd",
    } <= names, depends
    assert "python3-sdnotify (>= 0.3.1)" in depends  # Debian 12 has 0.3.1
    assert not names & {"python3-pip", "python3-venv"}, depends
    recommends = {item.strip() for item in package.field("Recommends").split(",")}
    assert {"prometheus", "prometheus-alertmanager"} <= recommends
    assert (control / "conffiles").read_text().split() == ["/etc/spaceguard/spaceguard.toml"]


def test_maintainer_scripts(unpacked: tuple[Path, Path, Path]) -> None:
    """Users first, then the config's group; units installed but not enabled or started."""
    _, control, source = unpacked
    postinst = (control / "postinst").read_text()
    sysusers = postinst.index('systemd-sysusers ${DPKG_ROOT:+--root="$DPKG_ROOT"} spaceguard.conf')
    tmpfiles = postinst.index("--create spaceguard.conf")
    chown = postinst.index('chown root:spaceguard "$conf"')
    assert sysusers < tmpfiles < chown
    assert 'chmod 0640 "$conf"' in postinst
    assert 'dpkg-statoverride --list "$conf"' in postinst
    # --no-enable: every unit gets the "enable only if it was enabled before" snippet, and
    # none the one that enables new installations
    assert "was-enabled defaults to true" not in postinst
    for unit in _units(source):
        if "[Install]" in (source / "systemd" / unit).read_text():
            assert f"deb-systemd-helper debian-installed '{unit}'" in postinst, unit
    # no systemctl call can fail the install (PID 1 may be another init, as on this VM)
    for line in postinst.splitlines():
        if re.search(r"\b(systemctl|deb-systemd-invoke)\b", line):
            assert line.rstrip().endswith("|| true"), line
    # every unit is stopped on removal; services are restarted on upgrade, sockets not
    prerm = (control / "prerm").read_text()
    for unit in _units(source):
        assert re.search(rf"deb-systemd-invoke stop .*'{re.escape(unit)}'", prerm), unit
        restart = re.search(rf"deb-systemd-invoke \$_dh_action .*'{re.escape(unit)}'", postinst)
        assert bool(restart) == unit.endswith(".service"), unit
    tmpfiles_conf = (unpacked[0] / "usr/lib/tmpfiles.d/spaceguard.conf").read_text()
    assert re.search(r"^d /var/lib/spaceguard 0750 spaceguard spaceguard", tmpfiles_conf, re.M)


def test_runs_on_debian_python(unpacked: tuple[Path, Path, Path]) -> None:
    """The shipped commands, with /usr/bin/python3 and Debian's python3-* libraries."""
    files, _, _ = unpacked
    require(Path(DEBIAN_PYTHON).exists(), f"no {DEBIAN_PYTHON}")
    env = {
        "PATH": DEBIAN_PATH,
        "LC_ALL": "C.UTF-8",
        "PYTHONPATH": str(files / "usr/lib/python3/dist-packages"),
    }
    for script in ("spaceguard", "spaceguardctl"):
        shebang = (files / "usr/bin" / script).read_text().splitlines()[0]
        assert shebang == f"#!{DEBIAN_PYTHON}", shebang
    conffile = files / "etc/spaceguard/spaceguard.toml"
    checks = [
        ([str(files / "usr/bin/spaceguard"), "--help"], "check-config"),
        ([str(files / "usr/bin/spaceguardctl"), "--help"], "status"),
        ([str(files / "usr/bin/spaceguard"), "check-config", str(conffile)], "syntax is ok"),
        # the daemon's dependencies, as Debian ships them
        (
            [
                DEBIAN_PYTHON,
                "-c",
                "import spaceguard, importlib, pkgutil; "
                "[importlib.import_module(m.name) for m in "
                "pkgutil.walk_packages(spaceguard.__path__, 'spaceguard.') "
                "if m.name != 'spaceguard.__main__']; print(spaceguard.__file__)",
            ],
            str(files / "usr/lib/python3/dist-packages/spaceguard/__init__.py"),
        ),
    ]
    for command, expected in checks:
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
        assert result.returncode == 0, (command, result.stdout, result.stderr)
        assert expected in result.stdout, (command, result.stdout)


def test_lintian_clean(package: BuiltPackage) -> None:
    """lintian: no error and no warning on the .deb and the source package."""
    try:
        linted = build_package(lint=True)  # reuses the .deb, runs lintian (installs it)
    except PackageError as error:
        pytest.fail(str(error), pytrace=False)
    tags = [line for line in linted.output.splitlines() if re.match(r"^[EW]: ", line)]
    assert not tags, tags
    assert "lintian: no errors, no warnings" in linted.output
