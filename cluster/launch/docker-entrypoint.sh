#!/bin/sh
# Entrypoint of the facegen image: `docker run IMAGE generate job.yaml` runs `facegen generate job.yaml`;
# a command that exists in the image (`ray start …`, `bash`, `python …`, as the Ray cluster launcher and
# KubeRay run) is executed as it is.
set -e
if [ "$#" -eq 0 ]; then
    exec facegen --help
fi
case "$1" in
    -*) exec facegen "$@" ;;
esac
if command -v "$1" >/dev/null 2>&1; then
    exec "$@"
fi
exec facegen "$@"
