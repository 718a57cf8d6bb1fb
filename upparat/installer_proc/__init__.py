"""upparat-installer: the one process that stays root. It verifies releases
with its own keys, stages the files it verified itself, and runs the device
owner's hooks. It treats its only peer, the broker, as possibly compromised,
and the downloaded file as the fetcher's, until it has taken it over.

Trusts: its own root-owned configuration (hook commands, bounds, staging
directory, verification policy), the public keys the supervisor read for it
(or it read itself, standalone), and its own root-only staging directory
with its record ``state.json``. Nothing else.

Accepts: on a ROUTER socket at ``<runtime_dir>/installer/installer.sock``
(0660, root and the broker's group; the fetcher's user cannot reach it), the
requests of ``upparat.ipc.installer_protocol`` and nothing else: ping,
open_job, query_job, stage, run_hook, discard. Each one is decoded with
limits by ``upparat.ipc.wire`` (malformed: refused and logged), then checked
against the one literal allow-list in ``allow.py`` (phase, once-only steps,
busy), then answered by ``Installer.answer_<type>``. A refused request is
refused whole; nothing of it is done.

Promises (docs/contracts.md, Promises; docs/security.md, "The installer boundary"):
1. It runs only the hooks named in its config, chosen by hook name, as an
   argv list with a fixed environment, stdin ``/dev/null``, cwd ``/``, in a
   process group of its own that dies with the installer; each hook path is
   re-checked (only root can change it) right before every run. Every hook
   argument comes from its own record of the job, never from a message.
2. A release is verified by the installer itself when the job is opened:
   its signed statement with its own keys (unsigned only with
   ``[verification] allow_unsigned``), and its ``serial`` against the highest
   signed serial installed (lower: ``rollback_refused``).
3. The install hook only ever gets ``<staging>/<job_id>.<execution>``: the
   download it took out of the fetcher's reach (in place, proven writer-free
   with read leases, or one pass that copies and hashes) and verified from
   its own read. Nothing can change it until the end of the install hook.
4. Its main loop survives any input, bounded in memory; a hook or staging
   runs in a thread and reports back; the loop answers within a second.
5. Its record is written before it acts and after each outcome (atomically,
   fsynced), so that after a crash or a power loss it tells the broker what
   was really done: ``installing`` becomes ``install_interrupted`` (install
   may run again), ``restarting`` becomes ``restarted``; leftover hook
   processes are killed by their marker; stray staged files are deleted.
6. SIGTERM stops a running hook (its whole group) and exits 0.
"""
