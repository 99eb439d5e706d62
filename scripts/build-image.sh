#!/usr/bin/env bash
# Build the rule-sidecar image with podman without pulling anything, then run it once.
#
#   sudo scripts/build-image.sh            # needs root (debootstrap, rootful podman)
#
# 1. base:  a local base image localhost/rule-sidecar-base:bookworm, made once with
#           debootstrap (Debian bookworm minbase + python3.11 + python3-venv from Debian's
#           packages) and `podman import`ed; reused when it exists (REBUILD_BASE=1 redoes it).
# 2. build: `podman build --isolation=chroot --pull=never` with BASE_IMAGE set to it.
# 3. check: user, labels, no compiler and no pip in the image, its size.
# 4. run:   `podman run --read-only` with only /tmp writable, every capability dropped,
#           on rules big enough to go through the reload worker (forkserver); probe
#           /health/hot-reload with curl, then stop it with SIGTERM and expect exit 0.
#
# Needs: podman, buildah, runc, debootstrap, curl (Debian: apt-get install -y podman
# buildah runc debootstrap curl). The Debian mirror is the one apt already uses here
# (read from /etc/apt/sources.list*), or DEBIAN_MIRROR. The build itself installs the
# Python dependencies from the package index pip reaches (wheels only).
#
# Settings (environment): IMAGE, BASE_IMAGE, DEBIAN_MIRROR, WORK_DIR, PORT, REBUILD_BASE,
# CA_BUNDLE (the host's CA bundle, lent to the build's RUN steps; empty for none),
# KEEP_IMAGE=0 (remove the built image at the end).
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-localhost/rule-sidecar:dev}
BASE_IMAGE=${BASE_IMAGE:-localhost/rule-sidecar-base:bookworm}
WORK_DIR=${WORK_DIR:-/var/tmp/rule-sidecar-image}
PORT=${PORT:-18080}
REBUILD_BASE=${REBUILD_BASE:-0}
KEEP_IMAGE=${KEEP_IMAGE:-1}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
SUITE=bookworm
CONTAINER=rule-sidecar-probe-$$

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'build-image: %s\n' "$*" >&2; exit 1; }

# Run a step and report how long it took.
declare -a TIMINGS=()
step() {
    local name=$1 start end
    shift
    log "$name"
    start=$(date +%s.%N)
    "$@"
    end=$(date +%s.%N)
    TIMINGS+=("$(printf '%-28s %7.1f s' "$name" "$(awk -v a="$start" -v b="$end" 'BEGIN { print b - a }')")")
}

[ "$(id -u)" -eq 0 ] || die "run as root (debootstrap and rootful podman)"
for tool in podman runc debootstrap curl tar; do
    command -v "$tool" >/dev/null || die "$tool is missing (apt-get install -y podman buildah runc debootstrap curl)"
done

mkdir -p "$WORK_DIR"

# podman's settings for this script only: runc (Debian's podman prefers crun, which may
# be absent), cgroupfs and file events (no systemd here), and ulimits below the
# machine's hard limits (podman's default nofile of 1048576 may exceed them).
nofile=$(ulimit -Hn)
[ "$nofile" = unlimited ] && nofile=1048576
[ "$nofile" -gt 65536 ] && nofile=65536
nproc=$(ulimit -Hu)
[ "$nproc" = unlimited ] && nproc=4096
[ "$nproc" -gt 4096 ] && nproc=4096
cat >"$WORK_DIR/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=${nofile}:${nofile}", "nproc=${nproc}:${nproc}"]
log_driver = "k8s-file"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
export CONTAINERS_CONF="$WORK_DIR/containers.conf"

