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
from dataclasses import dataclass
from pathlib import Path

from upparat import trust
from upparat.release import HOOK_NAMES, THING_NAME_RE

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
JOB_PREFIX_RE = re.compile(r"[a-zA-Z0-9_-]{0,63}")
USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
SIZE_RE = re.compile(r"(\d+)\s*([KMGT]?)i?B?", re.IGNORECASE)
SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
TRUE_WORDS = {"1", "yes", "true", "on"}
FALSE_WORDS = {"0", "no", "false", "off"}

# Fixed defaults: the same for every process that reads the config, whatever
# its uid or environment. The one computed default (download_location: the
# system temp directory) is decided by the supervisor, see upparat.settings.
DEFAULT_RUNTIME_DIR = Path("/run/upparat")
DEFAULT_STATE_LOCATION = Path("/var/lib/upparat")
DEFAULT_STAGING = DEFAULT_STATE_LOCATION / "staging"
DEFAULT_MAX_FILE_SIZE = 4 * 1024**3

KNOWN_KEYS = {
    "service": {
        "sentry",
        "sentry_dsn",
        "log_level",
        "download_location",
        "staging_location",
        "state_location",
        "job_prefix",
        "max_file_size",
        "download_timeout",
        "low_speed_limit",
        "low_speed_time",
        "download_rate_limit",
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
    "verification": {"public_keys", "allow_unsigned", "require_sha256"},
    "supervisor": {"user", "fetcher_user", "runtime_dir"},
}
# Keys of earlier Upparat 2 development versions, refused with the fix.
RETIRED_KEYS = {
    ("verification", "require_signature"): "remove it: signatures are required unless [verification] "
                                           "allow_unsigned = true",
    ("supervisor", "group"): "remove it: each of [supervisor] user and fetcher_user runs with its own "
                             "primary group",
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
    download_location: Path | None  # None: the system temp dir, decided by the supervisor
    staging_location: Path
    state_location: Path
    job_prefix: str
    max_file_size: int
    download_timeout: int
    low_speed_limit: int
    low_speed_time: int
    download_rate_limit: int


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
    allow_unsigned: bool
    require_sha256: bool


@dataclass(frozen=True)
class SupervisorConfig:
    user: str
    fetcher_user: str
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


def _bytes(cp, section, key, default: int, minimum: int, maximum: int) -> int:
    """A byte count: a whole number, optionally with K, M, G or T (powers of 1024)."""
    value = _get(cp, section, key)
    if value is None:
        return default
    match = SIZE_RE.fullmatch(value)
    if not match:
        raise ConfigError(section, key, f"{value!r} is not a byte count",
                          "write a whole number of bytes, optionally with K, M, G or T (e.g. 512M)")
    number = int(match.group(1)) * SIZE_UNITS[match.group(2).upper()]
    if not minimum <= number <= maximum:
        raise ConfigError(section, key, f"{value} is out of range", f"write a size from {minimum} to {maximum} bytes")
    return number


def _abs_dir(cp, section, key, default: Path | None) -> Path | None:
    value = _get(cp, section, key)
    if value is None:
        return default
    path = Path(value)
    if not path.is_absolute():
        raise ConfigError(section, key, f"{value!r} is not an absolute path", "give an absolute directory path")
    return Path(os.path.normpath(path))


def _path(cp, section, key, check_files: bool) -> Path | None:
    value = _get(cp, section, key)
    if value is None:
        return None
    path = Path(value)
    if check_files and not path.is_file():
        raise ConfigError(section, key, f"{value} does not exist or is not a file", "give the path of an existing file")
    return path


def _check_thing_name(name: str, section: str, key: str) -> None:
    if not THING_NAME_RE.fullmatch(name):
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
    if check_files:
        problem = trust.executable_problem(path, as_root=os.geteuid() == 0)
        if problem:
            raise ConfigError("hooks", key, problem,
                              f"make {value} an executable file that only root can change: the file and every "
                              "directory and symlink on its path owned by root and not writable by others "
                              "(chown root:root; chmod go-w), or remove the key")
    return path


def _user(cp, key: str, default: str) -> str:
    name = _get(cp, "supervisor", key) or default
    if not USER_RE.fullmatch(name):
        raise ConfigError("supervisor", key, f"{name!r} is not a user name", "give the name of a system user")
    return name


def parse(text: str, source: str = "<config>", check_files: bool = True) -> Config:
    """Parse and validate configuration text. Raises ConfigError.

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
            if (section, key) in RETIRED_KEYS:
                raise ConfigError(section, key, "is no longer a setting", RETIRED_KEYS[(section, key)])
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
    download_location = _abs_dir(cp, "service", "download_location", None)
    state_location = _abs_dir(cp, "service", "state_location", DEFAULT_STATE_LOCATION)
    staging_location = _abs_dir(cp, "service", "staging_location", state_location / "staging")
    job_prefix = _get(cp, "service", "job_prefix") or ""
    if not JOB_PREFIX_RE.fullmatch(job_prefix):
        raise ConfigError(
            "service", "job_prefix", f"{job_prefix!r} can never match an AWS job id", "use characters a-z A-Z 0-9 _ -"
        )
    sentry = _get(cp, "service", "sentry") or _get(cp, "service", "sentry_dsn")
    service = ServiceConfig(
        sentry=sentry,
        log_level=LOG_LEVELS[level_word],
        download_location=download_location,
        staging_location=staging_location,
        state_location=state_location,
        job_prefix=job_prefix,
        max_file_size=_bytes(cp, "service", "max_file_size", DEFAULT_MAX_FILE_SIZE, 1, 2**63 - 1),
        download_timeout=_int(cp, "service", "download_timeout", 86400, 10, 30 * 86400),
        low_speed_limit=_bytes(cp, "service", "low_speed_limit", 1, 0, 2**40),
        low_speed_time=_int(cp, "service", "low_speed_time", 30, 1, 86400),
        download_rate_limit=_bytes(cp, "service", "download_rate_limit", 0, 0, 2**40),
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
    allow_unsigned = _bool(cp, "verification", "allow_unsigned", False)
    require_sha256 = _bool(cp, "verification", "require_sha256", True)
    if not require_sha256 and not allow_unsigned:
        raise ConfigError("verification", "require_sha256",
                          "false is only possible for unsigned updates (a signature covers the sha256)",
                          "set require_sha256 = true, or also allow_unsigned = true")
    verification = VerificationConfig(
        public_keys=tuple(public_keys),
        allow_unsigned=allow_unsigned,
        require_sha256=require_sha256,
    )

    # [supervisor]
    runtime_dir = _abs_dir(cp, "supervisor", "runtime_dir", DEFAULT_RUNTIME_DIR)
    # ipc:// paths are limited by sun_path (108 bytes).
    if len(str(runtime_dir)) > 70:
        raise ConfigError("supervisor", "runtime_dir", "path too long for unix sockets", "use a path under 70 characters")
    user = _user(cp, "user", "upparat")
    fetcher_user = _user(cp, "fetcher_user", "upparat-fetch")
    if user == fetcher_user:
        raise ConfigError("supervisor", "fetcher_user", f"is the same user as [supervisor] user ({user!r})",
                          "give the download process a user of its own (default upparat-fetch), so that a "
                          "compromised MQTT process cannot read or speak for it")
    supervisor = SupervisorConfig(user=user, fetcher_user=fetcher_user, runtime_dir=runtime_dir)
    return Config(service, broker, hooks, verification, supervisor)


def load(path: str | os.PathLike) -> tuple[Config, str]:
    """Read and parse a config file; returns the config and its text."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("file", None, f"cannot read {path} ({exc})", "pass a readable UTF-8 INI file with -c") from None
    return parse(text, str(path)), text
