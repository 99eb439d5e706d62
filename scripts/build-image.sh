#!/usr/bin/env bash
# Build the rule-sidecar image with podman without pulling anything, then run it once.
#
#   sudo scripts/build-image.sh            # needs root (debootstrap, rootful podman)
#   scripts/build-image.sh --debian-mirror # print the Debian mirror it would use, and exit
#
# 1. base:  a local base image localhost/rule-sidecar-base:bookworm, made once and reused
#           when it exists (REBUILD_BASE=1 redoes it): debootstrap (Debian bookworm
#           minbase), then only the packages the image needs, and the packages owning the
#           libraries they load, are copied out (scripts/slim-base.py) and `podman
#           import`ed: python3.11 and its standard library, venv, the CA bundle, /bin/sh,
#           useradd. No apt, dpkg, perl or coreutils; no documentation or translations.
# 2. build: `podman build --isolation=chroot --pull=never` with BASE_IMAGE set to it.
# 3. check: user, labels, no compiler, pip or package manager in the image, every shared
#           library resolves, the API source's modules have byte code, its size.
# 4. run:   `podman run --read-only` with only /tmp writable, every capability dropped,
#           on rules big enough to go through the reload worker (forkserver); probe
#           /health/hot-reload with curl, then stop it with SIGTERM and expect exit 0.
#           Then once more with the Kubernetes API source and no API server: it must
#           start, answer /livez and report the API unreachable (not fail to import).
#
# Needs: podman, buildah, runc, debootstrap, curl (Debian: apt-get install -y podman
# buildah runc debootstrap curl). The Debian mirror is the one apt already uses here
# (asked of apt, so sources.list, *.list and deb822 *.sources files and APT_CONFIG all
# count), or DEBIAN_MIRROR. The build itself installs the Python dependencies from the
# package index pip reaches (wheels only).
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

# The Debian mirror apt uses here, asked of apt itself: it reads one-line and deb822
# sources as apt-get does (Types, Enabled, several URIs or suites, options, APT_CONFIG).
# A `deb` source for $SUITE first; else the main Debian archive of whatever release this
# machine runs (the same archive carries $SUITE). The formats are apt's, not expansions.
# shellcheck disable=SC2016
debian_mirror() {
    local uri
    uri=$(apt-get indextargets --no-release-info --format '$(TARGET_OF) $(RELEASE) $(REPO_URI)' \
        | awk -v suite="$SUITE" '$1 == "deb" && $2 == suite && $3 ~ /^(https?|file):/ { print $3; exit }') \
        || true
    if [ -z "$uri" ]; then
        uri=$(apt-get indextargets --format '$(TARGET_OF) $(ORIGIN) $(LABEL) $(REPO_URI)' \
            | awk '$1 == "deb" && $2 == "Debian" && $3 == "Debian" && $4 ~ /^(https?|file):/ { print $4; exit }') \
            || true
    fi
    if [ -n "$uri" ]; then printf '%s\n' "${uri%/}"; fi
}

if [ "${1:-}" = --debian-mirror ]; then
    mirror=${DEBIAN_MIRROR:-$(debian_mirror)}
    [ -n "$mirror" ] || die "apt knows no Debian $SUITE mirror here: set DEBIAN_MIRROR"
    printf '%s\n' "$mirror"
    exit 0
