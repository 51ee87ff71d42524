"""Every config field, on every way in (a dict into ``CheckpointerConfig``, a plugin's ``config``, a config changed
after it was built), is checked against its annotation: a wrong type or a string for a bool is refused naming the
field and the value; defaults and valid values still construct. The plugins' ``storage_options`` and
``remote_config`` are checked the same way."""

from __future__ import annotations

import dataclasses
import fractions
import math
import os
import re
import sys
import typing

import numpy
import pytest

import lightning_ckpt as lc
from lightning_ckpt.remote import RemoteConfig

SUB_CONFIGS = {"writer_config": lc.CheckpointWriterConfig, "staging_config": lc.CheckpointStagerConfig,
               "process_config": lc.CheckpointProcessConfig}
# A value of the wrong type per annotation ("no" for a bool: truthy, and what a YAML typo gives).
WRONG = {bool: ["no", 1], int: ["5", 2.5, True], float: ["x", None], str: [5],
         bool | None: ["no", 0], int | None: ["1GB", 1.5], float | None: ["x"]}
# A valid value other than the default, per field.
VALID = {"write_barrier_timeout_secs": 30, "enable_fsync": False, "remove_stale_tmps": False, "use_direct_io": False,
         "layout": "file", "use_async_staging": False, "use_pinned_memory": False, "use_shared_memory": False,
         "use_non_blocking_copy": False, "budget_bytes": 4096, "buffer_wait_timeout_secs": 5,
         "subprocess_init_timeout_secs": 7, "subprocess_shutdown_timeout_secs": 8.5, "write_timeout_secs": 120,
         "stall_timeout_secs": 9.0, "wait_log_interval_secs": 3, "writer_niceness": 0,
         "part_size_bytes": 8 << 20, "max_concurrency": 2, "max_attempts": 1, "connect_timeout_secs": 2,
         "read_timeout_secs": 4.5, "min_send_bytes_per_sec": 1000, "no_overwrite_pattern": "",
         "stream_from_staging": True}


def _cases(configs: dict[str, type]) -> list:
    out = []
    for key, cls in configs.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            seconds = getattr(cls.FIELD_RANGES.get(f.name), "real", False)  # any number of seconds is right there
            out += [pytest.param(key, cls, f.name, bad, id=f"{cls.__name__}.{f.name}={bad!r}")
                    for bad in WRONG[hints[f.name]] if not (seconds and isinstance(bad, float))]
    return out


def _valid_cases(configs: dict[str, type]) -> list:
    return [pytest.param(key, cls, f.name, id=f"{cls.__name__}.{f.name}")
            for key, cls in configs.items() for f in dataclasses.fields(cls)]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("key, cls, name, bad", _cases(SUB_CONFIGS))
def test_a_sub_config_dict_with_a_wrong_type_is_refused_naming_the_field(key, cls, name, bad):
    with pytest.raises(TypeError, match=rf"CheckpointerConfig\.{key}\.{name} must be .*, got {type(bad).__name__}"):
        lc.CheckpointerConfig(**{key: {name: bad}})
    with pytest.raises(ValueError, match=rf"SyncCheckpointIO\.config\.{key}\.{name} must be "):
        _plugin("SyncCheckpointIO")(config={key: {name: bad}})


@pytest.mark.timeout(30)
@pytest.mark.parametrize("key, cls, name, bad", _cases(SUB_CONFIGS))
def test_a_sub_config_changed_to_a_wrong_type_is_refused_when_it_enters_the_tree(key, cls, name, bad):
    sub = cls()
    setattr(sub, name, bad)  # dataclasses check nothing on assignment
    with pytest.raises(TypeError, match=rf"CheckpointerConfig\.{key}: {cls.__name__}\.{name} must be "):
        lc.CheckpointerConfig(**{key: sub})
    config = lc.CheckpointerConfig()
    setattr(config, key, sub)
    with pytest.raises(ValueError, match=rf"AsyncCheckpointIO\.config: {cls.__name__}\.{name} must be "):
        _plugin("AsyncCheckpointIO")(config=config)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name, bad", [("max_in_flight", 2.0), ("max_in_flight", None), ("wait_timeout_secs", "60"),
                                       ("verify_on_load", "no"), ("verify_on_load", 0), ("writer_config", 5),
                                       ("staging_config", None), ("barrier_config", "tcp_store")])
