"""The supervisor -> child boundary: every setting a child needs, decided once.

Every computed default (the download directory when ``download_location`` is
not set, the users' uids and gids, the socket and state directories) is
decided here, by ``resolve_layout`` and ``resolve_identities``, exactly once:
by the supervisor, which hands the result to each child in a versioned
envelope on its stdin (``ChildSettings``), or, in per-process systemd mode,
by each unit's process calling the same functions with the same fixed inputs.
No child ever derives a path from its own uid or environment, so all four
processes agree on where the sockets and files are.

Directory layout (docs/architecture.md has the reasons for each mode):

    <runtime_dir>/              root        0755
        installer/              root:broker 0750   installer.sock 0660
        fetcher/                fetcher:broker 2750  fetcher.sock 0660 (group broker)
        control/                root:broker 0750   control.sock 0660 (upparatctl)
    <download_location>/upparat fetcher     0700   partial and finished downloads
    <staging_location>          root        0700   staged files, installer state
    <state_location>/broker     broker      0700   status outbox
    <state_location>/fetcher    fetcher     0700   resume records

Only the broker's group can traverse ``installer/``, ``fetcher/`` and
``control/``; the fetcher reaches no root socket at all.
"""

from __future__ import annotations

import grp
import pwd
from dataclasses import asdict, dataclass, field
from pathlib import Path

from upparat import safejson
from upparat.config import Config, ConfigError

ENVELOPE_VERSION = 2
MAX_ENVELOPE = 1024 * 1024
ROLES = ("broker", "fetcher", "installer")
STANDALONE_TMPDIR = "/tmp"  # per-process units: the fixed value every unit computes the same way


@dataclass(frozen=True)
class Layout:
    """Every directory and socket, as absolute paths."""

    runtime_dir: Path
    download_dir: Path
    staging_dir: Path
    broker_state_dir: Path
    fetcher_state_dir: Path

    @property
    def installer_socket(self) -> Path:
        return self.runtime_dir / "installer" / "installer.sock"

    @property
    def fetcher_socket(self) -> Path:
        return self.runtime_dir / "fetcher" / "fetcher.sock"

    @property
    def control_socket(self) -> Path:
        return self.runtime_dir / "control" / "control.sock"

    @property
    def installer_endpoint(self) -> str:
        return f"ipc://{self.installer_socket}"

    @property
    def fetcher_endpoint(self) -> str:
        return f"ipc://{self.fetcher_socket}"


@dataclass(frozen=True)
class Identities:
    """Who runs the unprivileged children. ``separated`` False: a development
    run as one user, where all four processes run as that user."""

    separated: bool
    broker_user: str
    broker_uid: int
    broker_gid: int
    fetcher_user: str
    fetcher_uid: int
    fetcher_gid: int


def resolve_layout(cfg: Config, tmpdir: str) -> Layout:
    """All directories from the config; ``tmpdir`` is the one computed input
    (the supervisor's system temp directory), used only when
    ``[service] download_location`` is not set (upparat 1.x's default)."""
    service = cfg.service
    location = service.download_location or Path(tmpdir)
    download_dir = location / "upparat"
    if service.staging_location == download_dir or download_dir in service.staging_location.parents:
        raise ConfigError("service", "staging_location", f"{service.staging_location} lies inside the download "
                          f"directory {download_dir}", "choose a root-only directory elsewhere")
    return Layout(
        runtime_dir=cfg.supervisor.runtime_dir,
        download_dir=download_dir,
        staging_dir=service.staging_location,
        broker_state_dir=service.state_location / "broker",
        fetcher_state_dir=service.state_location / "fetcher",
    )


