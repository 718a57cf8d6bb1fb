"""The INI configuration: parsed once, validated key by key, frozen.

Every error names the section and key and says how to fix it; the
supervisor turns a ConfigError into exit code 2. Keys and defaults of the
seed README (upparat 1.x) keep their names and meaning; new keys are listed in
the README's configuration section.
"""

from __future__ import annotations

import configparser
import dataclasses
import logging
import os
import re
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

HOOK_NAMES = ("version", "download", "ready", "install", "restart")
LOG_LEVELS = {
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARNING": logging.WARNING,
    "WARN": logging.WARNING,
    "ERROR": logging.ERROR,
    # upparat 1.x documented EXCEPTION; it logs like ERROR.
    "EXCEPTION": logging.ERROR,
    "CRITICAL": logging.CRITICAL,
}
THING_NAME_RE = re.compile(r"^[a-zA-Z0-9:_-]{1,128}$")
JOB_PREFIX_RE = re.compile(r"^[a-zA-Z0-9_-]{0,63}$")
# Fixed defaults, the same for every process whatever its uid or environment.
DEFAULT_RUNTIME_DIR = Path("/run/upparat")
DEFAULT_STAGING = Path("/var/lib/upparat/staging")
STANDALONE_TMPDIR = "/tmp"  # a child started on its own (per-process units) computes the same
TRUE_WORDS = {"1", "yes", "true", "on"}
FALSE_WORDS = {"0", "no", "false", "off"}

KNOWN_KEYS = {
    "service": {
        "sentry",
        "sentry_dsn",
        "log_level",
        "download_location",
        "staging_location",
        "job_prefix",
    },
    "broker": {
        "host",
        "port",
        "thing_name",
        "client_id",
        "ssl",
        "cafile",
        "certfile",
        "keyfile",
    },
    "hooks": set(HOOK_NAMES)
    | {"retry_interval", "max_retries", "timeout", "version_confirm_window"},
    "verification": {"public_keys", "require_signature", "require_sha256"},
    "supervisor": {"user", "group", "runtime_dir"},
}


class ConfigError(Exception):
    """A configuration problem; the message names the key and the fix."""

    def __init__(self, section: str, key: str | None, problem: str, fix: str):
        self.section = section
        self.key = key
        where = f"[{section}] {key}" if key else f"[{section}]"
        super().__init__(f"{where}: {problem}. Fix: {fix}")


@dataclass(frozen=True)
class ServiceConfig:
    sentry: str | None
    log_level: int
    download_location: Path  # as configured (1.x: files go into <it>/upparat)
    staging_location: Path
    job_prefix: str

    @property
    def download_dir(self) -> Path:
        """Where the fetcher writes; owned by the unprivileged user."""
        return self.download_location / "upparat"


@dataclass(frozen=True)
class BrokerConfig:
    host: str
    port: int
    thing_name: str
    client_id: str
    ssl: bool
    cafile: Path | None
    certfile: Path | None
    keyfile: Path | None


@dataclass(frozen=True)
class HooksConfig:
    version: Path | None
    download: Path | None
    ready: Path | None
    install: Path | None
    restart: Path | None
    retry_interval: int
    max_retries: int
    timeout: int
    version_confirm_window: int

    def command(self, name: str) -> Path | None:
        if name not in HOOK_NAMES:
            raise KeyError(name)
        return getattr(self, name)


@dataclass(frozen=True)
class VerificationConfig:
    public_keys: tuple[Path, ...]
    require_signature: bool
    require_sha256: bool


@dataclass(frozen=True)
class SupervisorConfig:
    user: str
    group: str
    runtime_dir: Path


@dataclass(frozen=True)
class Config:
    service: ServiceConfig
    broker: BrokerConfig
    hooks: HooksConfig
    verification: VerificationConfig
    supervisor: SupervisorConfig

    def replace_thing_name(self, thing_name: str) -> "Config":
        _check_thing_name(thing_name, "broker", "thing_name (from -t)")
        broker = dataclasses.replace(self.broker, thing_name=thing_name)
        return dataclasses.replace(self, broker=broker)


def _get(cp: configparser.ConfigParser, section: str, key: str) -> str | None:
    if not cp.has_option(section, key):
        return None
    value = cp.get(section, key, raw=True).strip()
    return value or None


def _bool(cp, section, key, default: bool) -> bool:
    value = _get(cp, section, key)
    if value is None:
        return default
    word = value.lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ConfigError(section, key, f"{value!r} is not a boolean", "write true or false")


