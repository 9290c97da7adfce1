from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from application.config import PROJECT_ROOT, SettingsError, load_settings
from application.services.redis_service import redis_url
from application.setting_names import unknown_settings
from application.setting_values import parse_simulated_gpus
from tests.conftest import free_port


def test_environment_selects_its_env_file_and_real_variables_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENVIRONMENT", "test")
    settings = load_settings()
    assert settings.APP_PORT == 8001 and settings.GPU_BACKEND.value == "simulated"  # from env/.env.test
    assert settings.SWIFT_BIN == str(PROJECT_ROOT / "tests" / "fake_swift" / "swift")  # relative to the project
    monkeypatch.setenv("APP_PORT", "9123")
    assert load_settings().APP_PORT == 9123
    # REDIS_SERVER_BIN too, as the README says of every path setting (it was looked up as written, from wherever
    # the server was started: "is not a redis-server found here").
    monkeypatch.setenv("REDIS_SERVER_BIN", "bin/redis-server")
    assert load_settings().REDIS_SERVER_BIN == str(PROJECT_ROOT / "bin" / "redis-server")
    monkeypatch.setenv("REDIS_SERVER_BIN", "~/redis/redis-server")
    assert load_settings().REDIS_SERVER_BIN == os.path.expanduser("~/redis/redis-server")
    monkeypatch.setenv("REDIS_SERVER_BIN", "redis-server")  # a command on PATH stays one
    assert load_settings().REDIS_SERVER_BIN == "redis-server"


def test_redis_url_wins_and_embedded_only_without_a_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENVIRONMENT", "dev")
    for name in ("REDIS_URL", "REDIS_HOST"):
        monkeypatch.delenv(name, raising=False)
    assert load_settings().uses_embedded_redis
    monkeypatch.setenv("REDIS_HOST", "redis.internal")
    assert not load_settings().uses_embedded_redis


def test_a_backend_or_policy_is_read_in_any_case() -> None:
    # GPU_BACKEND=NVML was refused for its case, though the inventory read it in any case.
    settings = load_settings(GPU_BACKEND=" NVML", QUEUE_POLICY="Strict")
    assert (settings.GPU_BACKEND.value, settings.QUEUE_POLICY.value) == ("nvml", "strict")


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("GPU_BACKEND", "cuda", "'auto', 'nvml' or 'simulated'"),
        ("QUEUE_POLICY", "fifo", "'strict' or 'backfill'"),
        ("SIMULATED_GPUS", "four", "such as 4 or 4x80"),
        ("APP_PORT", "70000", "less than or equal to 65535"),
        ("REDIS_URL", "localhost:6379", "redis://"),
        # What the client cannot read is one line now, not a scheduler crashing again and again.
        ("REDIS_URL", "redis://redis:6379:0", "check its port, db and query"),
        ("REDIS_URL", "redis://127.0.0.1:70000/0", "check its port"),
        ("API_PREFIX", "api", "must start with '/'"),
        # Any folder under OUTPUT_ROOT can become a job's output and be downloaded by its owner.
        ("OUTPUT_ROOT", ".", "holds the server's own folder"),
        ("LOG_DIR", "output/logs", "OUTPUT_ROOT"),
        ("DATA_ROOTS", "output/datasets", "holds DATA_ROOTS folder"),
        # Accepted before, then a traceback at start (inf seconds), a wait for ever on a hung Redis, a route
        # prefix that matched anything, a db silently read as 0, a traceback for a user who does not exist.
        ("STOP_GRACE_SECONDS", "inf", "less than or equal to 86400"),
        ("REDIS_SOCKET_TIMEOUT", "inf", "less than or equal to 300"),
        ("API_PREFIX", "/api/{v}", "path segments"),
        ("REDIS_URL", "redis://redis:6379/abc", "check its port, db and query"),
        ("DATA_ROOTS", "~no-such-user-here/data", "give the folder's full path"),
        # 'P' and 'P:job' on one Redis: job 'queue' of the one was the other's queue.
        ("REDIS_KEY_PREFIX", "teamA:job", "(no ':')"),
        # Taken for IPv6 addresses: a traceback at start, and a scheduler started again and again.
        ("REDIS_HOST", "127.0.0.1:6380", "without scheme or port"),
        ("REDIS_HOST", "redis://redis", "without scheme or port"),
        ("REDIS_HOST", "redis/0", "without scheme or port"),  # (REDIS_PORT and REDIS_DB silently ignored)
        # Accepted, then every request answered 503 "DB index is out of range"; REDIS_DB=16 was refused.
        ("REDIS_URL", "redis://redis:6379/99", "db must be 0-15"),
        ("REDIS_URL", "unix:///run/redis.sock?db=16", "db must be 0-15"),
        # Clients collapse dot segments before sending: the API answered nothing but 404 under such a prefix.
        ("API_PREFIX", "/api/..", "'.' or '..' segment"),
        ("API_PREFIX", "/./v1", "'.' or '..' segment"),
        # Empty was the project's own folder: Redis's data or the logs among the sources.
        ("DATA_DIR", "", "is empty: name a folder"),
        ("LOG_DIR", " ", "is empty: name a folder"),
        ("OUTPUT_ROOT", "", "is empty: name a folder"),
        # A job named after an owner's folder there listed and downloaded their uploads as its artifacts.
        ("OUTPUT_ROOT", "datasets/uploads", "where uploaded files are kept"),
        ("OUTPUT_ROOT", "datasets/uploads/jobs", "where uploaded files are kept"),
        # Every file of such a root is the server's: each request naming one was refused, one by one.
        ("DATA_ROOTS", "data", "DATA_ROOTS names DATA_DIR"),
        ("MODEL_ROOTS", "logs", "MODEL_ROOTS names LOG_DIR"),
        # A mask of the owner's own bits: the server could not read back what it wrote.
        ("UMASK", "777", "starting with 0"),
        ("UMASK", "0o77", "3 octal digits"),
        ("UMASK", "099", "3 octal digits"),
        ("RETRY_BACKOFF_SECONDS", "601", "less than or equal to 600"),
    ],
)
def test_a_bad_value_names_the_key_and_what_is_allowed(
    monkeypatch: pytest.MonkeyPatch, key: str, value: str, says: str
) -> None:
    monkeypatch.setenv(key, value)
    with pytest.raises(SettingsError) as exc:
        load_settings()
    assert key in str(exc.value) and says in str(exc.value)


