"""CNI_* environment parsing: per-verb requirements, names, CNI_ARGS."""
from __future__ import annotations

import pytest

from cni_bridge.protocol.env import parse_cni_args, parse_env
from cni_bridge.protocol.errors import CNIError, Code

from .helpers import cni_env

ALL_VARS = ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH")

# What each verb needs (spec table + skel: NETNS is optional for DEL, PATH is not needed by VERSION).
REQUIRED = {
    "ADD": {"CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"},
    "CHECK": {"CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"},
    "DEL": {"CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"},
    "GC": {"CNI_PATH"},
    "STATUS": set(),
    "VERSION": set(),
}


def env_error(env) -> CNIError:
    with pytest.raises(CNIError) as info:
        parse_env(env)
    return info.value


@pytest.mark.parametrize("verb", sorted(REQUIRED))
@pytest.mark.parametrize("var", ALL_VARS)
def test_each_variable_is_required_exactly_where_the_spec_says(verb, var):
    env = cni_env(verb, **{var: None})
    if var in REQUIRED[verb]:
        err = env_error(env)
        assert err.code == Code.INVALID_ENV == 4
        assert var in err.msg and verb in err.msg
    else:
        cmd = parse_env(env)
        assert cmd.command == verb


@pytest.mark.parametrize("verb", ["ADD", "CHECK"])
def test_all_missing_variables_are_named_at_once(verb):
    err = env_error({"CNI_COMMAND": verb, "CNI_IFNAME": "eth0"})
    assert err.code == 4
    for var in ("CNI_CONTAINERID", "CNI_NETNS", "CNI_PATH"):
        assert var in err.msg
    assert "CNI_IFNAME" not in err.msg


def test_empty_value_counts_as_missing():
    err = env_error(cni_env("ADD", CNI_NETNS=""))
    assert err.code == 4 and "CNI_NETNS" in err.msg


def test_del_without_netns_is_accepted_and_netns_is_empty():
    cmd = parse_env(cni_env("DEL", CNI_NETNS=None))
    assert cmd.netns == "" and cmd.container_id and cmd.ifname == "eth0"


def test_version_needs_only_the_command():
    cmd = parse_env({"CNI_COMMAND": "VERSION"})
    assert cmd.command == "VERSION" and cmd.path == ()


@pytest.mark.parametrize("command", ["", "add", "FOO", "DELETE"])
def test_unknown_or_missing_command_is_code_4(command):
    env = cni_env("ADD")
    env["CNI_COMMAND"] = command
    err = env_error(env)
    assert err.code == 4
    assert "CNI_COMMAND" in err.msg


def test_missing_command_variable():
    err = env_error({})
    assert err.code == 4 and "CNI_COMMAND is not set" in err.msg


def test_cni_path_is_split_and_empty_entries_dropped():
    cmd = parse_env(cni_env("ADD", CNI_PATH="/opt/cni/bin::/usr/lib/cni:"))
    assert cmd.path == ("/opt/cni/bin", "/usr/lib/cni")


@pytest.mark.parametrize("cid", ["abc", "0123456789abcdef" * 4, "pod_1.a-b", "A"])
def test_valid_container_ids(cid):
    assert parse_env(cni_env("ADD", CNI_CONTAINERID=cid)).container_id == cid


@pytest.mark.parametrize("cid", ["-abc", ".abc", "_x", "a/b", "a:b", "a b", "a\tb", "a;b", "..", "."])
def test_invalid_container_ids_are_code_4(cid):
    err = env_error(cni_env("ADD", CNI_CONTAINERID=cid))
    assert err.code == 4 and "CNI_CONTAINERID" in err.msg


@pytest.mark.parametrize("name", ["eth0", "e", "a" * 15, "net1.100", "x-y_z"])
def test_valid_ifnames(name):
    assert parse_env(cni_env("ADD", CNI_IFNAME=name)).ifname == name


@pytest.mark.parametrize("name,problem", [
    ("a" * 16, "longer than 15"),
    ("eth/0", "'/'"),
    ("eth:0", "':'"),
    ("eth 0", "whitespace"),
    ("eth\t0", "whitespace"),
    ("eth\n0", "whitespace"),
    (".", "'.' or '..'"),
    ("..", "'.' or '..'"),
])
@pytest.mark.parametrize("verb", ["ADD", "DEL", "CHECK"])
def test_invalid_ifnames_are_code_4(verb, name, problem):
    err = env_error(cni_env(verb, CNI_IFNAME=name))
    assert err.code == 4
    assert "CNI_IFNAME" in err.msg and problem in err.msg


def test_ifname_is_not_validated_for_verbs_that_do_not_use_it():
    # GC and STATUS concern the whole network: a stray CNI_IFNAME must not fail them.
    assert parse_env(cni_env("GC", CNI_IFNAME="not/valid")).command == "GC"


# -- CNI_ARGS ------------------------------------------------------------------------

CONTAINERD_ARGS = ("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;"
                   "K8S_POD_INFRA_CONTAINER_ID=c0ffee01;K8S_POD_UID=1234-5678")


def test_containerd_args_parse():
    cmd = parse_env(cni_env("ADD", CNI_ARGS=CONTAINERD_ARGS))
    assert cmd.args["K8S_POD_NAME"] == "web-0"
    assert cmd.args["K8S_POD_UID"] == "1234-5678"
    assert cmd.raw_args == CONTAINERD_ARGS


@pytest.mark.parametrize("flag", ["1", "true", "True", "TRUE"])
def test_ignore_unknown_tolerates_other_plugins_keys(flag):
    args = parse_cni_args(f"IgnoreUnknown={flag};FOO=bar;BAZ=")
    assert args["FOO"] == "bar" and args["BAZ"] == ""


@pytest.mark.parametrize("raw", ["FOO=bar", "IgnoreUnknown=0;FOO=bar", "IgnoreUnknown=false;FOO=bar"])
def test_unknown_keys_without_ignore_unknown_are_code_4(raw):
    with pytest.raises(CNIError) as info:
        parse_cni_args(raw)
    assert info.value.code == 4
    assert "FOO" in info.value.msg
    assert "IgnoreUnknown" in info.value.details


def test_unknown_keys_are_all_named_via_parse_env():
    err = env_error(cni_env("ADD", CNI_ARGS="ZED=1;ALPHA=2;IP=10.0.0.5"))
    assert err.code == 4 and "ALPHA, ZED" in err.msg


def test_known_keys_need_no_ignore_unknown():
    args = parse_cni_args("IP=10.22.0.9;MAC=0a:58:0a:16:00:09")
    assert args == {"IP": "10.22.0.9", "MAC": "0a:58:0a:16:00:09"}


@pytest.mark.parametrize("raw", ["IP", "IgnoreUnknown=1;K8S_POD_NAME", "=value", "IP=1;;=x"])
def test_malformed_items_are_code_4(raw):
    with pytest.raises(CNIError) as info:
        parse_cni_args(raw)
    assert info.value.code == 4
    assert "KEY=VALUE" in info.value.msg


def test_empty_items_and_values_with_equals_signs():
    args = parse_cni_args(";IP=10.0.0.1;;IgnoreUnknown=1;X=a=b;")
    assert args["IP"] == "10.0.0.1" and args["X"] == "a=b"


def test_empty_cni_args():
    assert parse_env(cni_env("ADD", CNI_ARGS="")).args == {}
