"""The supervisor -> child settings envelope (upparat.ipc.settings.ChildSettings):
it round-trips, and a field of the wrong type is a ValueError naming it, never
settings that fail later in the child (found by tests/fuzz/test_decoders_fuzz.py)."""

import json
from pathlib import Path

import pytest

from upparat.ipc.settings import ChildSettings, Identities, Layout

LAYOUT = Layout(runtime_dir=Path("/run/u"), download_dir=Path("/tmp/u"), staging_dir=Path("/s"),
                broker_state_dir=Path("/b"), fetcher_state_dir=Path("/f"))
IDS = Identities(True, "upparat", 990, 990, "upparat-fetch", 991, 991)
GOOD = ChildSettings(role="broker", config_text="[broker]\n", config_path="/etc/u.conf", verbose=False,
                     thing_name="t", layout=LAYOUT, ids=IDS, tls={"cafile": "PEM"}, public_keys_pem=("PEM",))


def with_field(path, value) -> bytes:
    body = json.loads(GOOD.encode())
    target = body
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return json.dumps(body).encode()


def test_the_envelope_round_trips():
    assert ChildSettings.decode(GOOD.encode()) == GOOD


@pytest.mark.parametrize("path, value, reason", [
    (("config_text",), None, "config_text is not a string"),
    (("role",), 7, "role is not a string"),
    (("verbose",), "yes", "verbose is not true or false"),
    (("thing_name",), 1, "thing_name is not a string"),
    (("ids", "separated"), 1, "ids.separated is not true or false"),
    (("ids", "broker_uid"), "990", "ids.broker_uid is not a user or group id"),
    (("ids", "fetcher_gid"), -1, "ids.fetcher_gid is not a user or group id"),
    (("ids", "fetcher_user"), None, "ids.fetcher_user is not a string"),
    (("tls",), {"cafile": 1}, "tls is not a map of strings"),
    (("public_keys_pem",), [None], "public_keys_pem is not a list of strings"),
])
def test_settings_envelope_with_wrongly_typed_fields_is_refused(path, value, reason):
    with pytest.raises(ValueError, match=reason):
        ChildSettings.decode(with_field(path, value))
