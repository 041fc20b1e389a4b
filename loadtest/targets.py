"""Where a drill runs and what it can break: a `Target` (`LocalTarget` starts a LocalStack on
loopback, `DockerTarget` drives the compose containers through the Docker SDK) and the
`Scenario`s (a fault and how it is restored). The drill itself is loadtest.drill.
"""

from __future__ import annotations

import abc
import contextlib
import io
import json
import secrets
import signal
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.netns import NetNsError, require_tools
from harness.procs import Child
from harness.stack import LocalStack, StackError
from loadtest.netem import Impairment, apply_compose, apply_local, clear_compose, clear_local


class DrillError(RuntimeError):
    """The drill could not run; the message is for the user as-is."""


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # "backend" or "balancer"
    fault: str  # kill, stop, pause, disconnect, restart (stop + start), add (a replica),
    #             netem (impair its network: loadtest.netdrill)
    restore: str | None  # restart, resume, reconnect, remove, clear, or None (stay broken)
    docker_only: bool = False


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("kill-backend", "backend", "kill", "restart"),
        Scenario("stop-backend", "backend", "stop", "restart"),
        Scenario("pause-backend", "backend", "pause", "resume"),
        Scenario("disconnect-backend", "backend", "disconnect", "reconnect", docker_only=True),
        Scenario("restart-backend", "backend", "restart", None),
        Scenario("scale-backends", "backend", "add", "remove", docker_only=True),
        Scenario("kill-active-balancer", "balancer", "kill", None),
        Scenario("stop-active-balancer", "balancer", "stop", None),
        Scenario("pause-active-balancer", "balancer", "pause", "resume"),
        Scenario("delay-backend", "backend", "netem", "clear"),
        Scenario("loss-backend", "backend", "netem", "clear"),
        Scenario("bandwidth-backend", "backend", "netem", "clear"),
    )
}


DEFAULT_PROJECT = "lbtestbed"


class Target(abc.ABC):
    """Where the stack runs. Names: backends as in X-Backend, balancers as in admin_urls."""

    name = "target"
    service_url = ""
    ca_file: str | None = None
    impairment: Impairment | None = None  # what the netem fault applies
    algorithm: str | None = None  # the lb policy the drill ran under (in the report)

    @abc.abstractmethod
    def setup(self, scenario: Scenario) -> None: ...

    @abc.abstractmethod
    def prepare(self) -> None:
        """Once the stack is ready, before traffic (the docker target sets --algorithm)."""

    @abc.abstractmethod
    def teardown(self) -> None: ...

    @abc.abstractmethod
    def admin_urls(self) -> dict[str, str]: ...

    @abc.abstractmethod
    def backend_names(self) -> list[str]: ...

    @abc.abstractmethod
    def backend_id(self, name: str) -> str:
        """The backend's id in /api/state."""

    @abc.abstractmethod
    def act(self, kind: str, name: str, action: str) -> str:
        """Do `action` to backend/balancer `name`; return a short description."""

    def extra_backend_name(self) -> str:
        """The X-Backend name the `add` action will give a new replica."""
        raise DrillError(f"the {self.name} target cannot add backends")


_SIGNALS = {"kill": signal.SIGKILL, "stop": signal.SIGTERM, "pause": signal.SIGSTOP}