@pytest.mark.parametrize(
    ("host", "url"),
    [("redis", "redis://redis:6380/0"), ("redis.internal", "redis://redis.internal:6380/0"),
     ("10.0.0.5", "redis://10.0.0.5:6380/0"), ("::1", "redis://[::1]:6380/0"), ("[::1]", "redis://[::1]:6380/0")],
)  # fmt: skip
def test_a_redis_host_is_a_name_or_an_address(monkeypatch: pytest.MonkeyPatch, host: str, url: str) -> None:
    monkeypatch.setenv("REDIS_HOST", host)
    monkeypatch.setenv("REDIS_PORT", "6380")
    assert redis_url(load_settings()) == url


def test_a_home_folder_is_expanded_in_every_path_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # ~ was taken literally (a folder named ~ in the project) everywhere but in DATA_ROOTS and MODEL_ROOTS.
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "keys.json").write_text('{"ann": {"role": "admin", "key": "ann-key-0123456789abcdef"}}')
    for name, value in (("DATA_DIR", "~/d"), ("LOG_DIR", "~/logs"), ("OUTPUT_ROOT", "~/out"),
                        ("API_KEYS_FILE", "~/keys.json"), ("SWIFT_BIN", "~/venv/bin/swift")):  # fmt: skip
        monkeypatch.setenv(name, value)
    settings = load_settings()
    assert settings.SWIFT_BIN == str(tmp_path / "venv" / "bin" / "swift")
    got = (settings.DATA_DIR, settings.LOG_DIR, settings.OUTPUT_ROOT, settings.API_KEYS_FILE)
    assert got == (tmp_path / "d", tmp_path / "logs", tmp_path / "out", tmp_path / "keys.json")
    assert [k.name for k in settings.api_keys] == ["ann"]


def test_a_name_twice_in_the_key_file_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # json.loads keeps the last: the admin key written first stopped working, and "a" became a user, silently.
    keys = tmp_path / "keys.json"
    keys.write_text('{"a": {"role": "admin", "key": "aaaa-0123456789abcdef"}, '
                    '"a": {"role": "user", "key": "bbbb-0123456789abcdef"}}')  # fmt: skip
    monkeypatch.setenv("API_KEYS_FILE", str(keys))
    with pytest.raises(SettingsError) as exc:
        load_settings()
    assert f"API_KEYS_FILE {keys} names a twice: each key needs its own name" in str(exc.value)
    # Once in each: said where (hunt CE).
    keys.write_text('{"a": {"role": "admin", "key": "aaaa-0123456789abcdef"}}')
    monkeypatch.setenv("API_KEYS", "a:user:bbbb-0123456789abcdef")
    with pytest.raises(SettingsError) as exc:
        load_settings()
    assert "each key needs its own name: a named twice in API_KEYS and in API_KEYS_FILE" in str(exc.value)


