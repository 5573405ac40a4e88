"""Address settings, as every caller of the API reads them: one address, a list of replicas, or a
gRPC target; what TLS checks and whether a token may travel in plaintext follow from it."""

from __future__ import annotations

import pytest

from clients.addresses import AddressError, parse


def test_one_address_is_taken_as_it_is() -> None:
    target = parse("pipeline.internal:50051")
    assert (target.target, target.hosts, target.authority) == ("pipeline.internal:50051", ("pipeline.internal",), None)
    assert ("grpc.lb_policy_name", "round_robin") in target.options
    assert not target.is_loopback


def test_a_list_of_ip_literals_becomes_one_balanced_target() -> None:
    target = parse(" 127.0.0.1:5001, 127.0.0.2:5002 ")
    assert target.target == "ipv4:127.0.0.1:5001,127.0.0.2:5002"
    assert target.authority == "127.0.0.1:5001" and target.is_loopback
    assert ("grpc.default_authority", "127.0.0.1:5001") in target.options
    assert parse("[::1]:1,[::1]:2").target == "ipv6:[::1]:1,[::1]:2"


def test_names_in_a_list_are_resolved_and_the_first_is_the_authority() -> None:
    target = parse("localhost:5001,127.0.0.1:5002")
    assert target.target == "ipv4:127.0.0.1:5001,127.0.0.1:5002"
    assert target.authority == "localhost:5001" and target.hosts == ("localhost", "127.0.0.1")


def test_a_list_is_loopback_only_when_every_replica_is() -> None:
    assert not parse("127.0.0.1:1,10.0.0.5:2").is_loopback


def test_grpc_targets_pass_through() -> None:
    for address, hosts in (("dns:///pipeline:50051", ("pipeline",)), ("ipv4:127.0.0.1:1,127.0.0.1:2",
                                                                        ("127.0.0.1", "127.0.0.1"))):
        target = parse(address)
        assert (target.target, target.hosts, target.authority) == (address, hosts, None)
    assert parse("dns:///127.0.0.1:1").is_loopback


@pytest.mark.parametrize("bad, says", [
    ("127.0.0.1:1,", "empty entry"), ("127.0.0.1:1,127.0.0.1", "not host:port"),
    ("127.0.0.1:1,no-such-host.invalid:2", "cannot resolve 'no-such-host.invalid'")])
def test_a_list_that_names_no_replica_is_refused(bad: str, says: str) -> None:
    with pytest.raises(AddressError, match=says):
        parse(bad)
