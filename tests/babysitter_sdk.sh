#!/usr/bin/env bash
# Install the pinned babysitter SDK (npm package @a5c-ai/babysitter-sdk) for the real-SDK tests,
# if it is not there yet, and print the path of its `babysitter` binary on stdout.
#
#   EFFECTD_BABYSITTER_SDK_DIR   install prefix (default ~/.cache/effectd-test/babysitter-sdk);
#                                the binary is $DIR/node_modules/.bin/babysitter and the tests
#                                find it there.
#
# Idempotent: a second run only checks the installed version (~0.3 s). Needs node and npm and the
# npm registry; install scripts are not run (none is needed) and optional dependencies (a
# headless browser, ripgrep) are left out. Everything but the final path goes to stderr.
set -euo pipefail

VERSION="0.0.187"
PACKAGE="@a5c-ai/babysitter-sdk"
DIR="${EFFECTD_BABYSITTER_SDK_DIR:-${HOME}/.cache/effectd-test/babysitter-sdk}"
BIN="${DIR}/node_modules/.bin/babysitter"

installed_version() {
    [ -x "${BIN}" ] || return 0
    "${BIN}" --version 2>/dev/null || true
}

for tool in node npm; do
    if ! command -v "${tool}" >/dev/null 2>&1; then
        echo "babysitter_sdk.sh: ${tool} is not installed" >&2
        exit 1
    fi
done

mkdir -p "${DIR}"
# One installer at a time per prefix (parallel CI steps, several shells).
exec 9>"${DIR}/.install.lock"
if command -v flock >/dev/null 2>&1; then
    flock 9
fi

if [ "$(installed_version)" != "${VERSION}" ]; then
    echo "babysitter_sdk.sh: installing ${PACKAGE}@${VERSION} into ${DIR}" >&2
    npm install --prefix "${DIR}" --no-audit --no-fund --no-progress --loglevel=error \
        --omit=optional --ignore-scripts --save-exact "${PACKAGE}@${VERSION}" >&2
    got="$(installed_version)"
    if [ "${got}" != "${VERSION}" ]; then
        echo "babysitter_sdk.sh: expected ${PACKAGE} ${VERSION} at ${BIN}, found '${got}'" >&2
        exit 1
    fi
fi

echo "${BIN}"
