"""``python -m keeper_task.probe``: the probe job's task (see :mod:`keeper_task.probe.task`)."""

from __future__ import annotations

import sys

from keeper_task.probe.task import main

sys.exit(main())