class LocalTarget(Target):
    """A LocalStack on free loopback ports (a pair for balancer scenarios)."""

    name = "local"

    def __init__(
        self,
        *,
        algorithm: str = "round-robin",
        tls: bool = False,
        pki_dir: Path | None = None,
        check_interval: float | None = None,
        workers: str = "1",
    ) -> None:
        self.algorithm = algorithm
        self.tls = tls
        self.pki_dir = pki_dir
        self.check_interval = check_interval
        self.workers = workers
        self.stack: LocalStack | None = None

    def setup(self, scenario: Scenario) -> None:
        if scenario.docker_only:
            raise DrillError(f"scenario {scenario.name} needs the docker target")
        netem = scenario.fault == "netem"
        if netem:
            try:  # the victim (b2) gets a namespace of its own, impaired on its veth
                require_tools("ip", "tc")
            except NetNsError as exc:
                raise DrillError(f"{scenario.name} --local: {exc}") from None
        stack = LocalStack.ephemeral(
            algorithm=self.algorithm,
            tls=self.tls,
            pair=scenario.kind == "balancer",
            pki_dir=self.pki_dir,
            check_interval=self.check_interval,
            netns_backends=(1,) if netem else (),
            balancer_args=("--workers", self.workers) if self.workers != "1" else (),
        )
        self.stack = stack
        try:
            stack.start()
        except StackError as exc:
            raise DrillError(f"local stack did not start: {exc}") from None
        self.service_url = stack.service_url
        self.ca_file = stack.ca_file

    def prepare(self) -> None:
        """Nothing: the local stack was started with the algorithm."""

    def teardown(self) -> None:
        if self.stack is not None:
            self.stack.stop()

    def _stack(self) -> LocalStack:
        if self.stack is None:
            raise DrillError("local target used before setup()")
        return self.stack

    def admin_urls(self) -> dict[str, str]:
        return self._stack().admin_urls

    def backend_names(self) -> list[str]:
        return [b.name for b in self._stack().backends]

    def backend_id(self, name: str) -> str:
        return self._stack().backend_id(self.backend_names().index(name))

    def act(self, kind: str, name: str, action: str) -> str:
        stack = self._stack()
        proc: Child
        if kind == "backend":
            i = self.backend_names().index(name)
            if action in ("netem", "clear"):
                dev = stack.namespaces[i].host_if  # removed with the stack, and all on it
                if action == "clear":
                    return f"cleared on {dev}" if clear_local(dev) else "nothing to clear"
                if self.impairment is None:
                    raise DrillError("no impairment given")
                # netem, or on a kernel without it the nfqueue/iptables/tbf fallback
                info = apply_local(dev, self.impairment)
                return f"{self.impairment.describe()} on {dev} ({info.get('method', '?')})"
            if action == "restart":
                stack.restart_backend(i, wait=False)
                return f"restarted (pid {stack.backends[i].pid})"
            proc = stack.backends[i]
        else:
            if action == "restart":
                stack.restart_balancer(name)
                return f"restarted (pid {stack.balancer(name).pid})"
            proc = stack.balancer(name)
        sig = signal.SIGCONT if action == "resume" else _SIGNALS.get(action)
        if sig is None:
            raise DrillError(f"local target cannot {action}")
        pid = proc.pid
        proc.signal(sig)
        return f"{signal.Signals(sig).name} pid {pid}"


