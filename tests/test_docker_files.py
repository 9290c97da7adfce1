"""The Docker files, checked without a Docker engine: the Dockerfile is hadolint-clean, docker-compose.yml is valid
Compose, and both do what the README says (shared memory for training, init, a hub cache, a non-root user, health
checks under API_PREFIX, a small build context).

tests/fixtures/compose-spec.json: github.com/compose-spec/compose-spec schema/compose-spec.json@a08f8d5, as is.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import pytest
import yaml

from application.config import load_settings
from application.services.watchdog import RECORD_GRACE

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
SCHEMA = ROOT / "tests" / "fixtures" / "compose-spec.json"
KEYS = "admin:admin:a-key-of-sixteen-characters"
PYTHON_SERVICES = ("api", "scheduler")


# ---- docker-compose.yml, read as compose reads it --------------------------------------------------------------

_VAR = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\})")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's interpolation of every value: `$$` is a literal `$`; ${V}, ${V:-d}, ${V-d}, ${V:?e}, ${V?e},
    ${V:+a}, ${V+a} take the project's environment (the shell, ./.env)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        if m.group(1):
            return "$"
        name, op, arg = m.group(2), m.group(3) or "", m.group(4) or ""
        given = env.get(name)
        present = given is not None and (given != "" or not op.startswith(":"))
        if op.endswith("-"):
            return given if present and given is not None else arg
        if op.endswith("?"):
            if not present or given is None:
                raise ValueError(f"required variable {name} is missing a value: {arg}")
            return given
        if op.endswith("+"):
            return arg if present else ""
        return given or ""

    return _VAR.sub(one, value)


def compose(**env: str) -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))  # merge keys (<<: *app) resolved, as compose does
    result: dict[str, Any] = interpolate(doc, {"SWIFT_API_KEYS": KEYS, **env})
    return result


def service_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """Container path -> (source, read-only) of a service's short-syntax volumes."""
    out: dict[str, tuple[str, bool]] = {}
    for spec in service.get("volumes", []):
        source, target, *mode = spec.split(":")
        out[target] = (source, "ro" in mode)
    return out


def size_bytes(value: str | int) -> int:
    m = re.fullmatch(r"(\d+)\s*([bkmg]?)b?", str(value).strip().lower())
    assert m, f"not a compose byte size: {value!r}"
    return int(m.group(1)) * 1024 ** "bkmg".index(m.group(2) or "b")


# ---- the Dockerfile, read as BuildKit reads it ------------------------------------------------------------------


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comment lines dropped and continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1]  # the escaped newline goes, as in BuildKit
            continue
        text = (pending + line).strip()
        pending = ""
        if text:
            word, _, rest = text.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def assignments(kind: str) -> dict[str, str]:
    """The values of ARG (their defaults) or ENV instructions."""
    out: dict[str, str] = {}
    for word, rest in instructions():
        if word == kind:
            for item in shlex.split(rest):
                name, _, value = item.partition("=")
                out[name] = value
    return out


def run_instruction(containing: str) -> str:
    found = [rest for word, rest in instructions() if word == "RUN" and containing in rest]
    assert len(found) == 1, f"expected one RUN with {containing!r}, found {len(found)}"
    return found[0]


# ---- the files are valid ----------------------------------------------------------------------------------------


def test_compose_file_validates_against_the_compose_spec() -> None:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(compose())]
    assert errors == []
    # The schema does catch a mistake: a misspelt key, a size that is no size.
    broken = compose()
    broken["services"]["api"]["helthcheck"] = broken["services"]["api"].pop("healthcheck")
    broken["services"]["scheduler"]["shm_size"] = ["16gb"]
    assert len(list(validator.iter_errors(broken))) == 2


def test_compose_requires_api_keys() -> None:
    doc = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    with pytest.raises(ValueError, match="SWIFT_API_KEYS"):
        interpolate(doc, {})
    assert service_env(compose()["services"]["api"])["API_KEYS"] == KEYS
    # Not the scheduler's: code a job brings runs in its container (hunt DR: it read them from /proc).
    assert "API_KEYS" not in service_env(compose()["services"]["scheduler"])