def _account(cfg_key: str, name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        default_fix = {
            "user": "useradd --system --user-group --no-create-home --shell /usr/sbin/nologin upparat",
            "fetcher_user": "useradd --system --user-group --no-create-home --shell /usr/sbin/nologin upparat-fetch",
        }[cfg_key]
        raise ConfigError("supervisor", cfg_key, f"no such user {name!r}",
                          f"create it ({default_fix}) or name another user") from None


def resolve_identities(cfg: Config, am_root: bool, uid: int, gid: int, name: str) -> Identities:
    """The two unprivileged users, checked; or, not root, this user for all."""
    if not am_root:
        return Identities(False, name, uid, gid, name, uid, gid)
    broker = _account("user", cfg.supervisor.user)
    fetcher = _account("fetcher_user", cfg.supervisor.fetcher_user)
    for key, acct in (("user", broker), ("fetcher_user", fetcher)):
        if acct.pw_uid == 0 or acct.pw_gid == 0:
            raise ConfigError("supervisor", key, f"{acct.pw_name!r} has uid or primary gid 0",
                              "name an unprivileged system user with its own primary group")
    if broker.pw_uid == fetcher.pw_uid:
        raise ConfigError("supervisor", "fetcher_user", f"{fetcher.pw_name!r} has the same uid as "
                          f"{broker.pw_name!r}", "give the download process a user of its own")
    if broker.pw_gid == fetcher.pw_gid:
        raise ConfigError("supervisor", "fetcher_user", f"{fetcher.pw_name!r} and {broker.pw_name!r} share "
                          "their primary group, which opens the installer's socket to the download process",
                          "give each user its own primary group (useradd --user-group)")
    broker_group = grp.getgrgid(broker.pw_gid)
    if fetcher.pw_name in broker_group.gr_mem:
        raise ConfigError("supervisor", "fetcher_user", f"{fetcher.pw_name!r} is a member of group "
                          f"{broker_group.gr_name!r}, which may reach the installer's socket",
                          f"gpasswd -d {fetcher.pw_name} {broker_group.gr_name}")
    return Identities(True, broker.pw_name, broker.pw_uid, broker.pw_gid,
                      fetcher.pw_name, fetcher.pw_uid, fetcher.pw_gid)


@dataclass(frozen=True)
class ChildSettings:
    """The envelope the supervisor writes to a child's stdin (version 2)."""

    role: str
    config_text: str
    config_path: str
    verbose: bool
    thing_name: str | None
    layout: Layout
    ids: Identities
    tls: dict[str, str] = field(default_factory=dict)  # [broker] cafile/certfile/keyfile PEM text (broker only)
    public_keys_pem: tuple[str, ...] = ()  # [verification] public_keys (the installer only)

    def encode(self) -> bytes:
        body = asdict(self)
        body["v"] = ENVELOPE_VERSION
        body["layout"] = {k: str(v) for k, v in body["layout"].items()}
        body["public_keys_pem"] = list(self.public_keys_pem)
        return safejson.dumps(body)

    @classmethod
    def decode(cls, data: bytes) -> "ChildSettings":
        """Raises ValueError naming what is wrong (the envelope comes from root,
        but a version mismatch after an upgrade must be a clear error)."""
        body = safejson.loads(data, max_bytes=MAX_ENVELOPE, max_depth=4, max_string=MAX_ENVELOPE)
        if not isinstance(body, dict) or body.get("v") != ENVELOPE_VERSION:
            raise ValueError(f"settings envelope version is not {ENVELOPE_VERSION} (supervisor and child "
                             "from different Upparat versions?)")
        try:
            layout = Layout(**{k: Path(v) for k, v in body["layout"].items()})
            ids = Identities(**body["ids"])
            settings = cls(
                role=body["role"], config_text=body["config_text"], config_path=body["config_path"],
                verbose=body["verbose"], thing_name=body["thing_name"], layout=layout, ids=ids,
                tls=dict(body["tls"]), public_keys_pem=tuple(body["public_keys_pem"]))
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"settings envelope is malformed ({exc})") from None
        problem = _envelope_problem(settings)
        if problem:
            raise ValueError(f"settings envelope is malformed ({problem})")
        if settings.role not in ROLES:
            raise ValueError(f"unknown role {settings.role!r}")
        return settings


def _envelope_problem(s: ChildSettings) -> str | None:
    """The first field whose value is not of its declared type, or None."""
    for name in ("role", "config_text", "config_path"):
        if not isinstance(getattr(s, name), str):
            return f"{name} is not a string"
    if type(s.verbose) is not bool:
        return "verbose is not true or false"
    if s.thing_name is not None and not isinstance(s.thing_name, str):
        return "thing_name is not a string"
    ids = s.ids
    if type(ids.separated) is not bool:
        return "ids.separated is not true or false"
    for name in ("broker_user", "fetcher_user"):
        if not isinstance(getattr(ids, name), str):
            return f"ids.{name} is not a string"
    for name in ("broker_uid", "broker_gid", "fetcher_uid", "fetcher_gid"):
        value = getattr(ids, name)
        if type(value) is not int or value < 0:
            return f"ids.{name} is not a user or group id"
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in s.tls.items()):
        return "tls is not a map of strings"
    if not all(isinstance(pem, str) for pem in s.public_keys_pem):
        return "public_keys_pem is not a list of strings"
    return None
