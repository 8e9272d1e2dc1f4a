#!/usr/bin/env bash
# Installs Google's JetStream 0.2.2 (PyPI name `google-jetstream`) without its declared dependencies.
# Why: its install_requires pulls seqio -> TensorFlow (~3.2 GB). The runtime pieces it really needs are
# already dependencies of stat-jax (grpcio, prometheus-client, shortuuid, portpicker, absl-py, tiktoken),
# and stat_jax/rollout/jetstream_compat.py provides the one seqio name its engine_api imports.
# See third_party/README.md.
set -euo pipefail
PY="${1:-python3}"
"$PY" -m pip install -q --no-deps "google-jetstream==0.2.2"