def test_checkpointer_config_fields_of_the_wrong_type_are_refused_naming_the_field(name, bad):
    with pytest.raises(TypeError, match=rf"CheckpointerConfig\.{name} must be .*, got {type(bad).__name__}"):
        lc.CheckpointerConfig(**{name: bad})


@pytest.mark.timeout(30)
@pytest.mark.parametrize("key, cls, name", _valid_cases(SUB_CONFIGS))
def test_valid_non_default_values_are_taken_on_every_path(key, cls, name):
    value = VALID[name]
    assert value != getattr(cls(), name)
    assert getattr(cls(**{name: value}), name) == value
    assert getattr(getattr(lc.CheckpointerConfig(**{key: {name: value}}), key), name) == value
    plugin = _plugin("SyncCheckpointIO")(config={key: {name: value}})
    if name != "layout":  # the plugins always write one file
        assert getattr(getattr(plugin.config, key), name) == value


@pytest.mark.timeout(30)
def test_defaults_construct_everywhere():
    for cls in [*SUB_CONFIGS.values(), lc.BarrierConfig, RemoteConfig, lc.CheckpointerConfig]:
        assert dataclasses.asdict(cls()) == dataclasses.asdict(cls(**dataclasses.asdict(cls())))
    assert lc.CheckpointerConfig(barrier_config=lc.BarrierConfig(barrier_type=None)).barrier_config.barrier_type is None
    for plugin in ("AsyncCheckpointIO", "SyncCheckpointIO"):
        io = _plugin(plugin)()
        assert io.storage_options == {} and io.remote_config == RemoteConfig()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("field, value", [("process_config", {"write_timeout_secs": math.inf}),
                                          ("process_config", {"stall_timeout_secs": math.nan}),
                                          ("staging_config", {"buffer_wait_timeout_secs": math.inf})])
def test_non_finite_numbers_are_refused(field, value):
    with pytest.raises(ValueError, match=rf"{field}\.{next(iter(value))} must be a finite number"):
        lc.CheckpointerConfig(**{field: value})


@pytest.mark.timeout(30)
@pytest.mark.parametrize("barrier_type, args, match", [
    ("tcp_store", {"tcpstore_prot": 1234},
     r"barrier_args has unknown argument\(s\) \['tcpstore_prot'\]; TCPStoreBarrier takes .*'tcpstore_port'"),
    ("tcp_store", {"tcpstore_port": "29500a"}, r"barrier_args\['tcpstore_port'\] must be int"),
    ("tcp_store", {"tcpstore_port": 29500.0}, r"barrier_args\['tcpstore_port'\] must be int"),
    ("tcp_store", {"tcpstore_port": True}, r"barrier_args\['tcpstore_port'\] must be int"),
    ("tcp_store", {"tcpstore_port": 70000}, r"barrier_args\['tcpstore_port'\] must be .*65535"),
    ("tcp_store", {"master_addr": 5}, r"barrier_args\['master_address'\] must be str or None"),
    ("tcp_store", {"timeout_secs": math.inf}, r"barrier_args\['timeout_secs'\] must be a finite"),
    ("dist_barrier", {"global_rank": 0}, r"unknown argument\(s\) \['global_rank'\]; DistBarrier"),
    ("dist_barrier", {"timeout_secs": "10"}, r"barrier_args\['timeout_secs'\] must be a finite number \(seconds\)"),
])
def test_barrier_args_the_barrier_would_refuse_are_refused_in_the_config(barrier_type, args, match):
    with pytest.raises(ValueError, match=match):
        lc.CheckpointerConfig(barrier_config=lc.BarrierConfig(barrier_type, args))
    with pytest.raises(ValueError, match=r"AsyncCheckpointIO\.config[.:].*" + match):
        _plugin("AsyncCheckpointIO")(config={"barrier_config": {"barrier_type": barrier_type, "barrier_args": args}})


