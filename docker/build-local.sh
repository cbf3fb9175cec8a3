#!/usr/bin/env bash
# Build the CPU image (edgepack's engine, no torch) and answer one completion from it per
# bundle, on a Debian/Ubuntu machine with no Docker engine and no internet beyond the
# Debian and PyPI package registries.
#
#   sudo docker/build-local.sh [BUNDLE_DIR...]   (as root; BUNDLE_DIR defaults to a tiny
#                                                 random-weight 8-bit bundle made on the spot)
#
# Steps, each skipped when its result is already there (so a second run takes seconds):
#   1. podman, buildah, mmdebstrap and runc from apt;
#   2. Debian base images made offline with mmdebstrap and `podman import`ed: the final
#      image's with python3 only (no docs, man pages or locales), the build stage's with
#      python3-venv, gcc and Python's headers, for edgepack.runtime.engine._engine;
#   3. every wheel the image needs, downloaded on the host (pip inside a build has no TLS
#      here): edgepack's dependencies with its `serve` extra and its build backend
#      (EDGEPACK_EXTRAS=serve,torch adds the torch backend and torch's CPU build);
#   4. `podman build --isolation=chroot` of docker/Dockerfile.cpu with pip --no-index;
#   5. per bundle, a container with it mounted at /bundle, then `curl /v1/completions`.
#
# Environment: EDGEPACK_BUILD_DIR (work folder, default /var/tmp/edgepack-build),
# EDGEPACK_IMAGE (default localhost/edgepack:cpu), EDGEPACK_EXTRAS (default serve),
# EDGEPACK_API_KEY (default: a random one per run), EDGEPACK_PORT (default 8765),
# PYTHON (default: the repository's .venv/bin/python, else python3), KEEP_RUNNING=1 to
# leave the container up, SKIP_RUN=1 to only build.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${EDGEPACK_BUILD_DIR:-/var/tmp/edgepack-build}
IMAGE=${EDGEPACK_IMAGE:-localhost/edgepack:cpu}
BASE=localhost/edgepack-runtime-base:bookworm
BUILD_BASE=localhost/edgepack-build-base:bookworm-venv  # + venv, a C compiler and Python's headers
PORT=${EDGEPACK_PORT:-8765}
NAME=edgepack-local-$PORT
EXTRAS=${EDGEPACK_EXTRAS:-serve}
TORCH=torch==2.13.0+cpu  # only with EXTRAS=...,torch
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi

log() { printf '\n== %s\n' "$*" >&2; }
[ "$(id -u)" = 0 ] || { echo "build-local.sh: run as root (podman build --isolation=chroot needs it)" >&2; exit 1; }
mkdir -p "$WORK"

# --- 1. tools ---------------------------------------------------------------------------
if ! command -v podman >/dev/null || ! command -v mmdebstrap >/dev/null || ! command -v runc >/dev/null; then
    log "installing podman, buildah, mmdebstrap, runc"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman buildah mmdebstrap runc >/dev/null
fi
# Sandboxes refuse podman's default limits for root (nofile 1048576, nproc unlimited):
# raising a limit past the hard one needs CAP_SYS_RESOURCE. Stay under this shell's hard
# limits. runc, host networking and cgroupfs work where crun, netavark and systemd may not.
nofile=$(ulimit -Hn); nproc=$(ulimit -Hu)
{ [ "$nofile" = unlimited ] || [ "$nofile" -gt 4096 ]; } && nofile=4096
{ [ "$nproc" = unlimited ] || [ "$nproc" -gt 4096 ]; } && nproc=4096
export CONTAINERS_CONF=$WORK/containers.conf
cat >"$CONTAINERS_CONF" <<EOF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
pids_limit = 2048
netns = "host"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
podman() { command podman --runtime runc "$@"; }

# --- 2. base image ----------------------------------------------------------------------
make_base() {  # make_base IMAGE EXTRA_PACKAGES
    podman image exists "$1" && return
    log "making $1 with mmdebstrap (Debian bookworm, python3${2:+, $2})"
    # essential, not minbase: no apt, e2fsprogs or gpgv. The merged-usr hook installs
    # usr-is-merged, else init-system-helpers' "usrmerge | usr-is-merged" pulls in usrmerge
    # and with it perl (47 MB; the runtime base was 180 MB). libstdc++6: tokenizers, hf-xet
    # and pydantic-core link it. No documentation, man pages or translations: nothing reads them.
    mmdebstrap --variant=essential --format=tar --include="python3,libstdc++6,passwd,ca-certificates${2:+,$2}" \
        --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        bookworm "$WORK/base.tar.partial"
    mv "$WORK/base.tar.partial" "$WORK/base.tar"
    podman import --change 'CMD ["/bin/bash"]' "$WORK/base.tar" "$1" >/dev/null
    rm -f "$WORK/base.tar"
}
make_base "$BASE" ""
make_base "$BUILD_BASE" "python3-venv,python3-dev,gcc,libc6-dev"  # the build stage compiles edgepack.runtime.engine._engine

# --- 3. wheels --------------------------------------------------------------------------
CONTEXT=$WORK/context
WHEELS=$CONTEXT/docker/wheels
torch_wheel=""
case ",$EXTRAS," in *,torch,*) torch_wheel=$TORCH ;; esac
stamp=$(sha256sum <"$REPO/pyproject.toml" | cut -c1-16)-$EXTRAS-$torch_wheel
if [ "$(cat "$WHEELS/.stamp" 2>/dev/null)" != "$stamp" ]; then
    log "downloading wheels into $WHEELS"
    rm -rf "$WHEELS" && mkdir -p "$WHEELS"
    # The host runs the same Debian and Python (3.11, x86-64) as the image, so pip picks
    # wheels for it. setuptools and wheel build edgepack itself inside the image.
    "$PYTHON" -m pip download --disable-pip-version-check -q -d "$WHEELS" \
        ${torch_wheel:+"$torch_wheel"} "${REPO}[$EXTRAS]" "setuptools>=68" wheel
    echo "$stamp" >"$WHEELS/.stamp"
