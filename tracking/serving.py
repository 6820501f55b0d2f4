"""`mlflow models serve` as a context manager: start a model's REST server on a free loopback port, wait
until it answers /ping, send /invocations requests, stop it (by pid, on every exit)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd


class ServerError(RuntimeError):
    """The model server did not come up (its log's last lines are in the message)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ModelServer:
    """`with ModelServer("models:/adaptive-vlm@champion", log) as server: server.invoke(frame)`."""

    def __init__(self, model_uri: str, log_file: str | os.PathLike[str], timeout_s: float = 180.0,
                 env: dict[str, str] | None = None) -> None:
        self.model_uri, self.log_file, self.timeout_s = model_uri, Path(log_file), timeout_s
        self.env = {**os.environ, **(env or {})}
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "ModelServer":
        mlflow_cli = Path(sys.executable).with_name("mlflow")
        with open(self.log_file, "wb") as log:
            self.process = subprocess.Popen(
                [str(mlflow_cli), "models", "serve", "-m", self.model_uri, "--env-manager", "local", "--host", "127.0.0.1",
                 "--port", str(self.port), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, env=self.env,
                start_new_session=True)  # its own process group: stopping it stops the workers too
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()
                raise ServerError(f"model server exited with {self.process.returncode}: {self._tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/ping", timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        self.stop()
        raise ServerError(f"model server did not answer /ping within {self.timeout_s:.0f} s: {self._tail()}")

    def _tail(self) -> str:
        lines = self.log_file.read_text(errors="replace").strip().splitlines() if self.log_file.exists() else []
        return " | ".join(lines[-5:])

    def invoke(self, frame: pd.DataFrame) -> tuple[int, dict]:
        """(HTTP status, JSON body) of one /invocations request with `frame` as dataframe_split."""
        body = json.dumps({"dataframe_split": frame.to_dict(orient="split", index=False)}).encode()
        request = urllib.request.Request(f"{self.url}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.process.wait()

    def __exit__(self, *exc: object) -> None:
        self.stop()
