"""The supervisor's declarative parts: the child table, what each child is
given, the environment, and refusing symlinks where it creates directories."""

import json
import os

import pytest

from upparat import config as config_mod
from upparat import supervisor as sv
from upparat.ipc.settings import Identities, resolve_layout


def test_child_table_order_and_identities():
    assert [(c.name, c.module, c.runs_as) for c in sv.CHILDREN] == [
        ("installer", "upparat.installer_proc", sv.ROOT),
        ("fetcher", "upparat.fetcher_proc", sv.FETCHER_USER),
        ("broker", "upparat.broker_proc", sv.BROKER_USER),
    ]
    # four processes: the root processes' errors reach Sentry through the broker, not a fifth process
    assert [c.name for c in sv.CHILDREN if sv.PROBLEMS in c.receives] == ["broker"]


@pytest.fixture
def settings(tmp_path):
    pems = {}
    for name in ("ca", "cert", "key", "pub"):
        pems[name] = tmp_path / f"{name}.pem"
        pems[name].write_text(f"-----BEGIN {name.upper()}-----\n")
    text = (f"[broker]\nthing_name = t\ncafile = {pems['ca']}\ncertfile = {pems['cert']}\n"
            f"keyfile = {pems['key']}\n[verification]\npublic_keys = {pems['pub']}\n")
    cfg = config_mod.parse(text)
    ids = Identities(True, "upparat", 1234, 5678, "upparat-fetch", 1235, 5679)
    layout = resolve_layout(cfg, "/tmp")
    return sv.Settings(cfg, text, "/etc/upparat/upparat.conf", layout, ids, sv.read_root_files(cfg))


def envelope_for(settings, name):
    sup = sv.Supervisor(settings, verbose=True, thing_name="other-thing")
    spec = next(c for c in sv.CHILDREN if c.name == name)
    return json.loads(sup.envelope(spec))


def test_only_the_broker_receives_the_tls_material(settings):
    broker = envelope_for(settings, "broker")
    assert broker["tls"] == {"cafile": "-----BEGIN CA-----\n", "certfile": "-----BEGIN CERT-----\n",
                               "keyfile": "-----BEGIN KEY-----\n"}
    assert broker["public_keys_pem"] == []
    for name in ("fetcher", "installer"):
        assert envelope_for(settings, name)["tls"] == {}


def test_only_the_installer_receives_the_public_keys(settings):
    env = envelope_for(settings, "installer")
    assert env["public_keys_pem"] == ["-----BEGIN PUB-----\n"]
    assert env["config_path"] == "/etc/upparat/upparat.conf"
    assert env["thing_name"] == "other-thing" and env["verbose"] is True
    assert envelope_for(settings, "fetcher")["public_keys_pem"] == []


def test_child_environment_is_minimal(settings, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.delenv("PYTHONPATH", raising=False)
    sup = sv.Supervisor(settings, verbose=False, thing_name=None)
    assert sup.child_env() == {"PATH": sv.CHILD_PATH, "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1"}
    monkeypatch.setenv("PYTHONPATH", "/opt/x")
    assert sup.child_env()["PYTHONPATH"] == "/opt/x"


def test_only_the_fetcher_gets_the_proxy_settings(settings, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    monkeypatch.setenv("no_proxy", "localhost")
    sup = sv.Supervisor(settings, verbose=False, thing_name=None)
    specs = {c.name: c for c in sv.CHILDREN}
    assert sup.child_env(specs["fetcher"])["HTTPS_PROXY"] == "http://proxy:3128"
    assert sup.child_env(specs["fetcher"])["no_proxy"] == "localhost"
    for name in ("broker", "installer"):
        assert "HTTPS_PROXY" not in sup.child_env(specs[name])


def test_unreadable_key_file_is_a_config_error_naming_the_key(tmp_path):
    cfg = config_mod.parse(f"[broker]\nthing_name = t\ncafile = {tmp_path}\n", check_files=False)
    with pytest.raises(config_mod.ConfigError, match=r"^\[broker\] cafile: cannot read"):
        sv.read_root_files(cfg)


def test_prepare_dir_refuses_a_symlink_and_leaves_its_target_alone(tmp_path):
    target = tmp_path / "target"
    target.mkdir(mode=0o755)
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(config_mod.ConfigError, match="is a symbolic link"):
        sv.prepare_dir(tmp_path / "link", os.getuid(), os.getgid(), 0o700, "supervisor", "runtime_dir")
    assert target.stat().st_mode & 0o777 == 0o755


def test_prepare_dir_fixes_the_mode_of_an_existing_directory(tmp_path):
    path = tmp_path / "a" / "b"
    path.mkdir(parents=True, mode=0o777)
    path.chmod(0o777)
    sv.prepare_dir(path, os.getuid(), os.getgid(), 0o750, "supervisor", "runtime_dir")
    assert path.stat().st_mode & 0o777 == 0o750


@pytest.mark.parametrize("code, text", [
    (None, "could not be started"), (-9, "was killed by SIGKILL"), (0, "exited with code 0 (EXIT_OK)"),
    (3, "exited with code 3 (EXIT_UNSAFE, its privileges were not dropped)"),
])
def test_exit_descriptions(code, text):
    assert sv.describe_exit(code) == text
