"""The Docker Compose trial (docker-compose.yml, docker/trial/, docs/local-trial.md)
without Docker: no engine runs on the machines this suite runs on, so this
checks what the trial is made of against the code that will read it — the
compose commands against the programs' own argument parsers, the trial's
configuration through upparat's config parser, the hooks it names, and
job.json through the device's document parser and verification policy — and
then runs the trial's job document with the trial's hooks through the real
four processes."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import yaml

from tests.support import running_sandbox
from upparat import config as config_mod
from upparat import release as release_mod
from upparat import verify
from upparat.devtools import jobs_emulator

ROOT = Path(__file__).resolve().parents[2]
TRIAL = ROOT / "docker" / "trial"
TRIAL_STATE = "/var/lib/upparat-trial"


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def trial_config() -> config_mod.Config:
    return config_mod.parse((TRIAL / "upparat.conf").read_text(), "docker/trial/upparat.conf", check_files=False)


def trial_job() -> dict:
    return json.loads((TRIAL / "job.json").read_text())


def test_the_compose_file_runs_the_four_parts_with_arguments_their_programs_accept():
    services = compose()["services"]
    assert {"mosquitto", "emulator", "files", "upparat"} <= set(services)
    emulator = services["emulator"]["command"]
    assert emulator[0] == "/src/.venv/bin/upparat-jobs-emulator"
    with pytest.raises(SystemExit) as stopped:  # argparse: exit 0 for --help, 2 for an unknown argument
        jobs_emulator.main(emulator[1:] + ["--help"])
    assert stopped.value.code == 0
    args = dict(zip(emulator[1::2], emulator[2::2]))
    cfg = trial_config()
    assert (args["--mqtt-host"], int(args["--mqtt-port"])) == (cfg.broker.host, cfg.broker.port)
    files = services["files"]["command"]
    assert args["--presign-base"] == f"http://127.0.0.1:{files[files.index('http.server') + 1]}"
    # every part shares the mosquitto service's network namespace: 127.0.0.1 reaches them all
    assert all(services[name]["network_mode"] == "service:mosquitto" for name in ("emulator", "files", "upparat"))


def test_the_trial_configuration_parses_and_names_the_trials_hooks():
    cfg = trial_config()
    assert cfg.verification.allow_unsigned and not cfg.verification.public_keys
    script = "\n".join(compose()["services"]["upparat"]["command"])
    assert "/trial/upparat.conf /etc/upparat/upparat.conf" in script
    for name in ("version", "install", "restart", "ready"):
        configured = getattr(cfg.hooks, name)
        assert configured == Path("/usr/lib/upparat/hooks") / name  # where the compose command installs them
        hook = TRIAL / "hooks" / name
        assert hook.is_file() and os.access(hook, os.X_OK), hook


def test_the_trial_job_is_a_valid_document_that_the_trial_device_accepts():
    job = trial_job()
    assert job["things"] == [trial_config().broker.thing_name]
    document = dict(job["document"])
    document["file"] = jobs_emulator.fake_presigner("http://127.0.0.1:8000")(
        document["file"].removeprefix(release_mod.PLACEHOLDER).removesuffix("}"))
    cfg = trial_config()
    release, url = release_mod.parse_document(document, cfg.verification.require_sha256)
    policy = verify.Policy(allow_unsigned=cfg.verification.allow_unsigned,
                           require_sha256=cfg.verification.require_sha256)
    assert verify.release_failure(release, [], policy) is None
    served = (TRIAL / "files" / url.split("?")[0].rsplit("/", 1)[-1]).read_bytes()
    assert (release.sha256, release.size) == (hashlib.sha256(served).hexdigest(), len(served))


@pytest.mark.skipif(os.geteuid() != 0, reason="the trial's configuration uses the default (root's) directories")
def test_the_trial_job_with_the_trial_hooks_succeeds_through_the_real_processes(world_tmp):
    hooks = {name: (TRIAL / "hooks" / name).read_text().replace(TRIAL_STATE, "{base}/state/trial")
             for name in ("version", "install", "restart", "ready")}
    job = trial_job()
    with running_sandbox(world_tmp / "box", hooks=hooks, seed_style=True, signing=False,
                         allow_unsigned=True) as box:
        name = "fw-2.0.0.bin"
        box.add_file(name, (TRIAL / "files" / name).read_bytes())
        # seed style: the default state directories outlive this test, so a job id of its own each run
        job_id = f"{job['jobId']}-{os.urandom(4).hex()}"
        box.create_job(job_id, job["document"])
        final = box.wait_for_job(job_id, timeout=60)
        assert (final["status"], final["statusDetails"]["state"]) == ("SUCCEEDED", "complete_ready"), \
            box.logs()[-4000:]
        assert box.path("state", "trial", "installed.bin").read_bytes() == (TRIAL / "files" / name).read_bytes()
        assert box.path("state", "trial", "version").read_text().strip() == "2.0.0"