@pytest.mark.timeout(30)
@pytest.mark.parametrize("port", ["29500", " 29500", numpy.int64(29500), numpy.uint16(29500)])
def test_a_whole_number_port_of_another_type_is_taken_as_an_int(port):
    """A port from YAML quotes, the environment or numpy is the port it spells."""
    for key in ("tcpstore_port", "master_port"):
        config = lc.BarrierConfig("tcp_store", {key: port})
        assert config.barrier_args == {key: 29500} and type(config.barrier_args[key]) is int
    io = _plugin("AsyncCheckpointIO")(config={"barrier_config": {"barrier_type": "tcp_store",
                                                                 "barrier_args": {"tcpstore_port": port}}})
    assert lc.barriers.tcp_store_port(io.config.barrier_config) == 29500


@pytest.mark.timeout(30)
@pytest.mark.parametrize("value", [90.5, numpy.float64(0.25), 7])
def test_a_timeout_is_any_positive_number_of_seconds_even_where_the_seed_annotates_int(value):
    assert lc.CheckpointWriterConfig(write_barrier_timeout_secs=value).write_barrier_timeout_secs == value
    built = lc.CheckpointerConfig(writer_config={"write_barrier_timeout_secs": value})
    assert built.writer_config.write_barrier_timeout_secs == value
    assert lc.BarrierConfig("tcp_store", {"timeout_secs": value, "timeout_barrier_init_secs": value}).barrier_args


@pytest.mark.timeout(30)
@pytest.mark.parametrize("value, error, match", [
    (fractions.Fraction(1, 50), TypeError, "must be a finite number \\(seconds\\), got Fraction"),
    (numpy.float32(0.02), TypeError, "must be a finite number \\(seconds\\), got float32"),
    (10**400, ValueError, "must be > 0 and <= "),
])
def test_a_timeout_that_the_waits_cannot_take_is_refused(value, error, match):
    """Only ints and floats reach ``threading``'s waits (a Fraction or numpy float32 made the first wait raise);
    an int too large for a float is out of range, not an OverflowError."""
    with pytest.raises(error, match=r"CheckpointerConfig\.wait_timeout_secs " + match):
        lc.CheckpointerConfig(wait_timeout_secs=value)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("port", ["\u0663\u0660\u0660\u0660", "9" * 5000])
def test_a_port_string_that_is_not_plain_ascii_digits_is_refused_naming_the_field(port):
    with pytest.raises(TypeError, match=r"barrier_args\['tcpstore_port'\] must be int"):
        lc.BarrierConfig("tcp_store", {"tcpstore_port": port})


@pytest.mark.timeout(30)
def test_barrier_args_the_barrier_takes_are_accepted():
    args = {"master_port": 1234, "master_address": "10.0.0.1", "timeout_secs": 5, "barrier_prefix": "run"}
    config = lc.CheckpointerConfig(barrier_config={"barrier_type": "tcp_store", "barrier_args": args})
    assert config.barrier_config == lc.BarrierConfig("tcp_store", args)
    assert lc.CheckpointerConfig(barrier_config=lc.BarrierConfig("dist", {"timeout_secs": 3})).barrier_config \
        .barrier_type == "dist_barrier"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("plugin", ["AsyncCheckpointIO", "SyncCheckpointIO"])
@pytest.mark.parametrize("bad", [[1], "endpoint_url=http://x", {1: "x"}, 5])
def test_storage_options_that_are_not_a_dict_of_options_are_refused_naming_the_argument(plugin, bad):
    with pytest.raises(TypeError, match=rf"{plugin}\.storage_options must be a dict .*got {type(bad).__name__}"):
        _plugin(plugin)(storage_options=bad)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("plugin", ["AsyncCheckpointIO", "SyncCheckpointIO"])
def test_storage_options_are_copied(plugin):
    options = {"endpoint_url": "http://127.0.0.1:1", "client_kwargs": {"region_name": "x"}}
    io = _plugin(plugin)(storage_options=options)
    options["key"] = "later"
    assert io.storage_options == {"endpoint_url": "http://127.0.0.1:1", "client_kwargs": {"region_name": "x"}}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("plugin", ["AsyncCheckpointIO", "SyncCheckpointIO"])
@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(RemoteConfig)])
def test_a_remote_config_dict_becomes_a_remote_config_field_by_field(plugin, name):
    io = _plugin(plugin)(remote_config={name: VALID[name]})
    assert isinstance(io.remote_config, RemoteConfig) and getattr(io.remote_config, name) == VALID[name]
    bad = WRONG[typing.get_type_hints(RemoteConfig)[name]][0]
    with pytest.raises(TypeError, match=rf"{plugin}\.remote_config\.{name} must be .*, got {type(bad).__name__}"):
        _plugin(plugin)(remote_config={name: bad})