class DockerTarget(Target):
    """The compose stack (`make up`), driven with the Docker SDK.

    Containers are found by the compose labels: service `balancer-a`, `balancer-b` and the
    `backend` replicas. Traffic goes to the host entry port; admins are the published 9001/9002.
    """

    name = "docker"
    BALANCERS = ("balancer-a", "balancer-b")

    def __init__(
        self,
        *,
        project: str = DEFAULT_PROJECT,
        service_url: str = "https://localhost:8443",
        admin_urls: dict[str, str] | None = None,
        backend_port: int = 8080,
        algorithm: str | None = None,
    ) -> None:
        self.project = project
        self.algorithm = algorithm  # None: leave the balancers' own
        self._token: str | None = None
        self._restore: dict[str, str] = {}  # admin URL -> algorithm before the drill
        self.service_url = service_url
        self._admin_urls = admin_urls or {
            "balancer-a": "http://127.0.0.1:9001",
            "balancer-b": "http://127.0.0.1:9002",
        }
        self.backend_port = backend_port
        self.client: Any = None
        self.containers: dict[str, Any] = {}  # name -> container
        self.backend_ids: dict[str, str] = {}
        self.network: Any = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._extra_name: str | None = None
        self._created: list[Any] = []  # containers this drill made; removed in teardown

    def setup(self, scenario: Scenario) -> None:
        try:
            import docker

            self.client = docker.from_env()  # type: ignore[attr-defined]
            self.client.ping()
        except Exception as exc:  # the SDK raises several unrelated types here
            raise DrillError(f"Docker is not reachable: {str(exc).splitlines()[0]}") from None
        label = "com.docker.compose.service"
        # only this project's containers: a filter on the engine side, checked again here
        of_project = f"com.docker.compose.project={self.project}"
        found = [
            c
            for c in self.client.containers.list(all=True, filters={"label": [label, of_project]})
            if c.labels.get("com.docker.compose.project") == self.project
        ]
        if not any(c.status == "running" for c in found):
            raise DrillError(
                f"compose project {self.project!r} is not running; start it with `make up` "
                "or set COMPOSE_PROJECT_NAME to the project to drill"
            )
        for c in found:
            service = c.labels.get(label)
            if service in self.BALANCERS:
                self.containers[service] = c
        backends = sorted(
            (c for c in found if c.labels.get(label) == "backend"),
            key=lambda c: int(c.labels.get("com.docker.compose.container-number", "0")),
        )
        missing = [b for b in self.BALANCERS if b not in self.containers]
        if missing or not backends:
            raise DrillError(
                f"compose containers not found (missing {', '.join(missing) or 'backend'}); "
                "start the stack with `make up`"
            )
        for c in backends:
            # backend-N, N the replica number: the name in X-Backend and in /api/state
            # (docker/backend.sh and the balancer's discovery both derive it from the
            # container name through Docker's reverse DNS)
            name = f"backend-{c.labels.get('com.docker.compose.container-number', '0')}"
            self.containers[name] = c
            nets = c.attrs["NetworkSettings"]["Networks"]
            net_name = next((n for n in nets if n.endswith("lbnet")), None)
            if net_name is None:
                raise DrillError(f"backend {c.name} is not on the lbnet network")
            self.network = self.client.networks.get(net_name)
            self.backend_ids[name] = name
        self.ca_file = self._fetch_ca(self.containers["balancer-a"])
        if self.algorithm is not None:  # mutations need the admin token (it never leaves us)
            self._token = self._read_file(self.containers["balancer-a"], "/certs/admin.token")
            self._token = self._token.strip()
        if scenario.fault == "add":
            # a replica number compose does not hand out, so the name is backend-9NN too
            self._extra_name = f"backend-{900 + secrets.randbelow(100)}"

    def _read_file(self, container: Any, path: str) -> str:
        stream, _ = container.get_archive(path)
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
            member = tar.extractfile(Path(path).name)
            if member is None:
                raise DrillError(f"cannot read {path} from {container.name}")
            return member.read().decode()

    def _fetch_ca(self, container: Any) -> str:
        pem = self._read_file(container, "/certs/ca.crt")
        self._tmp = tempfile.TemporaryDirectory(prefix="lb-drill-")
        path = Path(self._tmp.name) / "ca.crt"
        path.write_text(pem)
        return str(path)

    def _admin(self, url: str, body: dict[str, str] | None = None) -> dict[str, Any]:
        """GET url, or PUT the JSON body with the admin token; the answer's JSON."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method="GET" if body is None else "PUT")
        if body is not None:
            req.add_header("Content-Type", "application/json")
            req.add_header("Authorization", f"Bearer {self._token}")
        try:  # the admin listeners are plain HTTP on the host's loopback (compose ports)
            with urllib.request.urlopen(req, timeout=3) as resp:
                answer: dict[str, Any] = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise DrillError(f"{url}: HTTP {exc.code} {exc.read()[:200].decode()!r}") from None
        except (OSError, ValueError) as exc:
            raise DrillError(f"{url}: {exc}") from None
        return answer

    def prepare(self) -> None:
        """With --algorithm: switch both balancers to it (restored in teardown); without:
        record the one they run, for the report."""
        for url in self._admin_urls.values():
            current = str(self._admin(url + "/api/state").get("algorithm"))
            if self.algorithm is None:
                self.algorithm = current
            elif current != self.algorithm:
                self._admin(url + "/api/algorithm", {"algorithm": self.algorithm})
                self._restore[url] = current

    def teardown(self) -> None:
        try:
            for url, algorithm in self._restore.items():
                try:
                    self._admin(url + "/api/algorithm", {"algorithm": algorithm})
                except DrillError as exc:  # the drill's result stands; say what is left
                    print(f"drill: could not restore {algorithm} on {url}: {exc}", file=sys.stderr)
            self._restore.clear()
            for c in self._created:
                with contextlib.suppress(Exception):  # NotFound: already removed by `remove`
                    c.remove(force=True)
        finally:
            if self._tmp is not None:
                self._tmp.cleanup()

    def extra_backend_name(self) -> str:
        if self._extra_name is None:
            raise DrillError("docker target: extra backend name asked before setup()")
        return self._extra_name

    def _add_backend(self, name: str) -> Any:
        """A replica like the existing ones (image, command, mounts, network alias `backend`,
        compose labels so `docker-compose down` removes it too), container `<project>_backend_N`
        so that it names itself `name` = backend-N as every replica does."""
        template = next(c for n, c in self.containers.items() if n in self.backend_ids)
        template.reload()
        cfg, host = template.attrs["Config"], template.attrs["HostConfig"]
        labels = dict(cfg.get("Labels") or {})
        project = labels.get("com.docker.compose.project", "lb")
        number = int(name.rsplit("-", 1)[1])  # name is backend-N (extra_backend_name)
        labels["com.docker.compose.container-number"] = str(number)
        labels["lb-testbed.drill"] = "scale-backends"
        binds = [
            f"{m['Name'] if m['Type'] == 'volume' else m['Source']}:{m['Destination']}:"
            + ("rw" if m.get("RW") else "ro")
            for m in template.attrs.get("Mounts", [])
            if m.get("Type") in ("volume", "bind")
        ]
        api = self.client.api
        host_config = api.create_host_config(
            binds=binds,
            cap_drop=host.get("CapDrop"),
            cap_add=host.get("CapAdd"),
            read_only=bool(host.get("ReadonlyRootfs")),
            security_opt=host.get("SecurityOpt"),
            network_mode=self.network.name,
        )
        networking = api.create_networking_config(
            {self.network.name: api.create_endpoint_config(aliases=["backend", name])}
        )
        created = api.create_container(
            cfg["Image"],
            command=cfg.get("Cmd"),
            entrypoint=cfg.get("Entrypoint"),
            environment=cfg.get("Env"),
            user=cfg.get("User") or None,
            working_dir=cfg.get("WorkingDir") or None,
            labels=labels,
            hostname=name,
            healthcheck=cfg.get("Healthcheck"),
            host_config=host_config,
            networking_config=networking,
            # named like a compose v1 replica: its reverse DNS then names it backend-N
            name=f"{project}_backend_{number}",
        )
        c = self.client.containers.get(created["Id"])
        self._created.append(c)
        c.start()
        self.containers[name] = c
        self.backend_ids[name] = name
        return c

    def admin_urls(self) -> dict[str, str]:
        return dict(self._admin_urls)

    def backend_names(self) -> list[str]:
        return list(self.backend_ids)

    def backend_id(self, name: str) -> str:
        return self.backend_ids[name]

    def act(self, kind: str, name: str, action: str) -> str:
        if action == "add":
            c = self._add_backend(name)
            return f"started container {c.name} ({self.backend_ids[name]})"
        c = self.containers[name]
        if action == "netem":  # from a helper in its namespace: the backend stays unprivileged
            if self.impairment is None:
                raise DrillError("no impairment given")
            info = apply_compose(c.name, self.impairment)
            return f"{self.impairment.describe()} on {c.name} eth0 ({info.get('method', '?')})"
        if action == "clear":
            return f"netem cleared on {c.name}" if clear_compose(c.name) else "nothing to clear"
        if action == "remove":
            c.stop(timeout=10)  # SIGTERM: the backend finishes in-flight requests
            c.remove()
            return f"stopped and removed container {c.name}"
        if action == "kill":
            c.kill("SIGKILL")
        elif action == "stop":
            c.stop(timeout=10)
        elif action == "pause":
            c.pause()
        elif action == "resume":
            c.unpause()
        elif action == "restart":
            c.reload()
            if c.status == "running":
                c.restart(timeout=10)
            else:
                c.start()
            if kind == "backend":  # the IP may change; later ids must follow
                c.reload()
                ip = c.attrs["NetworkSettings"]["Networks"][self.network.name]["IPAddress"]
                self.backend_ids[name] = f"{ip}:{self.backend_port}"
        elif action == "disconnect":
            self.network.disconnect(c)
        elif action == "reconnect":
            self.network.connect(c, aliases=[c.labels.get("com.docker.compose.service", "")])
        else:
            raise DrillError(f"docker target cannot {action}")
        return f"{action} container {c.name}"