fi
[ $# -eq 0 ] || die "unknown argument: $1 (the settings are environment variables)"

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

# The base image's packages (scripts/slim-base.py adds the owners of every library their
# ELF files load): the interpreter and standard library, `python3`, `python3 -m venv`
# with pip for the builder stage, the C++ runtime of the manylinux wheels, the CA bundle,
# /etc/mime.types (the dashboard's content types), /bin/sh for the builder's RUN and
# useradd for the runtime stage's user.
BASE_PACKAGES=(
    base-files libc6 libstdc++6
    python3.11-minimal libpython3.11-minimal libpython3.11-stdlib python3-minimal
    python3.11-venv python3-pip-whl python3-setuptools-whl
    ca-certificates media-types dash passwd
)

make_base() {
    local mirror=${DEBIAN_MIRROR:-$(debian_mirror)}
    [ -n "$mirror" ] || die "apt knows no Debian $SUITE mirror here: set DEBIAN_MIRROR"
    local rootfs="$WORK_DIR/rootfs"
    rm -rf "$rootfs"
    log "debootstrap $SUITE from $mirror"
    # ca-certificates: Debian's pip verifies TLS against the system's CA bundle.
    debootstrap --variant=minbase --include=python3.11,python3-venv,ca-certificates,libstdc++6 \
        "$SUITE" "$rootfs" "$mirror" >"$WORK_DIR/debootstrap.log" 2>&1 \
        || { tail -n 30 "$WORK_DIR/debootstrap.log" >&2; die "debootstrap failed (log: $WORK_DIR/debootstrap.log)"; }
    # The base is what the root's own python copies out of it (docs, translations and
    # everything else stay behind with the debootstrap root).
    chroot "$rootfs" python3 - /slim "${BASE_PACKAGES[@]}" <scripts/slim-base.py \
        >"$WORK_DIR/base-packages.txt" || die "scripts/slim-base.py failed"
    log "base packages: $(cat "$WORK_DIR/base-packages.txt")"
    tar --numeric-owner --xattrs -C "$rootfs/slim" -c . \
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
    podman build --isolation=chroot --pull=never --layers=false "${ca_mount[@]}" \
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
found = [c for c in ("gcc", "cc", "c++", "g++", "clang", "make", "pip", "pip3", "apt-get", "dpkg", "perl")
         if shutil.which(c)]
if found:
    sys.exit(f"not expected in the runtime image: {found}")
user = pwd.getpwuid(os.getuid())
print(f"runs as {user.pw_name} {os.getuid()}:{os.getgid()} ({grp.getgrgid(os.getgid()).gr_name}),",
      "python", sys.version.split()[0], "at", os.path.realpath(sys.executable))
'
    # Every shared object (the base'"'"'s and the wheels'"'"') finds the libraries it links.
    podman run --rm --network=none --entrypoint python3 "$IMAGE" -c '
import glob, os, subprocess, sys
loader = min(glob.glob("/lib*/ld-linux*.so.[0-9]"))
missing, count = [], 0
for top in ("/usr/lib", "/usr/bin", "/usr/sbin", "/opt/rule-sidecar"):
    for parent, _, names in os.walk(top):
        for name in names:
            path = os.path.join(parent, name)
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            with open(path, "rb") as handle:
                if handle.read(4) != b"\x7fELF":
                    continue
            count += 1
            listed = subprocess.run([loader, "--list", path],
                                    capture_output=True, text=True)
            missing += [f"{path}: {line.strip()}" for line in listed.stdout.splitlines()
                        if "not found" in line]
if missing:
    sys.exit("unresolved libraries:\n" + "\n".join(missing))
print(f"{count} ELF files, every library found")
'
    # The Kubernetes API source (trimmed by scripts/trim-venv.py): built as serve builds
    # it, every module it loads is there and has byte code (none compiled at start-up).
    podman run --rm --network=none --entrypoint python3 "$IMAGE" -c '
import importlib.util, os, sys
from kubernetes import client
from sidecar.sources.kubernetes import ConfigMapSource, EventRecorder
api = client.ApiClient(client.Configuration())
ConfigMapSource(api, namespace="default", label_selector="")
EventRecorder(api, namespace="default", instance="check")
files = [getattr(m, "__file__", None) for m in list(sys.modules.values())]
sources = [f for f in files if isinstance(f, str) and f.endswith(".py")]
uncompiled = [f for f in sources if not os.path.exists(importlib.util.cache_from_source(f))]
if uncompiled:
    sys.exit(f"loaded without byte code: {uncompiled[:10]}")
print(f"API source: {len(sources)} modules loaded, each from byte code")
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

# The Kubernetes API source with no API server (a kubeconfig pointing at a closed port,
# no network): the sidecar must start, stay alive and report the API unreachable in
# health, which proves that nothing the client imports was trimmed away.
run_api_source() {
    cat >"$WORK_DIR/kubeconfig" <<'EOF'
apiVersion: v1
kind: Config
clusters: [{name: none, cluster: {server: "http://127.0.0.1:9"}}]
users: [{name: none, user: {token: none}}]
contexts: [{name: none, context: {cluster: none, user: none}}]
current-context: none
EOF
    chmod a+r "$WORK_DIR/kubeconfig"
    podman run --detach --name "$CONTAINER-api" \
        --read-only --read-only-tmpfs=false --tmpfs /tmp:rw,mode=1777,size=16m \
        --cap-drop=ALL --security-opt=no-new-privileges --network=none \
        --volume "$WORK_DIR/kubeconfig:/kubeconfig:ro" \
        --env KUBECONFIG=/kubeconfig --env RULE_SIDECAR_KUBERNETES_NAMESPACE=default \
        "$IMAGE" --kubernetes-selector app=probe >/dev/null
    local report
    report=$(podman exec "$CONTAINER-api" python3 -c '
import json, sys, time, urllib.error, urllib.request
def get(path):
    try:
        with urllib.request.urlopen("http://127.0.0.1:8000" + path, timeout=2) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
for _ in range(120):
    try:
        status, _ = get("/livez")
        health = json.loads(get("/health/hot-reload")[1])
    except (OSError, ValueError):
        time.sleep(0.25)
        continue
    if status == 200 and health.get("watch_problems"):
        print(json.dumps(health["watch_problems"]))
        sys.exit(0)
    time.sleep(0.25)
sys.exit("no /livez, or the unreachable API is not reported")
' 2>&1) || { podman logs "$CONTAINER-api" >&2; die "API source: $report"; }
    if podman logs "$CONTAINER-api" 2>&1 | grep -qE 'ImportError|ModuleNotFoundError|Traceback'; then
        podman logs "$CONTAINER-api" >&2
        die "the API source failed to import in the image"
    fi
    log "API source without an API server: alive, reports $report"
    podman stop --time 15 "$CONTAINER-api" >/dev/null
}

cleanup() {
    podman rm --force --ignore "$CONTAINER" "$CONTAINER-api" >/dev/null 2>&1 || true
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
step "run with the API source" run_api_source

size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
base_size=$(podman image inspect --format '{{.Size}}' "$BASE_IMAGE")
printf '\n%s: %s MB (base %s: %s MB, added by the image: %s MB)\n' \
    "$IMAGE" "$((size / 1000000))" "$BASE_IMAGE" "$((base_size / 1000000))" \
    "$(((size - base_size) / 1000000))"
printf '%s\n' "${TIMINGS[@]}"
printf '%-28s %7d s\n' total "$(($(date +%s) - total_start))"
