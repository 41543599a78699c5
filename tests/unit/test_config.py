import pytest

from common import config as cfg


TINY = ["model.path=tiny"]  # the name stays a name; the default (smollm2-135m) would resolve to its conversion


def test_defaults_validate():
    assert cfg.Config().model.path == "smollm2-135m"  # serving defaults to the real instruct model
    c = cfg.load(None, TINY)
    assert c.scheduler.policy == "skip-join-mlfq"
    assert c.parallel.num_stages == 2


def test_default_is_an_old_name_of_the_tiny_model():
    assert cfg.load(None, ["model.path=default"]).model.path == "tiny"


def test_toml_and_overrides(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[scheduler]\npolicy = "fcfs"\nmax_jobs = 4\n[cache]\nblock_size = 8\n')
    c = cfg.load(p, [*TINY, "scheduler.max_jobs=7", "endpoints.bind_any=true", "endpoints.stages=tcp://a:1,tcp://b:2"])
    assert c.scheduler.policy == "fcfs"
    assert c.scheduler.max_jobs == 7
    assert c.cache.block_size == 8
    assert c.endpoints.bind_any is True
    assert c.endpoints.stage(1) == "tcp://b:2"


def test_roundtrip_dumps(tmp_path):
    c = cfg.load(None, [*TINY, "scheduler.policy=rtc", "parallel.num_stages=3"])
    p = tmp_path / "c.toml"
    p.write_text(cfg.dumps(c))
    assert cfg.load(p) == c


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["scheduler.policy=lifo"], "scheduler.policy"),
        (["cache.block_size=12"], "power of two"),
        (["scheduler.max_jobs=x"], "integer"),
        (["nope.x=1"], "unknown section"),
        (["scheduler.nope=1"], "unknown key"),
        (["scheduler"], "section.key=value"),
        (["parallel.num_stages=3", "endpoints.stages=tcp://a:1"], "one per stage"),
    ],
)
def test_bad_values_say_what_to_change(overrides, needle):
    with pytest.raises(cfg.ConfigError, match=needle):
        cfg.load(None, overrides)


def test_missing_and_malformed_file(tmp_path):
    with pytest.raises(cfg.ConfigError, match="does not exist"):
        cfg.load(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[scheduler\n")
    with pytest.raises(cfg.ConfigError, match="not valid TOML"):
        cfg.load(bad)


def test_default_stage_addresses():
    e = cfg.Endpoints(kvcache="tcp://127.0.0.1:7000")
    assert [e.stage(k) for k in range(2)] == ["tcp://127.0.0.1:7001", "tcp://127.0.0.1:7002"]


def test_a_commands_own_defaults_lose_to_the_file_and_the_overrides(tmp_path):
    defaults = ["model.path=tiny", "scheduler.max_jobs=3", "cache.block_size=8"]
    assert cfg.load(None, [], defaults).scheduler.max_jobs == 3
    p = tmp_path / "c.toml"
    p.write_text('[scheduler]\nmax_jobs = 4\n')
    c = cfg.load(p, ["cache.block_size=32"], defaults)
    assert (c.model.path, c.scheduler.max_jobs, c.cache.block_size) == ("tiny", 4, 32)


def test_security_is_off_by_default_and_curve_needs_a_keys_directory(tmp_path):
    assert cfg.load(None, TINY).security == cfg.SecurityConfig(curve=False, keys_dir="")
    with pytest.raises(cfg.ConfigError, match="keys_dir is empty"):
        cfg.load(None, [*TINY, "security.curve=true"])
    with pytest.raises(cfg.ConfigError, match="not a directory.*fastserve keys"):
        cfg.load(None, [*TINY, "security.curve=true", f"security.keys_dir={tmp_path / 'none'}"])
    with pytest.raises(cfg.ConfigError, match="security.curve must be true or false"):
        cfg.load(None, [*TINY, "security.curve=maybe"])
    p = tmp_path / "c.toml"
    p.write_text(f'[security]\ncurve = true\nkeys_dir = "{tmp_path}"\n')
    c = cfg.load(p, TINY)
    assert (c.security.curve, c.security.keys_dir) == (True, str(tmp_path))
    p.write_text(cfg.dumps(c))
    assert cfg.load(p) == c  # the launcher hands its children the section with the rest