def test_an_ipv6_host_written_as_in_a_url_is_bound_without_its_brackets(monkeypatch: pytest.MonkeyPatch) -> None:
    # [::1] was refused as "would let anyone on the network run and delete jobs".
    monkeypatch.setenv("APP_HOST", "[::1]")
    settings = load_settings()
    assert settings.bind_host == "::1" and settings.open_to_the_network() is None


def test_a_log_level_in_any_case(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOG_LEVEL", "debug")
    assert load_settings().LOG_LEVEL == "DEBUG"


def test_a_misspelled_setting_is_named_with_the_one_meant(tmp_path: Path) -> None:
    # Ignored without a word: QUEUE_POLCY=strict in the env file ran the default policy.
    env = tmp_path / ".env.dev"
    env.write_text("QUEUE_POLCY=strict\nredis_port=1\nAPP_PORT=8000\n# QUEUE_POLICY=strict\nHF_HOME=/cache\n")
    found = unknown_settings(env, {"REDIS_PASWORD": "x", "PATH": "/bin", "HOME": "/root", "TEST_REDIS_URL": "x",
                                   "SWIFT_API_KEYS": "x", "APP_PORT": "1",
                                   # (other tools' variables, as container runtimes set them: review DP)
                                   "NVIDIA_VISIBLE_DEVICES": "all", "ROCR_VISIBLE_DEVICES": "0",
                                   "CUDA_VISIBLE_DEVICE": "2"})  # fmt: skip
    assert found == [
        f"{env}: QUEUE_POLCY is not a setting (did you mean QUEUE_POLICY?)",
        f"{env}: redis_port is not a setting (did you mean REDIS_PORT?)",
        f"{env}: HF_HOME is not a setting",
        "the environment variable CUDA_VISIBLE_DEVICE is not a setting (did you mean CUDA_VISIBLE_DEVICES?)",
        "the environment variable REDIS_PASWORD is not a setting (did you mean REDIS_PASSWORD?)",
    ]
    for shipped in ("dev", "test", "prod"):
        assert unknown_settings(PROJECT_ROOT / "env" / f".env.{shipped}", {}) == []


def test_start_py_names_an_address_it_cannot_listen_on_and_a_misspelled_setting(tmp_path: Path) -> None:
    # uvicorn said only "[Errno 98] Address already in use" (several workers), or "Name or service not known"
    # once the app had started.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {"PATH": "/usr/bin:/bin", "ENVIRONMENT": "dev", "HOME": str(tmp_path), "DATA_DIR": str(tmp_path / "d"),
               "LOG_DIR": str(tmp_path / "logs"), "OUTPUT_ROOT": str(tmp_path / "out"), "API_WORKERS": "2",
               "APP_PORT": str(port), "REDIS_URL": "redis://127.0.0.1:1/0", "GPU_BACKEND": "simulated",
               "QUEUE_POLCY": "strict"}  # fmt: skip
        out = subprocess.run([sys.executable, str(PROJECT_ROOT / "start.py"), "api"], env=env, capture_output=True,
                             text=True, timeout=60, check=False)  # fmt: skip
    assert out.returncode == 3, out.stderr
    assert out.stderr.strip().splitlines() == [
        "swift-api: warning: the environment variable QUEUE_POLCY is not a setting (did you mean QUEUE_POLICY?): "
        "it is ignored",
        f"swift-api: cannot listen on APP_HOST=127.0.0.1 APP_PORT={port}: Address already in use",
    ]


@pytest.mark.parametrize("key", ["DATA_ROOTS", "MODEL_ROOTS"])
def test_a_root_that_is_a_file_is_refused_at_start(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, key: str) -> None:
    (tmp_path / "afile").write_text("")
    monkeypatch.setenv(key, f"{tmp_path / 'fine'},{tmp_path / 'afile'}")
    with pytest.raises(SettingsError) as exc:
        load_settings()
    assert key in str(exc.value) and "afile is a file, not a folder" in str(exc.value)


