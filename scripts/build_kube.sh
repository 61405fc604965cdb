#!/usr/bin/env bash
# Builds the dev cluster's control plane (devcluster/kube: kube-apiserver, kube-controller-manager, kube-scheduler
# and etcd as one binary, the three names as symlinks) into $TOOLS/kube/<versions>/, once per pinned versions.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS=$(mkdir -p "${TOOLS:-.tools}" && cd "${TOOLS:-.tools}" && pwd)  # absolute: go build runs in the module's directory
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=readonly
module=devcluster/kube
pinned() { awk -v m="$1" '$1 == m && $2 ~ /^v/ {print $2; exit}' "$module/go.mod"; }
kube_version=$(pinned k8s.io/kubernetes)
etcd_version=$(pinned go.etcd.io/etcd/server/v3)
# the sources' hash too, so an edit of main.go or go.sum builds again under the same versions
sources=$(cat "$module/go.mod" "$module/go.sum" "$module/main.go" | sha256sum | cut -c1-12)
out="$TOOLS/kube/kubernetes-$kube_version-etcd-$etcd_version-$sources"
if [ -x "$out/bin/kube" ]; then
  echo "make kube: kubernetes $kube_version and etcd $etcd_version already built in $out/bin (nothing to do)"
  exit 0
fi
command -v go >/dev/null || { echo "make kube: needs Go (go.mod names the version) on PATH" >&2; exit 1; }
echo "make kube: building kubernetes $kube_version (kube-apiserver, kube-controller-manager, kube-scheduler) and" \
  "etcd $etcd_version with $(go version | cut -d' ' -f3) into $out/bin; a cold build takes minutes"
start=$(date +%s)
rm -rf "$out.tmp" && mkdir -p "$out.tmp/bin"
minor=${kube_version#v1.}; minor=${minor%%.*}
pkg=k8s.io/component-base/version
ldflags="-s -w -X $pkg.gitVersion=$kube_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
ldflags="$ldflags -X $pkg.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
(cd "$module" && go mod download -x 2>&1 | grep -c '^# get' | sed 's/^/make kube: modules fetched: /' || true)
log="$out.tmp/build.log"
echo "make kube: compiling (progress every 30 s; the whole log in $log while it runs)"
(cd "$module" && exec go build -v -trimpath -ldflags="$ldflags" -o "$out.tmp/bin/kube" .) >"$log" 2>&1 &
build=$!
while kill -0 "$build" 2>/dev/null; do
  for _ in $(seq 30); do kill -0 "$build" 2>/dev/null && sleep 1; done
  kill -0 "$build" 2>/dev/null && echo "make kube: $(wc -l <"$log") packages compiled, $(( $(date +%s) - start )) s"
done
if ! wait "$build"; then
  tail -n 40 "$log" >&2
  echo "make kube: go build failed (the log above)" >&2
  exit 1
fi
for name in kube-apiserver kube-controller-manager kube-scheduler etcd; do ln -s kube "$out.tmp/bin/$name"; done
for old in "$TOOLS/kube"/kubernetes-*; do  # earlier pins' builds
  [ "$old" = "$out.tmp" ] || rm -rf "$old"
done
mv "$out.tmp" "$out"
echo "make kube: built in $(( $(date +%s) - start )) s: $("$out/bin/kube-apiserver" --version)"
