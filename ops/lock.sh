#!/usr/bin/env bash
# Regenerates the image's lock files from pyproject.toml (make lock), with hashes, for Python 3.11:
#   ops/requirements/worker.lock     the worker image: the base dependencies
#   ops/requirements/emulator.lock   the emulator image: base + the `speech` extra (pocketsphinx)
# Needs pip-tools (pip install pip-tools, in the dev extra) and the package index. Run it after
# changing dependencies in pyproject.toml, and now and then to pick up security releases; commit the
# result. CI does not regenerate the files (that needs the network): it checks that every
# dependency in pyproject.toml appears in them (tests/test_ops_files.py).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
COMPILE=${LOCK_COMPILER:-pip-compile}  # not PIP_*: pip reads every PIP_* variable as an option
common=(--quiet --strip-extras --generate-hashes --allow-unsafe --no-emit-index-url --no-emit-find-links
        --resolver=backtracking)
# A machine-wide pip constraint (PIP_CONSTRAINT, pip.conf) must not leak into the images' pins.
export PIP_CONSTRAINT=
"$COMPILE" "${common[@]}" -o ops/requirements/worker.lock pyproject.toml
"$COMPILE" "${common[@]}" --extra speech -o ops/requirements/emulator.lock pyproject.toml
echo "wrote ops/requirements/worker.lock and ops/requirements/emulator.lock"