def test_a_redis_url_the_client_cannot_read_shows_none_of_its_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://:s3cr/et@h:6379/0")  # an unencoded '/' in the password
    with pytest.raises(SettingsError) as exc:
        load_settings()
    assert "REDIS_URL" in str(exc.value) and "s3cr" not in str(exc.value)


@pytest.mark.parametrize(("urls", "says"), [
    ("https://hooks.slack.com/services/T0/B0/SLACKSECRET,htps://ci.example.com/hook", "WEBHOOK_URLS[1] (counting "
     "from 0) is not an http(s) URL"),
    ("ftp://u:PASSWORD@x/y?token=SECRET", "WEBHOOK_URLS[0] (counting from 0) is not an http(s) URL"),
    ("http://SECRET:PASSWORD@x:99999/hook", "WEBHOOK_URLS[0] (counting from 0) has a port that is not 1-65535"),
])  # fmt: skip
def test_a_bad_webhook_url_is_named_by_place_never_quoted(monkeypatch: pytest.MonkeyPatch, urls: str,
                                                          says: str) -> None:  # fmt: skip
    # A typo in one URL printed every URL's token to the terminal and the logs (hunt AP).
    monkeypatch.setenv("WEBHOOK_URLS", urls)
    with pytest.raises(SettingsError) as exc:
        load_settings()
    assert says in str(exc.value) and "SECRET" not in str(exc.value) and "PASSWORD" not in str(exc.value)


def test_a_runner_is_not_given_the_keys_the_webhook_secret_or_the_operators_webhook_urls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WEBHOOK_URLS", "https://hooks.example.com/T0/SECRET")
    monkeypatch.setenv("WEBHOOK_SECRET", "s" * 32)
    settings = load_settings()
    env = settings.runner_env({"WEBHOOK_URLS": "x", "PATH": "/bin", "API_KEYS": "k"})
    assert {"WEBHOOK_URLS", "WEBHOOK_SECRET", "API_KEYS"}.isdisjoint(env) and env["PATH"] == "/bin"


def test_start_py_stops_with_one_line_on_a_bad_setting(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "ENVIRONMENT": "dev", "GPU_BACKEND": "cuda", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, str(PROJECT_ROOT / "start.py")], env=env, capture_output=True, text=True,
                         timeout=60, check=False)  # fmt: skip
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "GPU_BACKEND" in lines[0] and "simulated" in lines[0], out.stderr


def test_a_redis_server_bin_that_is_not_there_is_named(tmp_path: Path) -> None:
    # It said "install redis-server" while one was on PATH: the setting was what had to change.
    env = {"PATH": "/usr/bin:/bin", "ENVIRONMENT": "dev", "HOME": str(tmp_path), "DATA_DIR": str(tmp_path / "d"),
           "LOG_DIR": str(tmp_path / "logs"), "OUTPUT_ROOT": str(tmp_path / "out"), "GPU_BACKEND": "simulated",
           "REDIS_SERVER_BIN": "/nonexistent/redis-server"}  # fmt: skip
    out = subprocess.run([sys.executable, str(PROJECT_ROOT / "start.py")], env=env, capture_output=True, text=True,
                         timeout=60, check=False)  # fmt: skip
    assert out.returncode == 1 and "REDIS_SERVER_BIN=/nonexistent/redis-server" in out.stderr, out.stderr


def test_simulated_gpus_format() -> None:
    assert parse_simulated_gpus("4") == (80.0,) * 4
    assert parse_simulated_gpus("2x24") == (24.0, 24.0)
    assert parse_simulated_gpus("0") == ()
    # Mixed sizes, in index order: a queue's min_gpu_memory_gb can be tried without such a machine.
    assert parse_simulated_gpus("2x80, 1x24,1") == (80.0, 80.0, 24.0, 80.0)
    for bad in ("4x", "2x80,", "40x80,40x24", "1x0", ",2"):
        with pytest.raises(ValueError):
            parse_simulated_gpus(bad)


