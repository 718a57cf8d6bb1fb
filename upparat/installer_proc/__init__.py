"""upparat-installer: the one process that stays root. It runs the device
owner's hooks and stages the files they install.

Trusts: only its own root-owned configuration (the hook commands, the
retry/timeout bounds, the staging directory, the verification policy and
public keys), and the files in its own root-only staging directory.

Accepts: on a REP socket at ``<runtime_dir>/installer/installer.sock``
(0660, group ``[supervisor] group``), the messages of
``upparat.ipc.installer_protocol`` and nothing else: ping, query_hook,
run_hook, stage, discard. Every request is decoded and schema-checked by the
catalogue, then checked against the allow-list in ``allow.py`` (what is
permitted now, e.g. ``restart`` only after this job's install hook exited 0).
Anything else is refused whole, logged, and answered with ``refused``.

Promises (DESIGN.md section 3):
1. It runs only the commands named in its config, chosen by hook name, as an
   argv list with a clean environment, cwd ``/``, stdin ``/dev/null``, in a
   new session; never a shell, never a command or path from a message.
2. The install hook only ever gets ``<staging>/<job_id>``: a file the
   installer copied itself from ``<download_dir>/<job_id>`` (no symlinks, no
   peer-chosen path) into its 0700 directory and verified *there* (size,
   sha256, signature, by its own policy). Only root can change it afterwards.
3. Malformed, oversized, unknown or out-of-phase requests are refused and
   logged; the installer keeps running. One hook runs at a time; every hook
   attempt is bounded by ``[hooks] timeout`` and retries by ``max_retries``.
   SIGTERM stops a running hook (SIGTERM, then SIGKILL to its process group)
   and exits 0.
"""
