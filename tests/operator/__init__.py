"""Tests of borg_operator: the spec, builders, CRD, RBAC, apply, status and the operator process."""
