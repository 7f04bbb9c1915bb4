"""Run a test script on simulated CPU devices, in a fresh Python (jax fixes the device count when it starts)."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Simulated devices share the machine's cores: under load (CI runs two test workers on two cores) a device
# thread can wait long for its peers at a collective, and XLA's CPU runtime aborts after 40 s by default.
PATIENT_COLLECTIVES = ("--xla_cpu_collective_call_terminate_timeout_seconds=600",
                       "--xla_cpu_collective_call_warn_stuck_timeout_seconds=120")


def run_on_cpu_devices(script: str, count: int, timeout: int = 900) -> subprocess.CompletedProcess:
    """``python -c script`` with ``count`` CPU devices, from the repository root; raises if it fails.

    Returns:
      The completed process (``stdout`` holds what the script printed).
    """
    flags = [f"--xla_force_host_platform_device_count={count}", *PATIENT_COLLECTIVES]
    for attempt_flags in (flags, flags[:1]):  # a jaxlib without the timeout flags refuses them: run without
        env = dict(os.environ, XLA_FLAGS=" ".join(attempt_flags), JAX_PLATFORMS="cpu")
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout,
                                env=env, cwd=ROOT)
        if "Unknown flag in XLA_FLAGS" not in result.stderr:
            break
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result
