"""Helpers for tests that start real processes (torchrun, srun stubs)."""

import socket
import subprocess

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_tree(p: subprocess.Popen) -> None:
    """kill -9 a process and all its descendants (torch elastic workers run in sessions of their own)."""
    try:
        procs = [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)
