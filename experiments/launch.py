"""Runs N local processes of one command on loopback: a multi-host run on one machine.

    python -m experiments.launch --num_processes=2 --devices_per_process=2 -- \
        python -m experiments.main --config=configs/quickstart.py:runlocal --workdir=runs/mp

Each process gets ``SPARSEJAX_COORDINATOR=127.0.0.1:<free port>``,
``SPARSEJAX_NUM_PROCESSES=N`` and ``SPARSEJAX_PROCESS_ID=i`` (read by
`experiments.distributed.initialize`, which `experiments.main` calls) and, with
``--devices_per_process``, ``XLA_FLAGS=--xla_force_host_platform_device_count=D``
so each CPU process shows D devices. The launcher waits for all of them; if one
fails, the others are terminated (a process waiting in a collective for a dead
peer would otherwise hang), and the launcher exits with the first failure's code.
This is how the multi-process tests run; on real hosts, start one process per
host with the same three flags instead.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

from absl import app, flags

from experiments import distributed

__all__ = ["free_port", "launch", "process_env"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(
    process_id: int,
    num_processes: int,
    port: int,
    devices_per_process: int | None = None,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of local process ``process_id`` of ``num_processes``.

    Args:
      process_id: in ``[0, num_processes)``.
      num_processes: positive.
      port: the coordinator's port on 127.0.0.1.
      devices_per_process: fake CPU devices per process (None: leave XLA_FLAGS alone).
      base: the environment to extend (default ``os.environ``).

    Returns:
      A new environment dict.

    Raises:
      ValueError: on a non-positive count or an out-of-range id.
    """
    if not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"num_processes must be a positive integer, got {num_processes!r}")
    if not isinstance(process_id, int) or not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must lie in [0, {num_processes}), got {process_id!r}")
    env = dict(os.environ if base is None else base)
    env[distributed.ENV_COORDINATOR] = f"127.0.0.1:{port}"
    env[distributed.ENV_NUM_PROCESSES] = str(num_processes)
    env[distributed.ENV_PROCESS_ID] = str(process_id)
    if devices_per_process is not None:
        if not isinstance(devices_per_process, int) or devices_per_process < 1:
            raise ValueError(
                f"devices_per_process must be a positive integer, got {devices_per_process!r}"
            )
        # Replace any earlier device count, keep other XLA flags.
        flags_ = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
        env["XLA_FLAGS"] = (
            f"{flags_.strip()} --xla_force_host_platform_device_count={devices_per_process}"
        ).strip()
    return env


def launch(
    command: Sequence[str],
    num_processes: int,
    *,
    devices_per_process: int | None = None,
    log_dir: str | None = None,
    timeout: float | None = None,
    cwd: str | None = None,
) -> int:
    """Runs ``command`` as ``num_processes`` local processes and waits for them.

    Args:
      command: argv of the program (it must call `distributed.initialize`).
      num_processes: how many processes.
      devices_per_process: fake CPU devices in each (see `process_env`).
      log_dir: write process i's stdout+stderr to ``log_dir/process_i.log``;
        None: inherit the launcher's.
      timeout: seconds before every process is killed (None: no limit).
      cwd: working directory of the processes.

    Returns:
      0 if every process succeeded, else the first nonzero exit code
      (negative: killed by that signal; 124 on timeout).
    """
    if not command:
        raise ValueError("command must not be empty")
    port = free_port()
    procs, logs = [], []
    if log_dir is not None:
        os.makedirs(log_dir, exist_ok=True)
    try:
        for i in range(num_processes):
            out = None
            if log_dir is not None:
                out = open(os.path.join(log_dir, f"process_{i}.log"), "w")  # noqa: SIM115
                logs.append(out)
            procs.append(
                subprocess.Popen(
                    list(command),
                    env=process_env(i, num_processes, port, devices_per_process),
                    stdout=out,
                    stderr=subprocess.STDOUT if out is not None else None,
                    cwd=cwd,
                )
            )
        deadline = None if timeout is None else time.monotonic() + timeout
        first_failure = 0
        while True:
            codes = [p.poll() for p in procs]  # poll every process, not just up to a live one
            if all(c is not None for c in codes):
                break
            failed = [c for c in codes if c not in (None, 0)]
            if failed and not first_failure:
                first_failure = failed[0]
                break
            if deadline is not None and time.monotonic() > deadline:
                first_failure = 124
                break
            time.sleep(0.05)
        if not first_failure:
            first_failure = next((p.returncode for p in procs if p.returncode), 0)
        return first_failure
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for f in logs:
            f.close()


FLAGS = flags.FLAGS
flags.DEFINE_integer("num_processes", 2, "Number of local processes.")
flags.DEFINE_integer("devices_per_process", None, "Fake CPU devices per process.")
flags.DEFINE_string("logs", None, "Write each process's output to logs/process_<i>.log.")
flags.DEFINE_float("timeout", None, "Kill every process after this many seconds.")


def main(argv):
    command = argv[1:]
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise app.UsageError("give the command after --, e.g. -- python -m experiments.main ...")
    sys.exit(
        launch(
            command,
            FLAGS.num_processes,
            devices_per_process=FLAGS.devices_per_process,
            log_dir=FLAGS.logs,
            timeout=FLAGS.timeout,
        )
    )


if __name__ == "__main__":
    app.run(main)