def _int(cp, section, key, default: int, minimum: int, maximum: int) -> int:
    value = _get(cp, section, key)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(
            section, key, f"{value!r} is not a whole number", f"write a number from {minimum} to {maximum}"
        ) from None
    if not minimum <= number <= maximum:
        raise ConfigError(
            section, key, f"{number} is out of range", f"write a number from {minimum} to {maximum}"
        )
    return number


def _path(cp, section, key, check_files: bool) -> Path | None:
    value = _get(cp, section, key)
    if value is None:
        return None
    path = Path(value)
    if check_files and not path.is_file():
        raise ConfigError(section, key, f"{value} does not exist or is not a file", "give the path of an existing file")
    return path


def _check_thing_name(name: str, section: str, key: str) -> None:
    if not THING_NAME_RE.match(name):
        raise ConfigError(
            section,
            key,
            f"{name!r} is not a valid AWS IoT thing name",
            "use 1-128 characters from a-z A-Z 0-9 : _ -",
        )


def _hook(cp, key: str, check_files: bool) -> Path | None:
    value = _get(cp, "hooks", key)
    if value is None:
        return None
    path = Path(value)
    if not path.is_absolute():
        raise ConfigError(
            "hooks", key, f"{value!r} is not an absolute path", "give the absolute path of an executable file"
        )
    if check_files and (not path.is_file() or not os.access(path, os.X_OK)):
        raise ConfigError(
            "hooks",
            key,
            f"{value} is not an executable file",
            f"create it and make it executable (chmod +x {value}), or remove the key",
        )
    if check_files and os.geteuid() == 0:
        problem = _writable_by_others(path)
        if problem:
            raise ConfigError("hooks", key, f"root runs this hook, but {problem}",
                              "make the file and every directory above it owned by root and not writable by others "
                              "(chown root:root; chmod go-w)")
    return path


def _writable_by_others(path: Path) -> str | None:
    """Why someone other than root could change what ``path`` runs, or None."""
    current = Path(os.path.realpath(path))
    for item in [current, *current.parents]:
        st = item.stat()
        if st.st_uid != 0:
            return f"{item} is owned by uid {st.st_uid}"
        sticky_dir = item != current and st.st_mode & stat.S_ISVTX
        if st.st_mode & stat.S_IWOTH and not sticky_dir:
            return f"{item} is writable by everyone"
        if st.st_mode & stat.S_IWGRP and st.st_gid != 0 and not sticky_dir:
            return f"{item} is writable by group {st.st_gid}"
    return None


