"""The shared parts of every stage: storage, the stage kit, tracking, Ray, configuration."""

import os as _os
import sys as _sys

# Ray reads these when it is imported, so they are set here, before any of ours imports it: every
# worker's line shown as it comes (no "[repeated Nx]" deduplication with its coloured notice), and
# no colour codes in a console piped to a file.
_os.environ.setdefault("RAY_DEDUP_LOGS", "0")
if not (_sys.stdout.isatty() and _sys.stderr.isatty()):
    _os.environ.setdefault("RAY_COLOR_PREFIX", "0")
