"""What the seed example tests share: an agent per seed driver name in a network namespace of
its own, the Debian test guest under the seeds' file names, a loopback artifact server, and
`nomad job validate` / `plan` / `run` of an example file.

Everything runs inside the namespace: the agent, the plugin, its bridge (virbr0 or br0, with
the seeds' own private addresses), the VMs' TAPs and nftables rules, and the artifact server.
Nothing of it touches the host's own namespace; it is deleted and checked for leaks afterwards.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

from nomad_vm.cli.devagent import DevAgent
from nomad_vm.network.netns import run_in
from tests.conftest import vm_processes_under
from tests.e2e.conftest import private_netns, running_agent, wait_alloc
from tests.seed_examples.catalogue import Example

_T = TypeVar("_T")
# Debian boots in 60-90 s under TCG on an idle machine; this one has 2 cores shared by several
# test runs (at a load of 15, cloud-init's final stage came after 8 minutes).
BOOT_TIMEOUT = 900.0


@dataclass
class SeedNode:
    """One agent running the plugin under a seed's name, and where its files are."""

    agent: DevAgent
    netns: str
    driver: str
    root: Path  # the test's directory: images, data, volumes (the tokens' values point here)
    values: dict[str, object]  # @TOKEN@ -> value, for Example.render
    service: Any = None  # what seed_node's ``services`` gave (e.g. a Ceph cluster)

    def write(self, ex: Example) -> Path:
        return ex.write(self.root / "jobs", self.values)

    def nomad(self, *args: str, check: bool = True) -> str:
        return self.agent.nomad(*args, check=check)

    def validate(self, ex: Example) -> tuple[bool, str]:
        """`nomad job validate` against the agent: Nomad's checks and the driver's own schema
        (the agent asks the plugin's ConfigSchema)."""
        return self._run("validate", ex)

    def plan(self, ex: Example) -> tuple[bool, str]:
        """`nomad job plan`: exit 0 or 1 is a plan (1: changes); a placement failure is in
        its text."""
        return self._run("plan", ex)

    def assert_validates_and_places(self, ex: Example) -> None:
        """`nomad job validate` passes and `nomad job plan` places every task."""
        ok, text = self.validate(ex)
        assert ok and "Job validation successful" in text, text
        ok, text = self.plan(ex)
        assert ok and "All tasks successfully allocated" in text, text

    def _run(self, verb: str, ex: Example, *extra: str) -> tuple[bool, str]:
        proc = subprocess.run(
            self.agent.command("job", verb, *extra, str(self.write(ex))),
            env=self.agent.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        ok = proc.returncode in ((0, 1) if verb == "plan" else (0,))
        return ok, proc.stdout + proc.stderr

    def run(self, ex: Example, namespace: str = "default") -> None:
        ok, text = self._run("run", ex, "-detach", "-namespace", namespace)
        assert ok, text

    def first_driver_failure(self, ex: Example, job: str, task: str) -> str:
        """Run ``ex`` (a fragment with nothing to boot) and return the text of its task's first
        "Driver Failure" event; the job is purged afterwards. `nomad job validate` checks
        Nomad's rules only: the plugin's config schema is applied when the client decodes
        the task's config for StartTask, so a failure that names a missing boot disk (and
        no unknown key) shows the whole config decoded."""
        self.run(ex)

        def failure() -> str:
            allocs = self.agent.api(f"/v1/job/{job}/allocations")
            assert isinstance(allocs, list)
            for alloc in allocs:
                alloc.setdefault("Namespace", "default")
                for event in self.events(alloc, task):
                    if event.startswith("Driver Failure: "):
                        return event
            return ""

        try:
            return poll(f"{job}: a Driver Failure event", failure, 120)
        finally:
            self.nomad("job", "stop", "-purge", "-detach", job)

    def stop(self, job: str, namespace: str = "default") -> None:
        """`nomad job stop` and wait until the allocation is done and its VM gone."""
        self.nomad("job", "stop", "-detach", "-namespace", namespace, job)
        alloc = self.wait(job, {"complete", "failed"}, namespace)
        alloc_dir = self.agent.config.workdir / "data" / "alloc" / str(alloc["ID"])
        poll(f"{job}: VM gone", lambda: not vm_processes_under(alloc_dir), 60)

    def namespace(self, name: str) -> str:
        """A Nomad namespace (the seeds give several jobs one name: each runs in its own)."""
        self.nomad("namespace", "apply", name)
        return name

    def wait(self, job: str, statuses: set[str], namespace: str = "default") -> dict[str, Any]:
        return wait_alloc_ns(self.agent, job, statuses, namespace)

    def exec(self, alloc: Mapping[str, Any], task: str, command: str) -> str:
        """`nomad alloc exec` (through the guest agent) of a shell command; its stdout."""
        return self.nomad(
            "alloc",
            "exec",
            "-namespace",
            str(alloc["Namespace"]),
            "-task",
            task,
            "-t=false",
            str(alloc["ID"]),
            "sh",
            "-c",
            command,
        )

    def console(self, alloc: Mapping[str, Any], task: str) -> str:
        """The tail of the guest's console (`nomad alloc logs`), for failure messages."""
        out = self.nomad(
            "alloc", "logs", "-namespace", str(alloc["Namespace"]), str(alloc["ID"]), task,
            check=False,
        )  # fmt: skip
        return out[-3000:]

    def http_on_port(self, alloc: Mapping[str, Any], task: str, label: str, to: int) -> str:
        """The reply (``<status> <body>``) of the first successful GET of the host port Nomad
        mapped for ``label``, from inside the node's namespace; the test fails with the
        guest's console and the task's events when none comes within BOOT_TIMEOUT."""
        ports = alloc["AllocatedResources"]["Shared"]["Ports"]
        (port,) = [p for p in ports if p["Label"] == label]
        assert port["To"] == to, port
        url = f"http://127.0.0.1:{port['Value']}/"
        try:
            return poll(
                f"HTTP on {url}",
                lambda: (r := http_get(self.netns, url)).startswith("200 ") and r,
                BOOT_TIMEOUT,
                every=3,
            )
        except TimeoutError as exc:
            raise AssertionError(
                f"{exc}; last: {http_get(self.netns, url)}; events: {self.events(alloc, task)}"
                f"; console: {self.console(alloc, task)}"
            ) from None

    def events(self, alloc: Mapping[str, Any], task: str) -> list[str]:
        full = self.agent.api(f"/v1/allocation/{alloc['ID']}?namespace={alloc['Namespace']}")
        assert isinstance(full, dict)
        state = (full.get("TaskStates") or {}).get(task) or {}
        return [
            f"{e['Type']}: {e.get('DisplayMessage', '')} {e.get('DriverError', '')}"
            for e in state.get("Events") or []
        ]

    def wait_guest_agent(self, alloc: Mapping[str, Any], task: str) -> None:
        """Until the driver's event says the guest agent answered (the guest is up)."""
        poll(
            f"guest agent of {task}",
            lambda: any("Guest agent answered" in e for e in self.events(alloc, task)),
            BOOT_TIMEOUT,
            every=2,
        )


def wait_alloc_ns(
    agent: DevAgent, job: str, statuses: set[str], namespace: str, timeout: float = 300.0
) -> dict[str, Any]:
    if namespace == "default":
        return wait_alloc(agent, job, statuses, timeout)
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        allocs = agent.api(f"/v1/job/{job}/allocations?namespace={namespace}")
        assert isinstance(allocs, list)
        if allocs:
            newest = max(allocs, key=lambda a: int(a["CreateIndex"]))
            last = newest["ClientStatus"]
            if last in statuses:
                full = agent.api(f"/v1/allocation/{newest['ID']}?namespace={namespace}")
                assert isinstance(full, dict)
                return full
        time.sleep(0.5)
    raise TimeoutError(f"job {job} ({namespace}): allocation status {last}, wanted {statuses}")


def poll(what: str, fn: Callable[[], _T], timeout: float, every: float = 1.0) -> _T:
    """``fn()``'s first truthy result within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = fn()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f}s")
        time.sleep(every)


def place_guest(directory: Path, names: Mapping[str, Path]) -> None:
    """The Debian test guest's files under the seed's names: a copy of each (the shared guest
    cache is never linked to or touched), further names for the same file hard links to it."""
    directory.mkdir(parents=True, exist_ok=True)
    copies: dict[Path, Path] = {}
    for name, source in names.items():
        target = directory / name
        if source in copies:
            os.link(copies[source], target)
        else:
            shutil.copyfile(source, target)
            copies[source] = target


@contextlib.contextmanager
def artifact_server(netns: str, files: Mapping[str, Path]) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 inside ``netns`` serving ``files`` by name (the seeds'
    artifact URLs point at cloud-images.ubuntu.com; here they point at this); its base URL."""
    serve_dir = Path(tempfile.mkdtemp(prefix="nvs-", dir="/tmp"))
    place_guest(serve_dir, files)
    handler = functools.partial(_QuietHandler, directory=str(serve_dir))
    # Bound in the namespace: the socket stays there whichever thread serves it.
    server = run_in(netns, lambda: http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
        shutil.rmtree(serve_dir, ignore_errors=True)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def http_get(netns: str, url: str) -> str:
    """``<status> <body>`` of a GET from inside ``netns``, or ``error <exception>``."""

    def get() -> str:
        try:
            reply = httpx.get(url, timeout=5.0)
        except httpx.HTTPError as exc:
            return f"error {type(exc).__name__}: {exc}"
        return f"{reply.status_code} {reply.text.strip()}"

    return run_in(netns, get)


@contextlib.contextmanager
def seed_node(
    driver_alias: str,
    driver: str,
    plugin_config: Example,
    debian_guest: Any,
    *,
    link_prefixes: tuple[str, ...],
    values: Mapping[str, object] = {},
    extra_configs: Sequence[Example] = (),
    host_volumes: Sequence[str] = (),
    setup_netns: Callable[[str], None] | None = None,
    services: Callable[[str], contextlib.AbstractContextManager[Any]] | None = None,
) -> Iterator[SeedNode]:
    """An agent in a fresh namespace loading ``plugin_config`` (and ``extra_configs``) as
    the example files give them, with the plugin installed as ``driver_alias``.
    ``services(netns)`` is entered before the agent starts and left after it stopped (its
    VMs destroyed) and before the namespace is deleted: something the node's jobs use that
    must run in the namespace (a Ceph cluster); what it yields is ``SeedNode.service``."""
    root = Path(tempfile.mkdtemp(prefix="nvs-", dir="/tmp"))
    (root / "jobs").mkdir()
    tokens: dict[str, object] = {
        "IMAGES": root / "images",
        "IMAGES2": root / "images2",
        "IMAGES3": root / "images3",
        "DATA_DIR": root / "data",
        "STORAGE": root / "storage",
        "BIN_DIR": root / "bin",
        "BOOT": root / "boot",
        "LOG": root / "cloud-hypervisor.log",
        **values,
    }
    for key in ("IMAGES", "IMAGES2", "IMAGES3"):
        Path(str(tokens[key])).mkdir(exist_ok=True)
    volumes = {name: root / "volumes" / name for name in host_volumes}
    for path in volumes.values():
        path.mkdir(parents=True)
        path.chmod(0o777)  # the guest writes as vm_user (README: host volumes)
    try:
        with private_netns(link_prefixes) as netns, contextlib.ExitStack() as stack:
            if setup_netns is not None:
                setup_netns(netns)
            service = stack.enter_context(services(netns)) if services is not None else None
            configs = [ex.write(root, tokens) for ex in (plugin_config, *extra_configs)]
            with running_agent(
                [debian_guest.disk.parent],
                netns=netns,
                drop_ins={driver_alias: None},
                extra_configs=configs,
                host_volumes=volumes,
            ) as agent:
                agent.wait_driver(name=driver)
                yield SeedNode(agent, netns, driver, root, tokens, service)
    finally:
        shutil.rmtree(root, ignore_errors=True)
