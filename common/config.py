"""The one config root: frozen dataclasses loaded from TOML and overridable from the command line."""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

POLICIES = ("skip-join-mlfq", "mlfq", "fcfs", "orca", "rtc", "srpt-oracle")
SWAP_MODES = ("proactive", "reactive", "recompute", "defer")
DTYPES = ("float32", "float16", "bfloat16")
ATTENTION_BACKENDS = ("auto", "reference", "flashinfer")  # kernels/attention.py


class ConfigError(ValueError):
    """A config value is missing, malformed or out of range; the message says what to change."""


@dataclass(frozen=True)
class ModelConfig:
    # "smollm2-135m" (SmolLM2-135M-Instruct, converted from its GGUF on first use), "tiny" (built-in seeded
    # random Llama, for tests and scheduler benchmarks; "default" is its old name) or a HF checkpoint directory
    path: str = "smollm2-135m"
    dtype: str = "auto"  # weights and activations; "auto" becomes bfloat16 on CUDA, float32 on CPU
    device: str = "cpu"  # "cpu" or "cuda"; the GPU of each stage is parallel.devices
    attention: str = "auto"  # "reference" (torch), "flashinfer", or "auto": FlashInfer on CUDA when importable
    seed: int = 0  # weight seed of the built-in tiny model
    max_context: int = 0  # tokens; 0 = the model's own max_position_embeddings

    def __post_init__(self) -> None:
        # fp32 on a GPU halves the KV room and slows decode; every reader sees a concrete dtype
        if self.dtype == "auto":
            object.__setattr__(self, "dtype", "bfloat16" if self.device == "cuda" else "float32")

    def validate(self) -> None:
        if self.dtype not in ("auto", *DTYPES):
            raise ConfigError(f"model.dtype is {self.dtype!r}; use auto or one of {', '.join(DTYPES)}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ConfigError(f"model.attention is {self.attention!r}; use one of {', '.join(ATTENTION_BACKENDS)}")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"model.device is {self.device!r}; use 'cpu' or 'cuda'")
        if self.max_context < 0:
            raise ConfigError("model.max_context must be >= 0 (0 means the model's own limit)")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16  # tokens per KV block
    num_gpu_blocks: int = 1024  # blocks per stage in the device pool (one block = all layers of the stage)
    num_host_blocks: int = 4096  # blocks per stage in the shared-memory host pool; 0 disables swapping
    swap: str = "proactive"  # proactive | reactive | recompute | defer
    headroom_blocks: int = 8  # free device blocks kept for arrivals
    upload_wait: bool = True  # proactive: a picked job whose upload is in flight runs, compute waiting for it

    def validate(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"cache.block_size is {self.block_size}; use a power of two such as 16")
        if self.num_gpu_blocks <= 0:
            raise ConfigError("cache.num_gpu_blocks must be > 0")
        if self.num_host_blocks < 0:
            raise ConfigError("cache.num_host_blocks must be >= 0")
        if self.swap not in SWAP_MODES:
            raise ConfigError(f"cache.swap is {self.swap!r}; use one of {', '.join(SWAP_MODES)}")
        if not 0 <= self.headroom_blocks < self.num_gpu_blocks:
            raise ConfigError("cache.headroom_blocks must be >= 0 and below cache.num_gpu_blocks")


@dataclass(frozen=True)
class SchedulerConfig:
    policy: str = "skip-join-mlfq"
    max_jobs: int = 16  # jobs per iteration
    max_prefill_tokens: int = 2048  # prompt tokens per iteration (a longer prompt runs alone)
    base_quantum_s: float = 0.010  # quantum of the top queue, seconds
    quantum_ratio: float = 2.0  # quantum of level i is base * ratio**i
    num_levels: int = 8
    starvation_limit_s: float = 3.0  # waiting longer than this promotes a job to the top queue
    starvation_check_s: float = 0.1  # period of the starvation check, seconds
    demote_to: str = "front"  # "front" or "back" of the lower queue
    profile: str = "auto"  # JSON from `fastserve profile`; "auto": the launcher profiles once per machine and model; "" = none
    max_jobs_in_system: int = 1024  # admission bound: accepted, unfinished jobs
    max_started: int = 0  # fixed bound on started-but-unfinished jobs; 0 = the memory-aware rule (SCHEDULING.md)
    start_host_fraction: float = 0.5  # share of the host KV pool that preempted started jobs may fill
    service_share: str = "own"  # "own": a job is charged its share of an iteration; "iteration": all of it
    # "auto" (= "on"): overlapped scheduling with any number of stages; "off" (SCHEDULING.md)
    overlap: str = "auto"
    iteration_log: str = ""  # append a JSON line per computed batch to this file (services/scheduler/iterlog.py)

    def validate(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(f"scheduler.policy is {self.policy!r}; use one of {', '.join(POLICIES)}")
        for name in ("max_jobs", "max_prefill_tokens", "num_levels", "max_jobs_in_system"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"scheduler.{name} must be > 0")
        if self.base_quantum_s <= 0 or self.quantum_ratio < 1.0:
            raise ConfigError("scheduler.base_quantum_s must be > 0 and scheduler.quantum_ratio >= 1")
        if self.starvation_limit_s <= 0 or self.starvation_check_s <= 0:
            raise ConfigError("scheduler.starvation_limit_s and starvation_check_s must be > 0")
        if self.max_started < 0 or not 0.0 <= self.start_host_fraction <= 1.0:
            raise ConfigError("scheduler.max_started must be >= 0 and scheduler.start_host_fraction in [0, 1]")
        if self.overlap not in ("auto", "on", "off"):
            raise ConfigError(f"scheduler.overlap is {self.overlap!r}; use 'auto', 'on' or 'off'")
        if self.service_share not in ("own", "iteration"):
            raise ConfigError(f"scheduler.service_share is {self.service_share!r}; use 'own' or 'iteration'")
        if self.demote_to not in ("front", "back"):
            raise ConfigError(f"scheduler.demote_to is {self.demote_to!r}; use 'front' or 'back'")
        if self.profile not in ("", "auto") and not Path(self.profile).is_file():
            raise ConfigError(f"scheduler.profile {self.profile!r} is not a file; run `fastserve profile --out FILE`")


@dataclass(frozen=True)
class ParallelConfig:
    num_stages: int = 2  # pipeline stages, one worker process each
    devices: tuple[str, ...] = ()  # CUDA device index of each stage ("0", "0": both on GPU 0); empty = stage k on
    # GPU k modulo the GPUs the worker sees (one GPU: every stage on it; compose gives each worker its own GPU)
    cpu_threads: int = 0  # torch threads per worker on CPU; 0 = the cores of its share (see control_cpus)
    control_cpus: int = 0  # > 0: pin ingress/scheduler/KV manager/HTTP to this many cores, workers to the rest
    # (common/affinity.py); 0 = no pinning

    def validate(self) -> None:
        if self.num_stages <= 0:
            raise ConfigError("parallel.num_stages must be > 0")
        if self.cpu_threads < 0:
            raise ConfigError("parallel.cpu_threads must be >= 0 (0: the cores of the worker's share)")
        if self.control_cpus < 0:
            raise ConfigError("parallel.control_cpus must be >= 0 (0: no pinning)")
        if self.devices and len(self.devices) != self.num_stages:
            raise ConfigError(f"parallel.devices lists {len(self.devices)} devices but parallel.num_stages is "
                              f"{self.num_stages}; list one CUDA device index per stage or leave it empty")
        if any(not d.isdigit() for d in self.devices):
            raise ConfigError(f"parallel.devices is {list(self.devices)}; use CUDA device indices such as [\"0\", \"1\"]")


def worker_threads(parallel: ParallelConfig) -> int:
    """Torch CPU threads of one worker: parallel.cpu_threads, else one per core it is pinned to
    (parallel.control_cpus), else an equal share of the machine's cores."""
    if parallel.cpu_threads:
        return parallel.cpu_threads
    if parallel.control_cpus:
        return len(os.sched_getaffinity(0))  # the worker pinned itself at start (common/affinity.py)
    return max(1, (os.cpu_count() or 1) // parallel.num_stages)


@dataclass(frozen=True)
class Endpoints:
    """ZeroMQ addresses. Each process binds its own inbox and connects to the others'."""

    client: str = "tcp://127.0.0.1:5555"  # ingress ROUTER for clients
    ingress: str = "tcp://127.0.0.1:5556"  # ingress inbox (events from the scheduler)
    scheduler: str = "tcp://127.0.0.1:5557"  # scheduler inbox
    kvcache: str = "tcp://127.0.0.1:5558"  # KV-cache manager inbox
    control: str = ""  # launcher inbox for ready handshakes and exits; empty when run alone
    control_token: str = ""  # set by the launcher: an Exit is honoured only with it (run alone: Exits are ignored)
    stages: tuple[str, ...] = ()  # stage inboxes; empty = ports after kvcache on the kvcache host
    bind_any: bool = False  # bind tcp inboxes on every interface (containers, multi-host)
    host_pool: str = "fastserve_kv"  # name of the shared-memory host KV pool
    http: str = "127.0.0.1:8000"  # HOST:PORT of the OpenAI-compatible HTTP front door (not ZeroMQ); bind_any binds 0.0.0.0; "" = none

    def http_host_port(self) -> tuple[str, int]:
        """endpoints.http as (host, port); brackets of an IPv6 host are stripped."""
        host, _, port = self.http.rpartition(":")
        host = host.strip("[]")
        if not host or "/" in host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"endpoints.http is {self.http!r}; use HOST:PORT such as 127.0.0.1:8000")
        return host, int(port)

    def stage(self, k: int) -> str:
        if self.stages:
            return self.stages[k]
        scheme, rest = self.kvcache.split("://", 1)
        if scheme != "tcp":
            return f"{self.kvcache}.stage{k}"
        host, port = rest.rsplit(":", 1)
        return f"tcp://{host}:{int(port) + 1 + k}"

    def validate(self) -> None:
        for name in ("client", "ingress", "scheduler", "kvcache", *(["control"] if self.control else [])):
            addr = getattr(self, name)
            if "://" not in addr:
                raise ConfigError(f"endpoints.{name} is {addr!r}; use tcp://HOST:PORT or ipc://PATH")
        if self.http:  # "" = no HTTP front door
            self.http_host_port()


@dataclass(frozen=True)
class HttpConfig:
    """The HTTP front door (services/http/, docs/HTTP.md); its address is endpoints.http."""

    model_name: str = ""  # the name /v1/models serves and requests' `model` must match; "" = from model.path
    default_max_tokens: int = 256  # a request without max_tokens gets min(this, the context its prompt leaves)
    max_body_bytes: int = 1 << 20  # request bodies larger than this get 413 before they are parsed
    request_timeout_s: float = 600.0  # the most one request may take, send to last token, seconds

    def validate(self) -> None:
        for name in ("default_max_tokens", "max_body_bytes"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"http.{name} must be > 0")
        if self.request_timeout_s <= 0:
            raise ConfigError("http.request_timeout_s must be > 0")


@dataclass(frozen=True)
class IngressConfig:
    """Ingress, the stack's client-facing process (services/ingress/, docs/PROTOCOL.md)."""

    default_max_tokens: int = 256  # a Generate without max_tokens gets min(this, the context its prompt leaves)
    client_lease_s: float = 10.0  # a client with live requests that sends nothing this long has them cancelled; 0 = never
    # Memory-aware admission: the jobs in the system may need, each at its worst (prompt + max_tokens), this many
    # times the device + host KV blocks; a request past that gets `overloaded`. 1.0 never drops KV for lack of
    # room; above 1 bets that outputs end before max_tokens; 0 = no memory bound (only scheduler.max_jobs_in_system)
    kv_overcommit: float = 1.0

    def validate(self) -> None:
        if self.default_max_tokens <= 0:
            raise ConfigError("ingress.default_max_tokens must be > 0")
        if self.client_lease_s < 0:
            raise ConfigError("ingress.client_lease_s must be >= 0 (0 = clients never time out)")
        if self.kv_overcommit < 0:
            raise ConfigError("ingress.kv_overcommit must be >= 0 (0 = no memory bound on admission)")


@dataclass(frozen=True)
class LivenessConfig:
    """Heartbeats between the processes (common/liveness.py, docs/DEPLOY.md "Liveness")."""

    heartbeat_s: float = 0.5  # every process says it is alive this often
    timeout_s: float = 3.0  # a process unheard this long is down: live requests end, new ones get `unavailable`

    def validate(self) -> None:
        if self.heartbeat_s <= 0:
            raise ConfigError("liveness.heartbeat_s must be > 0")
        if self.timeout_s < 2 * self.heartbeat_s:
            raise ConfigError(f"liveness.timeout_s must be at least two heartbeats ({2 * self.heartbeat_s:g} s), "
                              "or one late heartbeat would take the stack down")


@dataclass(frozen=True)
class SecurityConfig:
    """ZeroMQ CURVE on every socket of the stack (docs/DEPLOY.md, "What a deployment must protect")."""

    # Encrypt every connection and accept only known keys: internal inboxes the stack key, the client port
    # the client keys. Off, anyone who reaches a port can send anything: keep the ports on loopback or a
    # private network.
    curve: bool = False
    # Made by `fastserve keys DIR`: stack.key and stack.key_secret (every process of the stack; keep the
    # secret from clients), client.key and client.key_secret (clients: library, HTTP front door, load
    # test), clients/*.key (further client public keys the client port accepts).
    keys_dir: str = ""

    def validate(self) -> None:
        if not self.curve:
            return
        if not self.keys_dir:
            raise ConfigError("security.curve is on but security.keys_dir is empty; make keys with "
                              "`fastserve keys DIR` and set security.keys_dir to DIR")
        if not Path(self.keys_dir).is_dir():
            raise ConfigError(f"security.keys_dir {self.keys_dir!r} is not a directory; make it with "
                              f"`fastserve keys {self.keys_dir}`")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    endpoints: Endpoints = field(default_factory=Endpoints)
    http: HttpConfig = field(default_factory=HttpConfig)
    ingress: IngressConfig = field(default_factory=IngressConfig)
    liveness: LivenessConfig = field(default_factory=LivenessConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)

    def validate(self) -> "Config":
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        if self.endpoints.stages and len(self.endpoints.stages) != self.parallel.num_stages:
            raise ConfigError(
                f"endpoints.stages lists {len(self.endpoints.stages)} addresses but parallel.num_stages is "
                f"{self.parallel.num_stages}; list one per stage or leave it empty"
            )
        return self

    def replace(self, **sections: Any) -> "Config":
        """Copy with some fields changed: replace(scheduler={"policy": "fcfs"})."""
        changed = {name: dataclasses.replace(getattr(self, name), **values) for name, values in sections.items()}
        return dataclasses.replace(self, **changed).validate()

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {f.name: _plain(dataclasses.asdict(getattr(self, f.name))) for f in dataclasses.fields(self)}


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def _coerce(section: str, name: str, hint: Any, value: Any) -> Any:
    where = f"{section}.{name}"
    origin = typing.get_origin(hint)
    if origin is tuple or hint is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where} must be a list of strings")
        return tuple(value)
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, not {value!r}")
        return value
    if hint is int:
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                raise ConfigError(f"{where} must be an integer, not {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, not {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{where} must be a number, not {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, not {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, not {value!r}")
    return value


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {name: hint for name, hint in hints.items()}


def build(values: dict[str, Any]) -> Config:
    """Config from nested plain values ({"scheduler": {"policy": "fcfs"}}), checked and validated."""
    sections: dict[str, Any] = {}
    for section, cls in _section_types().items():
        given = values.get(section, {})
        if not isinstance(given, dict):
            raise ConfigError(f"[{section}] must be a table")
        hints = typing.get_type_hints(cls)
        unknown = set(given) - set(hints)
        if unknown:
            raise ConfigError(f"unknown key(s) in [{section}]: {', '.join(sorted(unknown))}; known: {', '.join(hints)}")
        sections[section] = cls(**{k: _coerce(section, k, hints[k], v) for k, v in given.items()})
    unknown = set(values) - set(sections)
    if unknown:
        raise ConfigError(f"unknown section(s): {', '.join(sorted(unknown))}; known: {', '.join(sections)}")
    config = Config(**sections).validate()
    return dataclasses.replace(config, model=dataclasses.replace(config.model, path=_model_dir(config.model.path)))


def _model_dir(path: str) -> str:
    """A model name as what it means: smollm2-135m as its cached directory (converted on first use), an alias
    as "tiny". Every process loads its config here, so all of them (and the config file the launcher hands
    its children) see the same path."""
    from common.model.spec import ModelError, resolve_model  # lazy: only this needs the model code

    try:
        return resolve_model(path)
    except ModelError as e:
        raise ConfigError(str(e)) from None


def cache_dir() -> Path:
    """Where per-machine artefacts (iteration profiles, converted models) live: FASTSERVE_CACHE or ~/.cache/fastserve."""
    return Path(os.environ.get("FASTSERVE_CACHE") or Path.home() / ".cache" / "fastserve")


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
         defaults: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a TOML file (or the defaults) and apply `section.key=value` overrides; `defaults` (same form) are a
    command's own defaults, which the file and the overrides both win over."""
    values: dict[str, Any] = {}
    _apply(values, defaults)
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            loaded = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid TOML: {e}") from None
        for section, table in loaded.items():
            if isinstance(table, dict) and isinstance(values.get(section), dict):
                values[section] = {**values[section], **table}
            else:
                values[section] = table
    _apply(values, overrides)
    return build(values)


def _apply(values: dict[str, Any], items: list[str] | tuple[str, ...]) -> None:
    for item in items:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. scheduler.policy=fcfs)")
        values.setdefault(section, {})[name] = value.strip()


def dumps(config: Config) -> str:
    """TOML text of a config (for the launcher to hand one file to every child)."""
    lines: list[str] = []
    for section, values in config.to_dict().items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'

