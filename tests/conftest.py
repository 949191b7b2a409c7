"""Shared fixtures. Agent processes use one torch thread each so that tests behave alike on 2 cores."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
