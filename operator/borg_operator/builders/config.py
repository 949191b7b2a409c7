"""The agents' ConfigMap `<cr>-config`: borgdqn's own config model, rendered from the spec."""

from __future__ import annotations

import hashlib
from pathlib import PurePosixPath

import yaml

from borg_operator import names
from borg_operator.builders.common import Manifest, metadata
from borg_operator.spec import CONFIG_PATH, CollectiveSpec, to_borg_config

CONFIG_KEY = PurePosixPath(CONFIG_PATH).name  # borgdqn.yaml
CONFIG_DIR = str(PurePosixPath(CONFIG_PATH).parent)  # /etc/borgdqn, where agent pods mount the ConfigMap


def config_yaml(cr: str, namespace: str, spec: CollectiveSpec) -> str:
    """What `borgdqn train --config` reads in an agent pod (every field, defaults included, so that a pod's
    behaviour never depends on the defaults of the borgdqn version its image carries)."""
    return yaml.safe_dump(to_borg_config(cr, namespace, spec).model_dump(mode="json"), sort_keys=False)


def config_checksum(config: str) -> str:
    """sha256 of the rendered config: the agents' pod template carries it, so any change to it rolls them."""
    return hashlib.sha256(config.encode()).hexdigest()


def build_config_map(cr: str, namespace: str, config: str) -> Manifest:
    """The ConfigMap of ``config``, the agents' config as `config_yaml` rendered it (once per reconcile)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(cr, namespace, names.config(cr), names.CONFIG),
        "data": {CONFIG_KEY: config},
    }