def test_the_image_run_alone_uses_the_embedded_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    # The image sets ENVIRONMENT=prod; compose adds REDIS_URL, a plain `docker run` with keys does not.
    monkeypatch.setenv("ENVIRONMENT", "prod")
    monkeypatch.setenv("API_KEYS", "ops:admin:0123456789abcdef0123")
    for name in ("REDIS_URL", "REDIS_HOST"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings()
    assert settings.APP_HOST == "0.0.0.0" and settings.uses_embedded_redis
    monkeypatch.setenv("REDIS_URL", "redis://redis:6379/0")
    assert not load_settings().uses_embedded_redis


@pytest.mark.parametrize(("role", "log_dir"), [("all", None), ("scheduler", None), ("api", "/sys/kernel")])
def test_a_folder_that_cannot_be_made_stops_start_py_with_one_line(tmp_path: Path, role: str,
                                                                   log_dir: str | None) -> None:  # fmt: skip
    # It was a traceback from a process started later, and `start.py scheduler` started its scheduler again and
    # again (1, 2, 4 ... 30 s) for a folder that could never be made. /sys/kernel: one that exists but takes no
    # file, even for root.
    (tmp_path / "afile").write_text("")
    env = {"PATH": "/usr/bin:/bin", "ENVIRONMENT": "dev", "HOME": str(tmp_path), "DATA_DIR": str(tmp_path / "d"),
           "LOG_DIR": log_dir or str(tmp_path / "afile" / "logs"), "OUTPUT_ROOT": str(tmp_path / "out"),
           "REDIS_URL": "redis://127.0.0.1:1/0", "GPU_BACKEND": "simulated"}  # fmt: skip
    out = subprocess.run([sys.executable, str(PROJECT_ROOT / "start.py"), role], env=env, capture_output=True,
                         text=True, timeout=60, check=False)  # fmt: skip
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "LOG_DIR=" in lines[0] and "cannot be used" in lines[0], out.stderr


def test_a_data_dir_too_long_for_the_embedded_redis_socket_is_one_line(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 100)
    env = {"PATH": "/usr/bin:/bin", "ENVIRONMENT": "dev", "HOME": str(tmp_path), "DATA_DIR": str(deep),
           "LOG_DIR": str(tmp_path / "logs"), "OUTPUT_ROOT": str(tmp_path / "out"),
           "GPU_BACKEND": "simulated"}  # fmt: skip
    out = subprocess.run([sys.executable, str(PROJECT_ROOT / "start.py")], env=env, capture_output=True, text=True,
                         timeout=60, check=False)  # fmt: skip
    assert out.returncode == 2 and "too long for the embedded Redis's socket" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_an_output_root_that_is_a_file_stops_the_api_role_with_one_line(tmp_path: Path) -> None:
    # The api role skipped OUTPUT_ROOT: its workers then failed with a traceback that never named the setting.
    (tmp_path / "afile").write_text("")
    env = {"PATH": "/usr/bin:/bin", "ENVIRONMENT": "dev", "HOME": str(tmp_path), "DATA_DIR": str(tmp_path / "d"),
           "LOG_DIR": str(tmp_path / "logs"), "OUTPUT_ROOT": str(tmp_path / "afile"),
           "REDIS_URL": "redis://127.0.0.1:1/0", "GPU_BACKEND": "simulated"}  # fmt: skip
    out = subprocess.run([sys.executable, str(PROJECT_ROOT / "start.py"), "api"], env=env, capture_output=True,
                         text=True, timeout=60, check=False)  # fmt: skip
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "OUTPUT_ROOT=" in lines[0] and "cannot be used: it is a file: name a folder" in lines[0]


def test_api_workers_that_fail_to_start_make_start_py_fail(tmp_path: Path) -> None:
    # Several workers: uvicorn stopped them all and returned as from a stop, and start.py exited 0, so a service
    # manager that restarts on failure left the API down. Here each worker's log file cannot be opened.
    (tmp_path / "logs" / "swift-api.log").mkdir(parents=True)
    env = {"PATH": "/usr/bin:/bin", "ENVIRONMENT": "dev", "HOME": str(tmp_path), "DATA_DIR": str(tmp_path / "d"),
           "LOG_DIR": str(tmp_path / "logs"), "OUTPUT_ROOT": str(tmp_path / "out"), "API_WORKERS": "2",
           "APP_PORT": str(free_port()), "REDIS_URL": "redis://127.0.0.1:1/0", "GPU_BACKEND": "simulated"}  # fmt: skip
    out = subprocess.run([sys.executable, str(PROJECT_ROOT / "start.py"), "api"], env=env, capture_output=True,
                         text=True, timeout=60, check=False)  # fmt: skip
    assert out.returncode == 3, out.stderr[-2000:]