def test_dockerfile_is_hadolint_clean(tmp_path: Path) -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    if not hadolint.is_file():
        pytest.fail(f"no hadolint next to {sys.executable}: install the dev dependencies, pip install -e '.[dev]'")
    # A personal hadolint.yaml or HADOLINT_* variable must not change the verdict; a repository one would.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    env |= {"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}
    out = subprocess.run([str(hadolint), "--format", "json", str(DOCKERFILE)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert json.loads(out.stdout or "null") == [], out.stdout + out.stderr
    assert out.returncode == 0, out.stderr


# ---- what they do -----------------------------------------------------------------------------------------------


def test_training_has_shared_memory_for_dataloader_workers() -> None:
    scheduler = compose()["services"]["scheduler"]
    assert scheduler.get("ipc") == "host" or size_bytes(scheduler["shm_size"]) >= 8 * 1024**3
    # The scheduler keeps the GPUs: the runs are children of its runners.
    devices = scheduler["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert scheduler["command"] == ["python", "start.py", "scheduler"]


def test_python_services_run_under_an_init_process() -> None:
    services = compose()["services"]
    python = [n for n, s in services.items() if "build" in s or s.get("command", [""])[0] == "python"]
    assert sorted(python) == sorted(PYTHON_SERVICES)
    assert {name: services[name].get("init") for name in python} == dict.fromkeys(python, True)


def test_a_stopping_scheduler_container_has_the_time_to_send_its_runs_back(monkeypatch: pytest.MonkeyPatch) -> None:
    # Runners die with their container: its scheduler stops them first (each stops swift, then records the end)
    # and must not be SIGKILLed before they are done.
    scheduler = compose()["services"]["scheduler"]
    for key, value in {**assignments("ENV"), **service_env(scheduler)}.items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    assert settings.STOP_RUNS_ON_SHUTDOWN
    m = re.fullmatch(r"(\d+)s", str(scheduler["stop_grace_period"]))
    assert m and int(m.group(1)) > settings.STOP_GRACE_SECONDS + RECORD_GRACE


def test_a_stopping_api_container_has_the_time_to_finish_its_open_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    # The API workers give open requests requests_grace to finish (a stop or a pause answers once its run has
    # ended): Docker's default of 10 s SIGKILLed them first.
    from start import requests_grace

    api = compose()["services"]["api"]
    for key, value in {**assignments("ENV"), **service_env(api)}.items():
        monkeypatch.setenv(key, value)
    m = re.fullmatch(r"(\d+)s", str(api.get("stop_grace_period")))
    assert m and int(m.group(1)) > requests_grace(load_settings())


def test_the_scheduler_health_check_looks_for_the_scheduler_itself() -> None:
    # Not for `start.py scheduler`, which lives on while the scheduler it keeps starting dies again and again.
    from application.keeper import SCHEDULER_MODULE

    assert compose()["services"]["scheduler"]["healthcheck"]["test"] == ["CMD", "pgrep", "-f", SCHEDULER_MODULE]


def test_hub_downloads_go_to_a_named_volume() -> None:
    doc = compose()
    scheduler = doc["services"]["scheduler"]
    env, volumes = service_env(scheduler), mounts(scheduler)
    image_env = assignments("ENV")
    for name in ("MODELSCOPE_CACHE", "HF_HOME"):
        path = PurePosixPath(env[name])
        assert image_env[name] == env[name]  # the image alone (docker run) uses the same place
        target = next(t for t in volumes if path.is_relative_to(t))
        source = volumes[target][0]
        assert source in doc["volumes"] and "/" not in source  # a named volume, not a host folder
        assert not volumes[target][1]


def test_image_runs_as_a_non_root_user_that_owns_what_it_writes() -> None:
    args, env = assignments("ARG"), assignments("ENV")
    users = [rest for word, rest in instructions() if word == "USER"]
    assert users, "no USER: the image runs as root"
    user = re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], users[-1])
    assert user.split(":")[0] not in ("", "0", "root") and user.split(":")[-1] not in ("0", "root")
    build_args = compose()["services"]["api"]["build"]["args"]
    assert build_args["APP_UID"] == args["APP_UID"] == "1000" and build_args["APP_GID"] == args["APP_GID"] == "1000"
    setup = run_instruction("chown")
    owned = [PurePosixPath(p) for p in shlex.split(setup.split("chown", 1)[1].split("&&")[0])[2:]]
    assert shlex.split(setup.split("chown", 1)[1])[:2] == ["-R", "$APP_UID:$APP_GID"]
    for name in ("OUTPUT_ROOT", "LOG_DIR", "DATA_DIR", "MODELSCOPE_CACHE", "HF_HOME"):
        assert any(PurePosixPath(env[name]).is_relative_to(p) for p in owned), f"{name}={env[name]} is root's"


def test_the_device_build_argument_picks_the_torch_index(tmp_path: Path) -> None:
    script = run_instruction("install_all.sh")
    fake = tmp_path / "install_all.sh"
    fake.write_text('#!/bin/sh\nenv > "$0.env"\n', encoding="utf-8")
    fake.chmod(0o755)
    install_all = (ROOT / "install_all.sh").read_text(encoding="utf-8")
    args = assignments("ARG")

    def build(**given: str) -> dict[str, str] | None:
        env = {"PATH": os.environ["PATH"], **args, **given}
        out = subprocess.run(["bash", "-o", "pipefail", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=30)  # fmt: skip
        if out.returncode:
            return None
        seen = dict(line.split("=", 1) for line in (tmp_path / "install_all.sh.env").read_text().splitlines())
        for name in ("TORCH_SPEC", "MS_SWIFT_VERSION", "SWIFT_VENV"):  # what install_all.sh reads
            assert "${" + name in install_all and seen[name] == {**args, "SWIFT_VENV": "/app/.swift-venv"}[name]
        return seen

    cuda = build()
    # Set, and empty: install_all.sh's own default (PyTorch's CPU index on a machine without nvidia-smi, as a
    # build machine is) must not give the CUDA image a CPU torch.
    assert cuda is not None and "PIP_EXTRA_INDEX_URL" not in cuda and cuda["TORCH_INDEX_URL"] == ""
    assert "${TORCH_INDEX_URL+set}" in install_all
    cpu = build(DEVICE="cpu")
    assert (
        cpu is not None
        and cpu["PIP_EXTRA_INDEX_URL"] == cpu["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    )
    mirror = build(DEVICE="cpu", TORCH_INDEX="https://mirror.example/cpu")
    assert mirror is not None and mirror["PIP_EXTRA_INDEX_URL"] == "https://mirror.example/cpu"
    assert build(DEVICE="rocm") is None
    assert compose()["services"]["scheduler"]["build"]["args"]["DEVICE"] == "cuda"
    assert compose(SWIFT_API_DEVICE="cpu")["services"]["scheduler"]["build"]["args"]["DEVICE"] == "cpu"


def test_models_and_data_sets_are_mounted_read_only_where_the_settings_look(monkeypatch: pytest.MonkeyPatch) -> None:
    image_env = assignments("ENV")
    for name in PYTHON_SERVICES:
        service = compose()["services"][name]
        env, volumes = service_env(service), mounts(service)
        assert volumes["/models"] == ("./models", True) and volumes["/datasets"] == ("./datasets", True)
        # Uploads are stored under the first data root: it must be writable (a read-only one was a 507).
        assert volumes["/app/uploads"] == ("./uploads", False)
        assert volumes[image_env["OUTPUT_ROOT"]] == ("./output", False)
        assert volumes[image_env["LOG_DIR"]] == ("./logs", False)
        # The server itself, with the container's environment, looks there.
        for key, value in {**image_env, **env}.items():
            monkeypatch.setenv(key, value)
        settings = load_settings()
        assert settings.data_roots() == (Path("/app/uploads"), Path("/datasets"))
        assert settings.model_roots() == (Path("/models"), Path(image_env["OUTPUT_ROOT"]))
        assert settings.API_PREFIX == env["API_PREFIX"] == "/api/v1"


# ---- health checks: the shell commands, with a curl that records its URL ---------------------------------------


def healthchecks() -> dict[str, list[str]]:
    """The argv each health check runs: the image's (exec form) and the api service's (CMD-SHELL)."""
    health = [rest for word, rest in instructions() if word == "HEALTHCHECK"]
    assert len(health) == 1
    image = json.loads(re.split(r"\s+CMD\s+", health[0], maxsplit=1)[1])
    test = compose()["services"]["api"]["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL" and len(test) == 2
    return {"image": image, "compose api": ["/bin/sh", "-c", test[1]]}


def probe(argv: list[str], tmp_path: Path, env: dict[str, str], curl_rc: int = 0) -> tuple[int, list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    curl = bin_dir / "curl"
    curl.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$CURL_ARGS"\nexit "$CURL_RC"\n', encoding="utf-8")
    curl.chmod(0o755)
    record = tmp_path / "curl-args"
    record.unlink(missing_ok=True)
    full = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "CURL_ARGS": str(record), "CURL_RC": str(curl_rc), **env}
    out = subprocess.run(argv, env=full, capture_output=True, text=True, timeout=30)
    return out.returncode, record.read_text().splitlines() if record.exists() else []


@pytest.mark.parametrize(
    ("env", "url"),
    [
        ({}, "http://127.0.0.1:8000/api/v1/training/health"),
        ({"API_PREFIX": "/ml/v2", "APP_PORT": "9000"}, "http://127.0.0.1:9000/ml/v2/training/health"),
        ({"API_PREFIX": "/ml/"}, "http://127.0.0.1:8000/ml/training/health"),  # the server drops the trailing /
        ({"API_PREFIX": ""}, "http://127.0.0.1:8000/training/health"),  # empty: no prefix
    ],
)
def test_health_checks_follow_api_prefix(tmp_path: Path, env: dict[str, str], url: str) -> None:
    for where, argv in healthchecks().items():
        rc, args = probe(argv, tmp_path, env)
        assert rc == 0 and [a for a in args if a.startswith("http")] == [url], where
        assert any(re.fullmatch(r"-[a-zA-Z]*f[a-zA-Z]*", a) for a in args), f"{where}: curl without -f"
        rc, _ = probe(argv, tmp_path, env, curl_rc=22)  # HTTP 503: unhealthy is exit 1 (2 is reserved)
        assert rc == 1, where


@pytest.mark.parametrize(("host", "prefix"), [(None, "/api/v1"), ("/ml", "/ml")])
def test_compose_passes_one_prefix_to_the_server_and_its_health_check(
    tmp_path: Path, host: str | None, prefix: str
) -> None:
    doc = compose(**({} if host is None else {"SWIFT_API_PREFIX": host}))
    for name in PYTHON_SERVICES:
        assert service_env(doc["services"][name])["API_PREFIX"] == prefix
    test = doc["services"]["api"]["healthcheck"]["test"]
    rc, args = probe(["/bin/sh", "-c", test[1]], tmp_path, {"API_PREFIX": prefix})
    assert rc == 0 and f"http://127.0.0.1:8000{prefix}/training/health" in args


# ---- the build context ------------------------------------------------------------------------------------------


_WILDCARDS = {"**": ".*", "*": "[^/]*", "?": "[^/]"}


def dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps `path` (relative to the context) out, as BuildKit's pattern matcher does: the
    last matching pattern wins, `!` re-includes, a pattern that matches a folder matches all beneath it."""
    patterns: list[tuple[bool, re.Pattern[str]]] = []
    for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            body = line.lstrip("!").strip().strip("/")
            tokens = re.findall(r"\*\*|\*|\?|[^*?]+", body)
            source = "".join(_WILDCARDS.get(tok, re.escape(tok)) for tok in tokens)
            patterns.append((line.startswith("!"), re.compile(source.replace(".*/", "(.*/)?"))))
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for negate, pattern in patterns:
        if any(pattern.fullmatch(p) for p in prefixes):
            ignored = not negate
    return ignored


def test_build_context_leaves_out_venvs_outputs_and_git() -> None:
    # (and a keys file put beside the env examples, which the image copies: review DS)
    for path in (".swift-venv/bin/swift", ".venv/bin/python", "output/job/checkpoint-1/model.safetensors",
                 ".git/HEAD", "logs/server.log", "data/redis/appendonly.aof", "models/qwen/config.json",
                 "datasets/train.jsonl", "application/__pycache__/config.cpython-311.pyc", ".env",
                 "env/api_keys.json"):  # fmt: skip
        assert dockerignored(path), path
    # Everything the Dockerfile copies is still sent (application/models is code, not ./models).
    copied = [src for word, rest in instructions() if word == "COPY" for src in shlex.split(rest)[:-1]]
    assert copied
    for src in copied:
        files = [p for p in (ROOT / src).rglob("*") if p.is_file()] if (ROOT / src).is_dir() else [ROOT / src]
        kept = [p for p in files if "__pycache__" not in p.parts]
        assert kept and not [p for p in kept if dockerignored(p.relative_to(ROOT).as_posix())], src
    assert not dockerignored("application/models/training_model.py")
