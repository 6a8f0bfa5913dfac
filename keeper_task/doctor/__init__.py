"""``keeper-task doctor``: diagnose a live agent install, and measure it with the probe job.

Tooling only (never imported by a task binary). :func:`run_checks` returns one
:class:`Check` per piece of the install; :mod:`keeper_task.probe` measures the behaviour
the agent does not document.
"""

from __future__ import annotations

from keeper_task.doctor.checks import Check, DoctorOptions, find_agent_root, run_checks

__all__ = ["EXIT_CHECK_FAILED", "Check", "DoctorOptions", "find_agent_root", "run_checks"]

#: Exit code of ``keeper-task doctor`` when at least one check failed.
EXIT_CHECK_FAILED = 1
