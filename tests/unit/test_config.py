import os

import pytest

from upparat import config
from upparat.config import ConfigError


def test_defaults_match_upparat_1x():
    cfg = config.parse("")
    assert (cfg.broker.host, cfg.broker.port, cfg.broker.client_id) == ("127.0.0.1", 1883, "upparat")
    assert (cfg.hooks.retry_interval, cfg.hooks.max_retries) == (60, 60)
    assert cfg.verification.require_sha256 is True
    assert cfg.verification.require_signature is False
    assert cfg.service.download_dir == cfg.service.download_location / "upparat"
    assert cfg.service.job_prefix == ""
    assert (cfg.supervisor.user, cfg.supervisor.group) == ("upparat", "upparat")


@pytest.mark.parametrize("text, key", [
    ("[broker]\nport = eighty\n", "[broker] port"),
    ("[broker]\nport = 70000\n", "[broker] port"),
    ("[broker]\nprot = 1\n", "[broker] prot"),
    ("[servce]\n", "[servce]"),
    ("[hooks]\ninstall = /nonexistent/install.sh\n", "[hooks] install"),
    ("[hooks]\ninstall = relative.sh\n", "[hooks] install"),
    ("[broker]\nssl = maybe\n", "[broker] ssl"),
    ("[service]\nlog_level = LOUD\n", "[service] log_level"),
    ("[verification]\nrequire_signature = true\n", "[verification] require_signature"),
    ("[verification]\npublic_keys = /nonexistent.pem\n", "[verification] public_keys"),
    ("[broker]\nthing_name = bad name\n", "[broker] thing_name"),
    ("[service]\njob_prefix = a/b\n", "[service] job_prefix"),
    ("[broker]\ncafile = /nonexistent.pem\n", "[broker] cafile"),
    ("not ini", "[file]"),
])
def test_bad_config_names_the_key_and_a_fix(text, key):
    with pytest.raises(ConfigError) as err:
        config.parse(text)
    assert str(err.value).startswith(key)
    assert "Fix:" in str(err.value)


def test_sentry_dsn_is_an_alias_and_exception_level_is_accepted():
    cfg = config.parse("[service]\nsentry_dsn = https://k@example.invalid/1\nlog_level = exception\n")
    assert cfg.service.sentry == "https://k@example.invalid/1"


def test_public_keys_turn_on_required_signatures(tmp_path):
    key = tmp_path / "k.pem"
    key.write_text("x")
    cfg = config.parse(f"[verification]\npublic_keys = {key}, {key}\n")
    assert cfg.verification.public_keys == (key, key)
    assert cfg.verification.require_signature is True


def test_child_parse_skips_file_checks():
    cfg = config.parse("[hooks]\ninstall = /root-only/install.sh\n", check_files=False)
    assert str(cfg.hooks.install) == "/root-only/install.sh"


def test_staging_inside_download_dir_is_refused():
    with pytest.raises(ConfigError, match="staging_location"):
        config.parse("[service]\ndownload_location = /var/dl\nstaging_location = /var/dl/upparat/stage\n")


@pytest.mark.skipif(os.geteuid() != 0, reason="ownership of hooks is checked when root runs them")
def test_hook_writable_by_others_is_refused_as_root(tmp_path):
    hook = tmp_path / "install.sh"
    hook.write_text("#!/bin/sh\n")
    hook.chmod(0o755)
    config.parse(f"[hooks]\ninstall = {hook}\n")  # root's own, 0755: fine
    hook.chmod(0o777)
    with pytest.raises(ConfigError, match=r"^\[hooks\] install: root runs this hook, but .* writable by everyone"):
        config.parse(f"[hooks]\ninstall = {hook}\n")
    hook.chmod(0o755)
    os.chown(hook, 12345, 0)
    with pytest.raises(ConfigError, match="owned by uid 12345"):
        config.parse(f"[hooks]\ninstall = {hook}\n")
