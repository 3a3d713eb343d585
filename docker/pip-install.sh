#!/bin/sh
# `pip install "$@"` inside an image build. When the build secret `extra_ca` is given (a PEM
# bundle: a proxy's or a company's CA), pip trusts it on top of the image's own bundle. The
# secret is mounted for this one RUN only and never lands in a layer; no host pip config is used.
set -eu
if [ -s /run/secrets/extra_ca ]; then
    bundle="$(mktemp)"
    cat /etc/ssl/certs/ca-certificates.crt /run/secrets/extra_ca >"$bundle" 2>/dev/null \
        || cp /run/secrets/extra_ca "$bundle"
    export PIP_CERT="$bundle"
fi
status=0
"$VIRTUAL_ENV/bin/pip" install --progress-bar off "$@" || status=$?
[ -n "${bundle:-}" ] && rm -f "$bundle"
exit "$status"