def parse(text: str, source: str = "<config>", check_files: bool = True, tmpdir: str = STANDALONE_TMPDIR) -> Config:
    """Parse and validate configuration text. Raises ConfigError.

    ``tmpdir`` is the one computed default: the system temp directory used
    when ``[service] download_location`` is not set (upparat 1.x). The
    supervisor looks it up once and hands the same value to every child;
    every other default is fixed, whoever reads the config.

    ``check_files=False`` skips the checks that files exist: an unprivileged
    child gets the text from the supervisor, which has already checked them
    as root, and may not be able to see root-only files itself.
    """
    cp = configparser.ConfigParser(interpolation=None)
    try:
        cp.read_string(text, source=source)
    except configparser.Error as exc:
        raise ConfigError("file", None, f"{source} is not valid INI ({exc})", "correct the syntax") from None

    for section in cp.sections():
        if section not in KNOWN_KEYS:
            raise ConfigError(
                section, None, "unknown section", f"use only {', '.join(sorted(KNOWN_KEYS))}"
            )
        for key in cp.options(section):
            if key not in KNOWN_KEYS[section]:
                raise ConfigError(
                    section, key, "unknown key", f"use one of {', '.join(sorted(KNOWN_KEYS[section]))}"
                )

    # [service]
    level_word = (_get(cp, "service", "log_level") or "WARNING").upper()
    if level_word not in LOG_LEVELS:
        raise ConfigError(
            "service", "log_level", f"{level_word!r} is not a log level", "use DEBUG, INFO, WARNING or ERROR"
        )
    download_location = Path(_get(cp, "service", "download_location") or tmpdir)
    if not download_location.is_absolute():
        raise ConfigError("service", "download_location", "not an absolute path", "give an absolute directory path")
    staging_location = Path(_get(cp, "service", "staging_location") or DEFAULT_STAGING)
    if not staging_location.is_absolute():
        raise ConfigError("service", "staging_location", "not an absolute path", "give an absolute directory path")
    job_prefix = _get(cp, "service", "job_prefix") or ""
    if not JOB_PREFIX_RE.match(job_prefix):
        raise ConfigError(
            "service", "job_prefix", f"{job_prefix!r} can never match an AWS job id", "use characters a-z A-Z 0-9 _ -"
        )
    sentry = _get(cp, "service", "sentry") or _get(cp, "service", "sentry_dsn")
    service = ServiceConfig(
        sentry=sentry,
        log_level=LOG_LEVELS[level_word],
        download_location=download_location,
        staging_location=staging_location,
        job_prefix=job_prefix,
    )
    if staging_location == service.download_dir or service.download_dir in staging_location.parents:
        raise ConfigError(
            "service", "staging_location", "lies inside the download directory", "choose a root-only directory elsewhere"
        )

    # [broker]
    thing_name = _get(cp, "broker", "thing_name") or socket.gethostname()
    _check_thing_name(thing_name, "broker", "thing_name")
    cafile = _path(cp, "broker", "cafile", check_files)
    certfile = _path(cp, "broker", "certfile", check_files)
    keyfile = _path(cp, "broker", "keyfile", check_files)
    if (certfile is None) != (keyfile is None):
        raise ConfigError("broker", "certfile", "certfile and keyfile must be set together", "set both or neither")
    broker = BrokerConfig(
        host=_get(cp, "broker", "host") or "127.0.0.1",
        port=_int(cp, "broker", "port", 1883, 1, 65535),
        thing_name=thing_name,
        client_id=_get(cp, "broker", "client_id") or "upparat",
        ssl=_bool(cp, "broker", "ssl", False) or bool(cafile or certfile),
        cafile=cafile,
        certfile=certfile,
        keyfile=keyfile,
    )

    # [hooks]
    hooks = HooksConfig(
        **{name: _hook(cp, name, check_files) for name in HOOK_NAMES},
        retry_interval=_int(cp, "hooks", "retry_interval", 60, 0, 86400),
        max_retries=_int(cp, "hooks", "max_retries", 60, 0, 100000),
        timeout=_int(cp, "hooks", "timeout", 3600, 1, 7 * 86400),
        version_confirm_window=_int(cp, "hooks", "version_confirm_window", 120, 0, 86400),
    )

    # [verification]
    keys_value = _get(cp, "verification", "public_keys")
    public_keys: list[Path] = []
    for item in (keys_value or "").split(","):
        item = item.strip()
        if not item:
            continue
        key_path = Path(item)
        if check_files and not key_path.is_file():
            raise ConfigError(
                "verification", "public_keys", f"{item} does not exist", "list existing PEM files, comma-separated"
            )
        public_keys.append(key_path)
    require_signature = _bool(cp, "verification", "require_signature", bool(public_keys))
    if require_signature and not public_keys:
        raise ConfigError(
            "verification",
            "require_signature",
            "a signature is required but no public_keys are configured",
            "set [verification] public_keys, or require_signature = false",
        )
    verification = VerificationConfig(
        public_keys=tuple(public_keys),
        require_signature=require_signature,
        require_sha256=_bool(cp, "verification", "require_sha256", True),
    )

    # [supervisor]
    runtime_dir = Path(_get(cp, "supervisor", "runtime_dir") or DEFAULT_RUNTIME_DIR)
    if not runtime_dir.is_absolute():
        raise ConfigError("supervisor", "runtime_dir", "not an absolute path", "give an absolute directory path")
    # ipc:// paths are limited by sun_path (108 bytes).
    if len(str(runtime_dir)) > 70:
        raise ConfigError("supervisor", "runtime_dir", "path too long for unix sockets", "use a path under 70 characters")
    supervisor = SupervisorConfig(
        user=_get(cp, "supervisor", "user") or "upparat",
        group=_get(cp, "supervisor", "group") or _get(cp, "supervisor", "user") or "upparat",
        runtime_dir=runtime_dir,
    )
    return Config(service, broker, hooks, verification, supervisor)


def load(path: str | os.PathLike, tmpdir: str = STANDALONE_TMPDIR) -> tuple[Config, str]:
    """Read and parse a config file; returns the config and its text."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("file", None, f"cannot read {path} ({exc})", "pass a readable UTF-8 INI file with -c") from None
    return parse(text, str(path), tmpdir=tmpdir), text
