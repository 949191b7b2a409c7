"""The Borg-DQN operator: reconciles `BorgCollective` resources (group borg.dev, version v1alpha1)."""

GROUP = "borg.dev"
VERSION = "v1alpha1"
KIND = "BorgCollective"
PLURAL = "borgcollectives"
FIELD_MANAGER = "borg-operator"