fi
# The source is staged fresh every run, so the image always holds the current code.
rm -rf "$CONTEXT/edgepack" "$CONTEXT/profiles" "$CONTEXT/docker/Dockerfile.cpu"
cp "$REPO/pyproject.toml" "$REPO/setup.py" "$REPO/README.md" "$CONTEXT/"
cp -r "$REPO/edgepack" "$CONTEXT/edgepack"
cp -r "$REPO/profiles" "$CONTEXT/profiles"
find "$CONTEXT/edgepack" -name __pycache__ -prune -exec rm -rf {} +
find "$CONTEXT/edgepack" -name "*.so" -delete  # built here for this machine; the image builds its own
cp "$REPO/docker/Dockerfile.cpu" "$CONTEXT/docker/"

# --- 4. image ---------------------------------------------------------------------------
# A build needs about 1 GB under podman's storage (the build stage with gcc, then the final
# image; ~4 GB with the torch extra). Say so before starting rather than fail half-way with ENOSPC.
store=$(podman info --format '{{.Store.GraphRoot}}')
mkdir -p "$store"
free_mb=$(df -Pm "$store" | awk 'NR==2 {print $4}')
need_mb=1024
[ -n "$torch_wheel" ] && need_mb=4096
if [ "$free_mb" -lt "$need_mb" ]; then
    echo "build-local.sh: only ${free_mb} MB free under $store; the build needs about $need_mb MB: free some (podman image prune; podman system df) and run again" >&2
    exit 1
fi
old_id=$(podman image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
log "building $IMAGE"
# --layers=false: no intermediate images are kept as cache. Every run stages fresh source,
# so cached layers past the base image could never be reused and only filled the disk
# (one run left ~3.3 GB of untagged images behind, and CI ran out of space).
podman build --isolation=chroot --format docker --network host --layers=false \
    --build-arg BASE_IMAGE="$BASE" --build-arg BUILD_IMAGE="$BUILD_BASE" --build-arg PIP_INSTALL_ARGS=--no-index \
    --build-arg EXTRAS="$EXTRAS" \
    -f "$CONTEXT/docker/Dockerfile.cpu" -t "$IMAGE" "$CONTEXT"
new_id=$(podman image inspect --format '{{.Id}}' "$IMAGE")
log "image $IMAGE: $(podman image inspect --format '{{.Size}}' "$IMAGE") bytes, user $(podman image inspect --format '{{.Config.User}}' "$IMAGE")"
# The previous build of this tag is now untagged: remove it (and only it), unless a
# container still uses it.
if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ]; then
    podman rmi "$old_id" >/dev/null 2>&1 || true
fi
[ "${SKIP_RUN:-0}" = 1 ] && exit 0

# --- 5. run and ask ---------------------------------------------------------------------
if [ "$#" = 0 ]; then
    tiny=$WORK/tiny-bundle
    if [ ! -f "$tiny/edgepack.json" ]; then
        log "packing a tiny random-weight bundle into $tiny"
        (cd "$REPO" && "$PYTHON" - "$tiny" <<'EOF'
import sys, tempfile
sys.path.insert(0, "tests")
from conftest import make_model, make_tokenizer  # the test suite's tiny Llama, no network
from edgepack.export.pack import pack

tokenizer = make_tokenizer()
with tempfile.TemporaryDirectory() as src:
    make_model("llama", len(tokenizer)).save_pretrained(src)
    tokenizer.save_pretrained(src)
    pack(src, sys.argv[1], bits=8)
EOF
        )
    fi
    set -- "$tiny"
fi
cleanup() { [ "${KEEP_RUNNING:-0}" = 1 ] || podman rm -f "$NAME" >/dev/null 2>&1 || true; }
trap cleanup EXIT  # also when `podman run` fails after creating the container
# The image binds 0.0.0.0, where serve refuses to start without a key.
KEY=${EDGEPACK_API_KEY:-sk-local-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')}
for BUNDLE in "$@"; do
    BUNDLE=$(cd "$BUNDLE" && pwd)
    chmod -R a+rX "$BUNDLE"  # the container runs as uid 10001
    podman rm -f "$NAME" >/dev/null 2>&1 || true
    log "running $IMAGE on $BUNDLE, port $PORT"
    podman run -d --name "$NAME" --network host -v "$BUNDLE:/bundle:ro" -e EDGEPACK_PORT="$PORT" \
        -e EDGEPACK_MODEL=/bundle -e EDGEPACK_API_KEY="$KEY" "$IMAGE" >/dev/null
    for _ in $(seq 1 120); do
        curl -fsS "http://127.0.0.1:$PORT/health" >/dev/null 2>&1 && break
        if [ "$(podman inspect -f '{{.State.Running}}' "$NAME" 2>/dev/null)" != true ]; then
            podman logs "$NAME" >&2 || true
            echo "build-local.sh: the container stopped" >&2
            exit 1
        fi
        sleep 1
    done
    curl -fsS "http://127.0.0.1:$PORT/health" >/dev/null || { podman logs "$NAME" >&2; exit 1; }
    # Without systemd podman cannot schedule HEALTHCHECK (it logs an error and runs on); run it once.
    log "HEALTHCHECK: $(podman healthcheck run "$NAME" && echo healthy)"
    log "POST /v1/completions"
    curl -fsS "http://127.0.0.1:$PORT/v1/completions" -H 'content-type: application/json' -H "Authorization: Bearer $KEY" \
        -d '{"prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}'
    echo
done
