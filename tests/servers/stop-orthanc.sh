#!/usr/bin/env bash
# Stop the Orthanc that start-orthanc.sh started, and remove its storage.
ORTHANC_DIR=${SLIDE2VEC_ORTHANC_DIR:-/tmp/slide2vec-orthanc}
if [ -f "$ORTHANC_DIR/pid" ]; then
    pid=$(cat "$ORTHANC_DIR/pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
fi
rm -rf "$ORTHANC_DIR"