# The Debian mirror apt uses for the main suite (one-line or deb822 sources).
debian_mirror() {
    local file uri
    for file in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$file" ] || continue
        uri=$(awk -v suite="$SUITE" '$1 == "deb" {
                for (i = 2; i < NF; i++) if ($i ~ /^https?:\/\//) { if ($(i + 1) == suite) { print $i; exit } ; break }
              }' "$file")
        [ -n "$uri" ] && { echo "$uri"; return; }
    done
    for file in /etc/apt/sources.list.d/*.sources; do
        [ -f "$file" ] || continue
        uri=$(awk -v suite="$SUITE" 'BEGIN { RS = ""; FS = "\n" } {
                uris = ""; ok = 0
                for (i = 1; i <= NF; i++) {
                    if ($i ~ /^URIs:/) { split($i, u, " "); uris = u[2] }
                    if ($i ~ /^Suites:/) { n = split($i, s, " "); for (j = 2; j <= n; j++) if (s[j] == suite) ok = 1 }
                }
                if (ok && uris != "") { print uris; exit }
              }' "$file")
        [ -n "$uri" ] && { echo "$uri"; return; }
    done
}

make_base() {
    local mirror=${DEBIAN_MIRROR:-$(debian_mirror)}
    [ -n "$mirror" ] || die "no Debian $SUITE mirror in /etc/apt/sources.list*: set DEBIAN_MIRROR"
    local rootfs="$WORK_DIR/rootfs"
    rm -rf "$rootfs"
    log "debootstrap $SUITE from $mirror"
    # ca-certificates: Debian's pip verifies TLS against the system's CA bundle.
    debootstrap --variant=minbase --include=python3.11,python3-venv,ca-certificates \
        "$SUITE" "$rootfs" "$mirror" >"$WORK_DIR/debootstrap.log" 2>&1 \
        || { tail -n 30 "$WORK_DIR/debootstrap.log" >&2; die "debootstrap failed (log: $WORK_DIR/debootstrap.log)"; }
    chroot "$rootfs" apt-get clean
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
        "$rootfs"/var/log/* "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* \
        "$rootfs"/usr/share/info/* "$rootfs"/tmp/* "$rootfs"/var/tmp/*
    tar --numeric-owner --xattrs -C "$rootfs" -c . \
        | podman import \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'ENV LANG=C.UTF-8' \
            --change 'CMD ["python3"]' \
            - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
}

build_image() {
    local version
    version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n 1)
    # The machine's CA bundle, bind-mounted over the base's for the RUN steps only (it is
    # not committed to any layer): where TLS to the package index goes through an
    # intercepting proxy, its CA is in the host's bundle, not in the fresh base's.
    # Debian's pip (the debootstrap base) verifies against that system bundle.
    local ca_mount=()
    [ -f "$CA_BUNDLE" ] && ca_mount=(--volume "$CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro")
    podman build --isolation=chroot --pull=never "${ca_mount[@]}" \
        --build-arg BASE_IMAGE="$BASE_IMAGE" \
        --build-arg PYTHON=python3 \
        --build-arg VERSION="$version" \
        --build-arg REVISION="$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
        --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
        --tag "$IMAGE" . >"$WORK_DIR/build.log" 2>&1 \
        || { tail -n 40 "$WORK_DIR/build.log" >&2; die "podman build failed (log: $WORK_DIR/build.log)"; }
}

check_image() {
    local user
    user=$(podman image inspect --format '{{.Config.User}}' "$IMAGE")
    [ "$user" = "10001:10001" ] || die "image user is '$user', not 10001:10001"
    podman image inspect --format '{{json .Config.Entrypoint}} {{json .Config.ExposedPorts}}' "$IMAGE"
    podman image inspect --format '{{index .Labels "org.opencontainers.image.version"}} {{index .Labels "org.opencontainers.image.revision"}}' "$IMAGE"
    # No shell is used: python itself looks for what must not be there.
    podman run --rm --network=none --entrypoint python3 "$IMAGE" -c '
import grp, os, pwd, shutil, sys
found = [c for c in ("gcc", "cc", "c++", "g++", "clang", "make", "pip", "pip3") if shutil.which(c)]
if found:
    sys.exit(f"not expected in the runtime image: {found}")
user = pwd.getpwuid(os.getuid())
print(f"runs as {user.pw_name} {os.getuid()}:{os.getgid()} ({grp.getgrgid(os.getgid()).gr_name}),",
      "python", sys.version.split()[0], "at", os.path.realpath(sys.executable))
# The ConfigMap API source still imports with kubernetes/aio removed.
import sidecar.sources.kubernetes
'
}

# A rules directory holding one generated file over the loader's 256 KiB offload
# threshold, so the initial load runs in the reload worker (a forkserver process).
make_rules() {
    local dir="$WORK_DIR/rules" i
    rm -rf "$dir"
    mkdir -p "$dir"
    {
        printf 'apiVersion: rule-sidecar/v1\nkind: RuleSet\nmetadata:\n  id: big-probe\n'
        printf 'spec:\n  decisions:\n    - {decision: deny, min_points: 100000}\n'
        printf '  default_decision: allow\n  rules:\n'
        for ((i = 0; i < 3500; i++)); do
            printf '    - id: big-probe.rule-%05d\n      condition: input.amount > %d.0\n      points: 1\n' "$i" "$i"
        done
    } >"$dir/big.yaml"
    chmod -R a+rX "$dir"
}

run_image() {
    podman run --detach --name "$CONTAINER" \
        --read-only --read-only-tmpfs=false --tmpfs /tmp:rw,mode=1777,size=16m \
        --cap-drop=ALL --security-opt=no-new-privileges \
        --network=host \
        --volume "$WORK_DIR/rules:/rules:ro" \
        --env RULE_SIDECAR_RULES_DIR=/rules \
        --env RULE_SIDECAR_PORT="$PORT" \
        "$IMAGE" >/dev/null
    local i status=000
    for ((i = 0; i < 120; i++)); do
        status=$(curl -s -o "$WORK_DIR/health.json" -w '%{http_code}' \
            "http://127.0.0.1:$PORT/health/hot-reload" || true)
        [ "$status" = 200 ] && break
        [ "$(podman inspect --format '{{.State.Running}}' "$CONTAINER")" = true ] || break
        sleep 0.5
    done
    if [ "$status" != 200 ]; then
        podman logs "$CONTAINER" >&2 || true
        die "/health/hot-reload answered $status"
    fi
    log "/health/hot-reload: $status $(head -c 300 "$WORK_DIR/health.json")"
    curl -sf "http://127.0.0.1:$PORT/api/v1/rulesets/big-probe" >/dev/null \
        || die "the large ruleset is not served"
    curl -sf "http://127.0.0.1:$PORT/ui/dashboard.js" >/dev/null \
        || die "the dashboard's files are not in the image"
    if podman logs "$CONTAINER" 2>&1 | grep -q 'reload worker failed'; then
        podman logs "$CONTAINER" >&2
        die "the reload worker failed in the read-only container"
    fi
    # What the container wrote: only the forkserver's directory in /tmp.
    podman exec "$CONTAINER" python3 -c 'import os; print("/tmp holds", os.listdir("/tmp"))'
    podman stop --time 15 "$CONTAINER" >/dev/null
    local code
    code=$(podman inspect --format '{{.State.ExitCode}}' "$CONTAINER")
    [ "$code" = 0 ] || { podman logs "$CONTAINER" >&2; die "exit code $code after SIGTERM"; }
    log "stopped with SIGTERM: exit code $code"
}

cleanup() {
    podman rm --force "$CONTAINER" >/dev/null 2>&1 || true
    if [ "$KEEP_IMAGE" = 0 ]; then podman rmi --force "$IMAGE" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

total_start=$(date +%s)
if [ "$REBUILD_BASE" = 1 ] || ! podman image exists "$BASE_IMAGE"; then
    step "base (debootstrap + import)" make_base
else
    log "reusing $BASE_IMAGE"
fi
step "podman build" build_image
step "image checks" check_image
make_rules
step "run + probe + SIGTERM" run_image

size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
base_size=$(podman image inspect --format '{{.Size}}' "$BASE_IMAGE")
printf '\n%s: %s MB (base %s: %s MB, added by the image: %s MB)\n' \
    "$IMAGE" "$((size / 1000000))" "$BASE_IMAGE" "$((base_size / 1000000))" \
    "$(((size - base_size) / 1000000))"
printf '%s\n' "${TIMINGS[@]}"
printf '%-28s %7d s\n' total "$(($(date +%s) - total_start))"
