"""Exit codes and hook exit codes: the one written table (qmail qlx.h style)."""

# Process exit codes of every Upparat program.
EXIT_OK = 0  # clean stop (SIGTERM/SIGINT)
EXIT_FAILURE = 1  # anything else
EXIT_USAGE = 2  # bad command line or configuration; do not restart hot
EXIT_UNSAFE = 3  # a child found its privileges not dropped; never restart hot

# Exit codes of the device owner's hooks (docs/contracts.md, Hooks).
HOOK_DONE = 0  # done; for `version` the last non-empty stdout line is the version
HOOK_RETRY = 3  # try again after [hooks] retry_interval, at most [hooks] max_retries
# anything else: failed
