#!/usr/bin/env bash
# Orthanc with its DICOMweb plugin, for the DICOMweb tests (tests/test_dicomweb.py) and
# tests/benchmarks/bench_remote.py: its own configuration and storage under $ORTHANC_DIR, no
# DICOM port, HTTP on a free port that answers 127.0.0.1 only (RemoteAccessAllowed=false:
# Orthanc 1.10 has no bind-address setting, so other hosts get 403).  Writes the server's
# URL to $ORTHANC_DIR/url, which the tests read.  Idempotent; stop it with stop-orthanc.sh.
set -euo pipefail
ORTHANC_DIR=${SLIDE2VEC_ORTHANC_DIR:-/tmp/slide2vec-orthanc}
PLUGIN=/usr/share/orthanc/plugins/libOrthancDicomWeb.so

if [ -f "$ORTHANC_DIR/pid" ] && kill -0 "$(cat "$ORTHANC_DIR/pid")" 2>/dev/null; then
    echo "Orthanc already running: $(cat "$ORTHANC_DIR/url")"
    exit 0
fi
if ! command -v Orthanc >/dev/null || [ ! -f "$PLUGIN" ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends orthanc orthanc-dicomweb >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends orthanc orthanc-dicomweb >/dev/null; }
fi
mkdir -p "$ORTHANC_DIR/storage"
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat > "$ORTHANC_DIR/orthanc.json" <<JSON
{
  "Name": "slide2vec-dask tests",
  "StorageDirectory": "$ORTHANC_DIR/storage",
  "IndexDirectory": "$ORTHANC_DIR/storage",
  "HttpPort": $PORT,
  "RemoteAccessAllowed": false,
  "AuthenticationEnabled": false,
  "DicomServerEnabled": false,
  "HttpDescribeErrors": true,
  "StableAge": 1,
  "Plugins": ["$PLUGIN"],
  "DicomWeb": {"Enable": true, "Root": "/dicom-web/", "EnableWado": false, "Host": "127.0.0.1:$PORT"}
}
JSON
# The Debian service (if any) is not used: ours runs by hand, as whoever runs the tests.
Orthanc "$ORTHANC_DIR/orthanc.json" >"$ORTHANC_DIR/orthanc.log" 2>&1 &
echo $! > "$ORTHANC_DIR/pid"
for _ in $(seq 1 100); do
    if python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/system', timeout=1)" 2>/dev/null; then
        echo "http://127.0.0.1:$PORT" > "$ORTHANC_DIR/url"
        echo "Orthanc up: http://127.0.0.1:$PORT (DICOMweb at /dicom-web)"
        exit 0
    fi
    if ! kill -0 "$(cat "$ORTHANC_DIR/pid")" 2>/dev/null; then break; fi
    sleep 0.2
done
echo "Orthanc did not start; its log:" >&2
tail -20 "$ORTHANC_DIR/orthanc.log" >&2
exit 1
