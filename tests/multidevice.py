"""Run a test script on simulated CPU devices, in a fresh Python (jax fixes the device count when it starts)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes_on_cpu_devices(script: str, num_processes: int, devices_per_process: int,
                                 timeout: int = 900) -> list[str]:
    """``python -c script PROCESS_ID NUM_PROCESSES COORDINATOR`` in ``num_processes`` processes at once.

    Each process has ``devices_per_process`` CPU devices; the script calls
    ``jax.distributed.initialize(COORDINATOR, num_processes=NUM_PROCESSES,
    process_id=PROCESS_ID)`` (a free port on 127.0.0.1). Raises if any
    process fails or runs past ``timeout`` seconds (then all are killed).

    Returns:
      Each process's stdout, in process order.
    """
    coordinator = f"127.0.0.1:{_free_port()}"
    flags = [f"--xla_force_host_platform_device_count={devices_per_process}", *PATIENT_COLLECTIVES]
    env = dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu")
    processes = [subprocess.Popen([sys.executable, "-c", script, str(i), str(num_processes), coordinator],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
                 for i in range(num_processes)]
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=max(1.0, deadline - time.monotonic())))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    failed = [(i, out, err) for i, (process, (out, err)) in enumerate(zip(processes, outputs)) if process.returncode]
    assert not failed, "\n".join(f"process {i}: {out[-2000:]}{err[-4000:]}" for i, out, err in failed)
    return [out for out, _ in outputs]