@pytest.mark.timeout(30)
@pytest.mark.parametrize("bad, match", [
    ({"max_attempts": 0}, r"remote_config\.max_attempts must be >= 1, got 0"),
    ({"part_size": 1}, r"remote_config has unknown keys.*\['part_size'\]"),
    ([("max_attempts", 2)], r"remote_config must be a RemoteConfig or a dict"),
])
def test_a_bad_remote_config_is_refused_naming_the_argument(bad, match):
    with pytest.raises(ValueError, match=r"AsyncCheckpointIO\." + match):
        _plugin("AsyncCheckpointIO")(remote_config=bad)


@pytest.mark.timeout(120)
def test_cli_yaml_style_remote_config_and_storage_options_build_the_plugin(monkeypatch, tmp_path):
    examples = os.path.join(os.path.dirname(__file__), "..", "..", "examples")
    monkeypatch.syspath_prepend(os.path.abspath(examples))
    import cli

    try:
        base = ["--trainer.plugins=lightning_ckpt.AsyncCheckpointIO", f"--trainer.default_root_dir={tmp_path}",
                "--trainer.logger=false"]
        built = cli.main(base + ['--trainer.plugins.remote_config={"max_attempts": 2, "read_timeout_secs": 3}',
                                 '--trainer.plugins.storage_options={"endpoint_url": "http://h"}'], run=False)
        plugin = built.trainer.strategy.checkpoint_io
        assert isinstance(plugin.remote_config, RemoteConfig)
        assert (plugin.remote_config.max_attempts, plugin.remote_config.read_timeout_secs) == (2, 3.0)
        assert plugin.storage_options == {"endpoint_url": "http://h"}
        with pytest.raises(ValueError, match="max_attempts"):
            cli.main(base + ['--trainer.plugins.remote_config={"max_attempts": 0}'], run=False)
    finally:
        for name in ("cli", "train"):
            sys.modules.pop(name, None)


def _plugin(name: str) -> type:
    from lightning_ckpt import lightning as plugins

    return getattr(plugins, name)


DIRECT = {**SUB_CONFIGS, "remote_config": RemoteConfig}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("key, cls, name, bad", _cases(DIRECT))
def test_a_config_built_directly_with_a_wrong_type_is_refused_naming_class_and_field(key, cls, name, bad):
    with pytest.raises(TypeError, match=rf"^{cls.__name__}\.{name} must be .*, got {type(bad).__name__} "
                                        + re.escape(repr(bad))):
        cls(**{name: bad})


@pytest.mark.timeout(30)
@pytest.mark.parametrize("cls, kwargs, match", [
    (lc.CheckpointWriterConfig, {"write_barrier_timeout_secs": 0}, "write_barrier_timeout_secs must be > 0"),
    (lc.CheckpointStagerConfig, {"buffer_wait_timeout_secs": math.inf}, "buffer_wait_timeout_secs must be a finite"),
    (lc.CheckpointProcessConfig, {"writer_niceness": 20}, r"writer_niceness must be >= 0 and <= 19"),
    (RemoteConfig, {"read_timeout_secs": math.nan}, "read_timeout_secs must be a finite"),
    (RemoteConfig, {"no_overwrite_pattern": "step=("}, "no_overwrite_pattern is not a regex"),
    (lc.BarrierConfig, {"barrier_type": "tcp_store", "barrier_args": {"tcpstore_prot": 1}},
     r"barrier_args has unknown argument\(s\) \['tcpstore_prot'\]; TCPStoreBarrier takes"),
    (lc.BarrierConfig, {"barrier_type": "tcp_store", "barrier_args": [1]}, r"barrier_args must be a dict"),
    (lc.BarrierConfig, {"barrier_type": ["tcp_store"]}, r"barrier_type must be str or None"),
    (lc.BarrierConfig, {"barrier_type": "nccl"}, r"barrier_type must be one of \['dist_barrier', 'tcp_store'\]"),
])
def test_a_config_built_directly_out_of_range_is_refused_naming_class_and_field(cls, kwargs, match):
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.{match}"):
        cls(**kwargs)
