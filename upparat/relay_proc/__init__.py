"""relay_proc: sends the error records of the root processes to Sentry.

Contract. Started by the supervisor only when ``[service] sentry`` is set, as
the broker's unprivileged user, with no_new_privs and no capabilities (checked
first, like every unprivileged child). It trusts only its stdin, which the
root supervisor writes: one hello line (DSN, thing name), then one Problem
line (``upparat.ipc.status``) per error record of the installer or the
supervisor. It sends each to Sentry tagged with the role and thing name, and
nothing else. It never writes a file and answers nobody. Exists so that no
root process loads sentry-sdk or any network code; the unprivileged broker
and fetcher report their own errors directly (``launch.init_sentry``).
"""
