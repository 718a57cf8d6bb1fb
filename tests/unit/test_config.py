"""The INI configuration: upparat 1.x keys and defaults, the new keys, and
an error naming the key and the fix for every bad value."""

import os
from pathlib import Path

import pytest

from upparat import config
from upparat.config import ConfigError
from upparat.ipc.settings import resolve_layout


def test_defaults_match_upparat_1x_and_are_the_same_for_every_reader():
    cfg = config.parse("")
    assert (cfg.broker.host, cfg.broker.port, cfg.broker.client_id) == ("127.0.0.1", 1883, "upparat")
    assert (cfg.hooks.retry_interval, cfg.hooks.max_retries) == (60, 60)
    assert cfg.verification.require_sha256 is True and cfg.verification.allow_unsigned is False
    assert cfg.service.job_prefix == "" and cfg.service.download_location is None
    assert (cfg.supervisor.user, cfg.supervisor.fetcher_user) == ("upparat", "upparat-fetch")
    assert cfg.supervisor.runtime_dir == Path("/run/upparat")
    assert cfg.service.staging_location == Path("/var/lib/upparat/staging")
    assert cfg.service.max_file_size == 4 * 1024**3
    layout = resolve_layout(cfg, "/some/tmp")
    assert layout.download_dir == Path("/some/tmp/upparat")  # 1.x: <tmpdir>/upparat
    assert layout.broker_state_dir == Path("/var/lib/upparat/broker")


@pytest.mark.parametrize("text, key", [
    ("[broker]\nport = eighty\n", "[broker] port"),
    ("[broker]\nport = 70000\n", "[broker] port"),
    ("[broker]\nprot = 1\n", "[broker] prot"),
    ("[servce]\n", "[servce]"),
    ("[hooks]\ninstall = /nonexistent/install.sh\n", "[hooks] install"),
    ("[hooks]\ninstall = relative.sh\n", "[hooks] install"),
    ("[broker]\nssl = maybe\n", "[broker] ssl"),
    ("[service]\nlog_level = LOUD\n", "[service] log_level"),
    ("[service]\nmax_file_size = lots\n", "[service] max_file_size"),
    ("[service]\nmax_file_size = 0\n", "[service] max_file_size"),
    ("[service]\ndownload_location = relative/dir\n", "[service] download_location"),
    ("[verification]\nrequire_signature = true\n", "[verification] require_signature"),
    ("[verification]\nrequire_sha256 = false\n", "[verification] require_sha256"),
    ("[verification]\nallow_unsigned = perhaps\n", "[verification] allow_unsigned"),
    ("[verification]\npublic_keys = /nonexistent.pem\n", "[verification] public_keys"),
    ("[broker]\nthing_name = bad name\n", "[broker] thing_name"),
    ("[broker]\nthing_name = good\\n\n", "[broker] thing_name"),
    ("[service]\njob_prefix = a/b\n", "[service] job_prefix"),
    ("[broker]\ncafile = /nonexistent.pem\n", "[broker] cafile"),
    ("[broker]\ncertfile = /etc/hostname\n", "[broker] certfile"),
    ("[supervisor]\ngroup = upparat\n", "[supervisor] group"),
    ("[supervisor]\nfetcher_user = upparat\n", "[supervisor] fetcher_user"),
    ("[supervisor]\nuser = Root User\n", "[supervisor] user"),
    ("[supervisor]\nruntime_dir = /" + "x" * 80 + "\n", "[supervisor] runtime_dir"),
    ("not ini", "[file]"),
])
def test_bad_config_names_the_key_and_a_fix(text, key):
    with pytest.raises(ConfigError) as err:
        config.parse(text)
    assert str(err.value).startswith(key)
    assert "Fix:" in str(err.value)


def test_retired_keys_say_what_replaced_them():
    with pytest.raises(ConfigError, match="allow_unsigned"):
        config.parse("[verification]\nrequire_signature = false\n")


def test_sizes_take_binary_units_and_unsigned_needs_the_opt_in():
    cfg = config.parse("[service]\nmax_file_size = 512M\ndownload_rate_limit = 64K\n"
                       "[verification]\nallow_unsigned = true\nrequire_sha256 = false\n")
    assert cfg.service.max_file_size == 512 * 1024**2 and cfg.service.download_rate_limit == 64 * 1024
    assert cfg.verification.allow_unsigned and not cfg.verification.require_sha256


def test_sentry_dsn_is_an_alias_and_exception_level_is_accepted():
    cfg = config.parse("[service]\nsentry_dsn = https://k@example.invalid/1\nlog_level = exception\n")
    assert cfg.service.sentry == "https://k@example.invalid/1"


def test_public_keys_are_a_comma_separated_list(tmp_path):
    key = tmp_path / "k.pem"
    key.write_text("x")
    cfg = config.parse(f"[verification]\npublic_keys = {key}, {key}\n")
    assert cfg.verification.public_keys == (key, key)


def test_child_parse_skips_file_checks():
    cfg = config.parse("[hooks]\ninstall = /root-only/install.sh\n", check_files=False)
    assert str(cfg.hooks.install) == "/root-only/install.sh"


def test_staging_inside_the_download_dir_is_refused():
    cfg = config.parse("[service]\ndownload_location = /var/dl\nstaging_location = /var/dl/upparat/stage\n")
    with pytest.raises(ConfigError, match="staging_location"):
        resolve_layout(cfg, "/tmp")


@pytest.mark.skipif(os.geteuid() != 0, reason="ownership of hooks is checked when root runs them")
def test_a_hook_anyone_but_root_could_change_is_refused_as_root(tmp_path):
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


@pytest.mark.skipif(os.geteuid() != 0, reason="ownership of hooks is checked when root runs them")
def test_a_symlinked_hook_in_a_directory_another_user_controls_is_refused(tmp_path):
    """The link itself is root's, but it lies in a directory the user can change."""
    real = tmp_path / "real.sh"
    real.write_text("#!/bin/sh\n")
    real.chmod(0o755)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 12345, 12345)
    (theirs / "install.sh").symlink_to(real)
    with pytest.raises(ConfigError, match=f"{theirs} is owned by uid 12345"):
        config.parse(f"[hooks]\ninstall = {theirs / 'install.sh'}\n")
    ours = tmp_path / "ours"
    ours.mkdir(mode=0o755)
    (ours / "install.sh").symlink_to(real)  # a root link in a root directory: the target is checked
    config.parse(f"[hooks]\ninstall = {ours / 'install.sh'}\n")
